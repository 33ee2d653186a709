"""Temporarily load other values into a module's parameters and restore them exactly afterwards.

Shared by :class:`~callbacks.ema.EMA` (swap the average in) and :class:`~callbacks.reference.ReferenceModel`
(swap the frozen reference in), with the copy of the trained parameters both keep. Depends on ``torch`` only.

Sharded parameters (FSDP2: DTensors) are copied, swapped and averaged shard by shard: each process keeps and
touches only its local shard (``DTensor.to_local()``, which shares the parameter's storage), never the whole
tensor. :func:`as_saved` turns a local copy back into a DTensor of the parameter's layout for a sharded
checkpoint, :func:`local_part` takes this process's part of a loaded value (a DTensor of any layout, or a whole
tensor). FSDP2 keeps gathered (unsharded) parameters between some forwards; :func:`reshard` drops them, so that a
forward after a swap gathers the swapped shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["SAME_AS_MODEL", "Layout", "as_saved", "check_device_option", "copy_trained_parameters", "local",
           "layouts_of", "local_part", "named_parameters_of", "refuse_sharded_parameters", "reshard", "restore_parameters",
           "swap_parameters"]

SAME_AS_MODEL = "same_as_model"


def refuse_sharded_parameters(strategy, what: str) -> None:
    """Raise a ``ValueError`` at start-up under a strategy that shards parameters but does not save the callbacks'
    shards with its checkpoints (Lightning's FSDP, DeepSpeed, plain ``ModelParallelStrategy``): ``what`` keeps a
    copy of every trained parameter, which such a checkpoint would hold for one process only.
    :class:`callbacks.FSDP2Strategy` (it says so with ``saves_sharded_callback_state``) is accepted."""
    if getattr(strategy, "saves_sharded_callback_state", False):
        return
    sharding = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")
    if any(name in type(strategy).__name__ for name in sharding):
        raise ValueError(
            f"{what} keeps a copy of the trained parameters, which {type(strategy).__name__} shards across "
            "processes without saving a callback's shards; use strategy: callbacks.FSDP2Strategy (FSDP2, the copy "
            "kept shard by shard and saved with the checkpoint), strategy: ddp, or leave the callback out."
        )


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


class Layout:
    """How a sharded parameter is laid out: enough to rebuild a DTensor from a local shard."""

    def __init__(self, param: torch.Tensor):
        self.mesh, self.placements = param.device_mesh, tuple(param.placements)
        self.shape, self.stride, self.device = param.shape, param.stride(), param.to_local().device


def layouts_of(params: Mapping[str, torch.Tensor]) -> dict[str, Layout]:
    """The layout of every sharded tensor among ``params`` (none for whole tensors)."""
    return {name: Layout(p) for name, p in params.items() if _is_dtensor(p)}


def as_saved(value: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """A local shard as a DTensor of ``layout`` (for a sharded checkpoint), or ``value`` when not sharded."""
    if layout is None:
        return value.detach()
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value.detach().to(layout.device), layout.mesh, layout.placements,
                              run_check=False, shape=layout.shape, stride=layout.stride)


def local_part(value: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """This process's part, in ``layout``, of a loaded value: a DTensor (redistributed when its layout differs)
    or a whole tensor (sliced). Without a layout, a DTensor is gathered whole."""
    if layout is None:
        return value.full_tensor() if _is_dtensor(value) else value
    if _is_dtensor(value):
        if value.device_mesh != layout.mesh or tuple(value.placements) != layout.placements:
            value = value.redistribute(layout.mesh, layout.placements)
        return value.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(layout.device), layout.mesh, layout.placements, src_data_rank=None).to_local()


def reshard(module: torch.nn.Module | None) -> None:
    """Drop every gathered FSDP2 parameter of ``module`` (the next forward gathers the shards again)."""
    if module is None:
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def check_device_option(option: str, value: str) -> None:
    """Raise a ``ValueError`` naming ``option`` unless ``value`` is a torch device string or ``SAME_AS_MODEL``."""
    if value == SAME_AS_MODEL:
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{option} {value!r} is not a device; use 'cpu', 'cuda', 'cuda:<index>', any torch device string, "
            f"or {SAME_AS_MODEL!r}."
        ) from err


def _resolve_device(value: str, param_device: torch.device) -> torch.device:
    if value == SAME_AS_MODEL:
        return param_device
    dev = torch.device(value)
    if dev.index is None and dev.type == param_device.type:
        return param_device
    return dev


def copy_trained_parameters(
    module: torch.nn.Module, owner: str, option: str, device: str, promote_to_float32: bool = False
) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s parameters that require gradients, keyed by name, on ``device`` (an
    option value checked by :func:`check_device_option`; ``SAME_AS_MODEL`` keeps each parameter's device).
    With ``promote_to_float32``, low-precision parameters are copied in float32."""
    out: dict[str, torch.Tensor] = {}
    reshard(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            dtype = torch.promote_types(p.dtype, torch.float32) if promote_to_float32 else p.dtype
            shard = local(p.detach())
            try:
                out[name] = shard.to(device=_resolve_device(device, shard.device), dtype=dtype, copy=True)
            except (RuntimeError, AssertionError) as err:
                raise RuntimeError(
                    f"{owner}: cannot keep the copy on {option}={device!r} ({err}). Use 'cpu', "
                    f"'{SAME_AS_MODEL}', or a device this machine has."
                ) from err
    return out


def named_parameters_of(module: torch.nn.Module, names, owner: str) -> dict[str, torch.nn.Parameter]:
    """``module``'s parameters called ``names`` (sharded ones as their DTensors: gathered parameters are dropped
    first); a clear error when the module lacks some (another module)."""
    reshard(module)
    all_params = dict(module.named_parameters())
    missing = [n for n in names if n not in all_params]
    if missing:
        raise RuntimeError(
            f"{owner}: the module has no parameters named {missing[:5]} (of {len(missing)}); the copy was built "
            f"for another module. Pass the module the {owner} callback was fitted with."
        )
    return {n: all_params[n] for n in names}


def restore_parameters(params: Mapping[str, torch.nn.Parameter], backup: Mapping[str, torch.Tensor]) -> None:
    """Copy ``backup[name]`` back into ``params[name]`` (its local shard) for every name (no autograd record)."""
    with torch.no_grad():
        for name, p in params.items():
            if name in backup:
                local(p).copy_(backup[name])


@contextmanager
def swap_parameters(
    params: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor], module: torch.nn.Module | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Load ``values`` into ``params`` for the duration of the block; restore the originals bit for bit.

    The originals are backed up on the device of the corresponding value (so a CPU-held copy does not cost
    accelerator memory while it is swapped in) and in the parameter's own dtype (the restore is exact). The
    copies run under ``torch.no_grad``; the block itself runs with whatever grad mode the caller has. The
    originals are restored also when the block (or the swap itself) raises. Yields the backup, keyed like
    ``params``: the live values while they are swapped out. Sharded parameters swap their local shards; ``module``
    (their FSDP2 root) drops its gathered parameters when the block ends, so no forward after it computes with
    the swapped values.
    """
    backup: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, p in params.items():
                backup[name] = local(p.detach()).to(values[name].device, copy=True)
            for name, p in params.items():
                local(p).copy_(values[name])
        except BaseException:
            restore_parameters(params, backup)
            raise
    try:
        yield backup
    finally:
        reshard(module)
        restore_parameters(params, backup)
