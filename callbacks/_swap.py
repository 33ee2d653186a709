"""Temporarily load other values into a module's parameters and restore them exactly afterwards.

Shared by :class:`~callbacks.ema.EMA` (swap the average in) and :class:`~callbacks.reference.ReferenceModel`
(swap the frozen reference in), with the copy of the trained parameters both keep. Depends on ``torch`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["SAME_AS_MODEL", "check_device_option", "copy_trained_parameters", "named_parameters_of",
           "refuse_sharded_parameters", "restore_parameters", "swap_parameters"]

SAME_AS_MODEL = "same_as_model"


def refuse_sharded_parameters(strategy, what: str) -> None:
    """Raise a ``ValueError`` at start-up under a strategy that shards parameters (FSDP, DeepSpeed, model
    parallel): ``what`` keeps a whole copy of every trained parameter, which a process there does not hold."""
    sharding = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")
    if any(name in type(strategy).__name__ for name in sharding):
        raise ValueError(
            f"{what} keeps a full copy of the trained parameters, which {type(strategy).__name__} shards across "
            "processes; it does not support this strategy yet. Use strategy: ddp (with LoRA a KL reference "
            "needs no copy), or leave the callback out."
        )


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
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            dtype = torch.promote_types(p.dtype, torch.float32) if promote_to_float32 else p.dtype
            try:
                out[name] = p.detach().to(device=_resolve_device(device, p.device), dtype=dtype, copy=True)
            except (RuntimeError, AssertionError) as err:
                raise RuntimeError(
                    f"{owner}: cannot keep the copy on {option}={device!r} ({err}). Use 'cpu', "
                    f"'{SAME_AS_MODEL}', or a device this machine has."
                ) from err
    return out


def named_parameters_of(module: torch.nn.Module, names, owner: str) -> dict[str, torch.nn.Parameter]:
    """``module``'s parameters called ``names``; a clear error when the module lacks some (another module)."""
    all_params = dict(module.named_parameters())
    missing = [n for n in names if n not in all_params]
    if missing:
        raise RuntimeError(
            f"{owner}: the module has no parameters named {missing[:5]} (of {len(missing)}); the copy was built "
            f"for another module. Pass the module the {owner} callback was fitted with."
        )
    return {n: all_params[n] for n in names}


def restore_parameters(params: Mapping[str, torch.nn.Parameter], backup: Mapping[str, torch.Tensor]) -> None:
    """Copy ``backup[name]`` back into ``params[name]`` for every name (no autograd record)."""
    with torch.no_grad():
        for name, p in params.items():
            if name in backup:
                p.copy_(backup[name])


@contextmanager
def swap_parameters(
    params: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """Load ``values`` into ``params`` for the duration of the block; restore the originals bit for bit.

    The originals are backed up on the device of the corresponding value (so a CPU-held copy does not cost
    accelerator memory while it is swapped in) and in the parameter's own dtype (the restore is exact). The
    copies run under ``torch.no_grad``; the block itself runs with whatever grad mode the caller has. The
    originals are restored also when the block (or the swap itself) raises. Yields the backup, keyed like
    ``params``: the live values while they are swapped out.
    """
    backup: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, p in params.items():
                backup[name] = p.detach().to(values[name].device, copy=True)
            for name, p in params.items():
                p.copy_(values[name])
        except BaseException:
            restore_parameters(params, backup)
            raise
    try:
        yield backup
    finally:
        restore_parameters(params, backup)
