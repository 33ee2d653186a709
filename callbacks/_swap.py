"""Temporarily load other values into a module's parameters and restore them exactly afterwards.

Shared by :class:`~callbacks.ema.EMA` (swap the average in) and :class:`~callbacks.reference.ReferenceModel`
(swap the frozen reference in). Depends on ``torch`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["restore_parameters", "swap_parameters"]


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
