"""Off-policy sampling: generate training data with the EMA weights (the "old policy").

This module depends on ``torch`` and ``lightning`` only.

Protocol
--------
A LightningModule that generates its own training data (RL rollouts) enters, around data generation, the
``sampling_context(trainer, pl_module)`` of every trainer callback that has such a method::

    with enter_sampling_contexts(self.trainer, self):   # or the same loop written out
        rollouts = self.generate(prompts)
    loss = self.loss(rollouts)                           # live weights again

Any callback may take part by defining ``sampling_context(trainer, pl_module) -> ContextManager``.
:class:`OffPolicySampling` is the one that swaps the :class:`~callbacks.ema.EMA` average into the model, so
rollouts come from the EMA policy while the live weights are the ones trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from .ema import EMA

__all__ = ["OffPolicySampling", "enter_sampling_contexts"]

_FIX = "add callbacks.EMA to the trainer callbacks, or set off_policy: false"


@contextmanager
def enter_sampling_contexts(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> Iterator[None]:
    """Enter ``sampling_context(trainer, pl_module)`` of every trainer callback that has one (in order).

    With no trainer (a module used outside Lightning), this is a null context.
    """
    with ExitStack() as stack:
        for cb in getattr(trainer, "callbacks", None) or []:
            make = getattr(cb, "sampling_context", None)
            if callable(make):
                stack.enter_context(make(trainer, pl_module))
        yield


class OffPolicySampling(pl.Callback):
    """Sample (generate rollouts) with the EMA weights while the live weights train.

    Needs an :class:`~callbacks.ema.EMA` callback in the same trainer; the EMA's average is the "old policy".
    With ``off_policy=False`` this callback does nothing (on-policy sampling with the live weights).

    The module's side of the protocol: wrap data generation in :func:`enter_sampling_contexts` (or enter
    ``sampling_context(trainer, pl_module)`` of every callback that has the method). Weights are restored
    exactly when the context exits, also on exceptions.

    Args:
        off_policy: sample with the EMA weights (True) or the live weights (False).
    """

    def __init__(self, off_policy: bool = True) -> None:
        super().__init__()
        self.off_policy = bool(off_policy)
        self._ema: EMA | None = None

    def _find_ema(self, trainer: pl.Trainer) -> EMA:
        emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        if not emas:
            raise RuntimeError(f"OffPolicySampling(off_policy=True) needs an EMA callback: {_FIX}.")
        if len(emas) > 1:
            raise RuntimeError(
                f"OffPolicySampling found {len(emas)} EMA callbacks and cannot tell which is the old policy; "
                "keep a single callbacks.EMA in the trainer callbacks."
            )
        return emas[0]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.off_policy:
            return
        self._ema = self._find_ema(trainer)
        if not self._ema.enabled:
            rank_zero_warn(
                "OffPolicySampling: the EMA callback has ema_decay=0 (averaging disabled), so sampling uses "
                "the live weights (on-policy)."
            )

    def sampling_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AbstractContextManager:
        """A context in which the EMA weights are in the model; a null context when ``off_policy`` is False."""
        if not self.off_policy:
            return contextlib.nullcontext()
        ema = self._ema if self._ema is not None else self._find_ema(trainer)
        return ema.swapped(pl_module)
