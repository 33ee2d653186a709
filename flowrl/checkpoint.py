"""Checkpoints written atomically: a run killed during a save keeps its previous checkpoint readable.

Hand-written because Lightning's own ``_atomic_save`` stages the bytes in the system temporary directory
(fsspec's local transaction) and ``shutil.move`` falls back to copying across file systems, which is not atomic:
a kill during that copy leaves a truncated ``last.ckpt``. Here the file is written next to its target, flushed to
disk, and renamed over it (``os.replace``, atomic on POSIX and Windows). Remote paths (``s3://``, ...) keep
Lightning's behaviour.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flowrl.errors import ConfigError

__all__ = ["AtomicCheckpointIO", "check_algorithm", "check_checkpoint_files", "check_resume", "check_trained_state", "save_trained_state",
           "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are temporary file + ``fsync`` + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        get_filesystem(path).makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a checkpoint IO of its own."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def save_trained_state(module, checkpoint: dict[str, Any]) -> None:
    """Reduce the checkpoint's model state to ``module``'s trained parameters (the frozen base is not saved) and
    note what a resume checks: the algorithm, the number of processes, the iteration."""
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
    checkpoint["flowrl_iteration"] = module.iteration
    checkpoint["flowrl_algorithm"] = type(module).__name__
    checkpoint["flowrl_world_size"] = module.trainer.world_size if module._trainer is not None else 1


def check_trained_state(module, checkpoint: dict[str, Any]) -> None:
    """A ``KeyError`` naming the parameters ``module`` trains that the checkpoint lacks."""
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trained - set(checkpoint["state_dict"]))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} trained parameters (e.g. {missing[:3]}); "
                       "it was written for a different finetune_type / LoRA setup")


_EARLIER = "use an earlier checkpoint (checkpoints/), or start without --ckpt_path"


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """A ``ConfigError`` naming ``path`` and the cause when the checkpoint cannot be read whole: missing, truncated
    (a save that was killed, a copy cut short), a folder that is not a complete sharded checkpoint, a shard file
    missing or shorter than its index says. Reads only the files' indexes, not the weights."""
    import zipfile

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"checkpoint {path!r} is truncated or not a checkpoint ({os.path.getsize(path)} bytes, "
                              f"no index at its end: a save or copy cut short); {_EARLIER}")
        return
    from torch.distributed.checkpoint import FileSystemReader

    missing = [n for n in (".metadata", "meta.pt") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise ConfigError(f"checkpoint {path!r} is a folder without {' and '.join(missing)}: not a complete sharded "
                          f"checkpoint (a save cut short, or another folder); {_EARLIER}")
    try:
        storage = FileSystemReader(path).read_metadata().storage_data
        torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable index is the same problem for the user
        raise ConfigError(f"checkpoint {path!r} has an unreadable index ({type(e).__name__}); {_EARLIER}") from e
    needed: dict[str, int] = {}
    for item in storage.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            state = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise ConfigError(f"checkpoint {path!r}: shard file {name} is {state}; {_EARLIER}")


def _index(path: str) -> tuple[dict[str, Any], dict[str, tuple]]:
    """A checkpoint's metadata (everything but tensors' data) and its model state's shapes, weights left on disk."""
    if os.path.isdir(path):
        from torch.distributed.checkpoint import FileSystemReader

        meta = torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True)
        index = FileSystemReader(path).read_metadata().state_dict_metadata
        return meta, {k[len("state_dict."):]: tuple(v.size) for k, v in index.items() if k.startswith("state_dict.")}
    meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return meta, {k: tuple(v.shape) for k, v in meta.get("state_dict", {}).items()}


def check_algorithm(path: str | os.PathLike, algorithm: str, meta: dict[str, Any] | None = None) -> None:
    """A ``ConfigError`` when the (whole) checkpoint at ``path`` was written by another algorithm than ``algorithm``
    (a class name); ``meta``: its index when already read."""
    written = (meta if meta is not None else _index(os.fspath(path))[0]).get("flowrl_algorithm")
    if written is not None and written != algorithm:
        raise ConfigError(f"checkpoint {os.fspath(path)!r} was written by {written}, this run trains {algorithm}: "
                          "resume with the run's own config (its config.yaml beside the checkpoints)")


def check_resume(path: str | os.PathLike, module, world_size: int) -> None:
    """Before a resumed run starts any work: the checkpoint is whole (:func:`check_checkpoint_files`), holds exactly
    ``module``'s trained parameters with their shapes, and was written by the same algorithm on as many processes
    (the data order and the noise follow the global batch, so a resume is exact only on as many). A
    ``ConfigError`` naming the file and the cause otherwise."""
    check_checkpoint_files(path)
    path = os.fspath(path)
    meta, shapes = _index(path)
    check_algorithm(path, type(module).__name__, meta)
    processes = meta.get("flowrl_world_size")
    if processes is not None and processes != world_size:
        raise ConfigError(f"checkpoint {path!r} was written by {processes} process(es), this run has {world_size}: a "
                          f"resume is exact only on as many (set trainer.devices / num_nodes to {processes} in all)")
    trained = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(trained) - set(shapes)), sorted(set(shapes) - set(trained))
    reshaped = sorted(n for n in set(trained) & set(shapes) if trained[n] != shapes[n])
    if missing or extra or reshaped:
        what = "; ".join(f"{label} ({len(names)}, e.g. {names[0]})" for label, names in
                         (("lacks", missing), ("has others", extra), ("has other shapes", reshaped)) if names)
        raise ConfigError(f"checkpoint {path!r} holds other trained parameters than this model: it {what}; it was "
                          "written for another model, finetune_type or LoRA setup: resume with the run's own config")
