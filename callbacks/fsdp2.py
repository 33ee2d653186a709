"""FSDP2 whose checkpoints also hold the callbacks' shards: Lightning's ``ModelParallelStrategy`` for data-parallel
sharding, with three changes to its checkpoints.

Here beside the callbacks (torch + lightning only) because it is what lets :class:`~callbacks.EMA` and
:class:`~callbacks.ReferenceModel` keep their copies shard by shard in any Lightning project:

* **Callback shards.** ``ModelParallelStrategy`` writes the model and optimizer through torch's distributed
  checkpoint (DCP, each process its shards) but pickles everything else, the callbacks' states included, from
  process 0 alone: an EMA average held as DTensor shards would keep process 0's shards only. Here every DTensor in
  a callback's state goes through DCP too (a marker stays in the pickled metadata) and comes back as a DTensor
  sharded over the data-parallel mesh; the callback takes its local part.
* **Partial model states.** A module that saves only some parameters (its trained ones, ``strict_loading =
  False``) is restored from the keys the checkpoint has; Lightning's loader asks DCP for every key of the model.
* **Atomic saves.** The checkpoint folder is written beside its target (``<name>.saving``) and renamed over it
  when every process has finished: a run killed while saving keeps its previous checkpoint.

Defaults for FSDP2: ``tensor_parallel_size=1`` and ``data_parallel_size`` = every process (``"auto"``).
The module shards itself in ``configure_model`` (``fully_shard`` on ``self.device_mesh``), as Lightning documents.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME, _is_sharded_checkpoint
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = ["FSDP2Strategy", "read_whole_checkpoint"]

_MARKER = "__sharded_callback_tensor__:"  # + its key: what stands in the pickled metadata for a DTensor
_KEY = "sharded_callback_state"


def _split(obj: Any, found: dict[str, Any]) -> Any:
    """``obj`` with each DTensor replaced by a marker; the DTensors collected in ``found`` under the marker's key."""
    from torch.distributed.tensor import DTensor

    def mark(tensor):
        key = str(len(found))
        found[key] = tensor
        return _MARKER + key

    return apply_to_collection(obj, DTensor, mark)


def _markers(obj: Any) -> list[str]:
    """The keys of the markers in ``obj``."""
    keys: list[str] = []
    apply_to_collection(obj, str, lambda s: keys.append(s[len(_MARKER):]) if s.startswith(_MARKER) else None)
    return keys


def _join(obj: Any, tensors: dict[str, Any]) -> Any:
    """``obj`` with each marker replaced by its tensor."""
    return apply_to_collection(obj, str, lambda s: tensors[s[len(_MARKER):]] if s.startswith(_MARKER) else s)


def _full(obj: Any) -> Any:
    """``obj`` with each DTensor gathered whole (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return apply_to_collection(obj, DTensor, lambda t: t.full_tensor().cpu())


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 (see the module docstring); the arguments are its own."""

    #: read by callbacks.EMA and callbacks.ReferenceModel: their sharded copies are saved and restored here
    saves_sharded_callback_state = True

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # FSDP2: every process is one data-parallel shard
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def _shard_mesh(self):
        mesh = self.device_mesh
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:  # one file from process 0: the callbacks' shards gathered whole
            checkpoint["callbacks"] = _full(checkpoint.get("callbacks", {}))
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported.")
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

        path = Path(self.broadcast(filepath))
        staging = path.with_name(path.name + ".saving")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self.barrier()
        staging.mkdir(parents=True, exist_ok=True)
        sharded: dict[str, Any] = {}
        checkpoint["callbacks"] = _split(checkpoint.get("callbacks", {}), sharded)
        state = {"state_dict": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        if sharded:
            state[_KEY] = sharded
        _distributed_checkpoint_save(state, staging)
        if self.global_rank == 0:
            torch.save(checkpoint, staging / _METADATA_FILENAME)
        self.barrier()
        if self.global_rank == 0:  # the previous checkpoint stays whole until the new one is complete
            old = path.with_name(path.name + ".old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if path.exists():
                path.rename(old)
            staging.rename(path)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier()

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor import empty as dtensor_empty

        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        if self.lightning_module.strict_loading and len(model_state) < len(get_model_state_dict(self.model)):
            raise KeyError(f"{path} lacks parameters of this model; set strict_loading = False to load a part")
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        keys = _markers(metadata.get("callbacks", {}))
        if keys:
            mesh, targets = self._shard_mesh, {}
            for key in keys:
                meta = saved[f"{_KEY}.{key}"]
                targets[key] = dtensor_empty(tuple(meta.size), dtype=meta.properties.dtype, device_mesh=mesh,
                                             placements=[Shard(0)] if len(meta.size) else None)
            dcp.load({_KEY: targets}, checkpoint_id=path)
            metadata["callbacks"] = _join(metadata["callbacks"], targets)
        metadata["state_dict"] = model_state  # what the module's on_load_checkpoint sees (already loaded)
        return metadata


def read_whole_checkpoint(path) -> dict[str, Any]:
    """A sharded checkpoint folder of :class:`FSDP2Strategy` read whole on one process, with no process group: the
    dict ``torch.load`` gives for a checkpoint file (``state_dict`` of whole tensors, ``optimizer_states``, the
    callbacks' states with their shards joined). The whole model must fit in host memory."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(Path(path))
    sharded = checkpoint.pop(_KEY, {})
    checkpoint["callbacks"] = _join(checkpoint.get("callbacks", {}), sharded)
    optimizers = sorted((k for k in checkpoint if k.startswith("optimizer_") and k[10:].isdigit()), key=lambda k: int(k[10:]))
    checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    return checkpoint
