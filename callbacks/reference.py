"""The frozen reference model of a KL penalty, as a Lightning callback.

This module depends on ``torch`` and ``lightning`` only, so any Lightning project can use it.

Protocol
--------
The callback holds the *settings* of the KL term (``kl_beta``, ``kl_type``) and *provides the reference*; the
LightningModule computes the term itself::

    ref = the trainer's ReferenceModel callback (if any, and ref.enabled)
    with ref.reference(self):            # the reference weights are in the model, grad disabled
        v_ref = self.model(x)
    loss = loss + ref.kl_beta * ((v - v_ref) ** 2).mean()

A module that can produce the reference cheaply defines ``reference_context() -> ContextManager | None``. When it
returns a context manager (e.g. a LoRA model with its adapters disabled is the base model), the callback uses
that: no copy, no extra memory. When it returns None or the method does not exist, the callback keeps a frozen
copy of the trained parameters (those with ``requires_grad`` at fit start, with their values at fit start) on
``ref_param_device`` and swaps it into the live parameters inside :meth:`ReferenceModel.reference`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ._swap import (
    check_device_option,
    copy_trained_parameters,
    named_parameters_of,
    Layout,
    as_saved,
    layouts_of,
    local_part,
    refuse_sharded_parameters,
    swap_parameters,
)

__all__ = ["KL_TYPES", "ReferenceModel"]

KL_TYPES = ("x-based", "v-based")



class ReferenceModel(pl.Callback):
    """Frozen reference policy for a KL penalty (``kl_beta * KL``).

    Args:
        kl_beta: coefficient of the KL term. ``0`` disables the term and builds no reference at all (no copy,
            no memory).
        kl_type: ``'x-based'`` (KL of the sampling steps' Gaussians, on the step means) or ``'v-based'``
            (squared distance of the predicted velocities). The module reads it to choose its formula.
        ref_param_device: where a reference copy lives: ``'cpu'`` (default, saves accelerator memory),
            ``'same_as_model'`` (faster swaps) or any torch device string. Unused when the module gives a
            cheap reference (``reference_context()``).

    The reference is built at ``on_fit_start`` (after the strategy placed the model). A copy is saved with the
    checkpoint and restored on resume, so a resumed run keeps the *original* reference, not the resumed
    weights.
    """

    def __init__(self, kl_beta: float = 0.0, kl_type: str = "v-based", ref_param_device: str = "cpu") -> None:
        super().__init__()
        kl_beta = float(kl_beta)
        if not kl_beta >= 0.0 or kl_beta == float("inf"):
            raise ValueError(f"kl_beta must be a finite number >= 0 (0 disables the KL term); got {kl_beta!r}.")
        if kl_type not in KL_TYPES:
            raise ValueError(f"Unknown kl_type {kl_type!r}; choose one of {', '.join(map(repr, KL_TYPES))}.")
        check_device_option("ref_param_device", ref_param_device)
        self.kl_beta = kl_beta
        self.kl_type = kl_type
        self.ref_param_device = ref_param_device

        self._built = False
        self._uses_context = False  # the module's reference_context() is the reference
        self._ref: dict[str, torch.Tensor] = {}  # name -> frozen reference value (copy mode only; local shards)
        self._layout: dict[str, Layout] = {}  # name -> layout of a sharded parameter (FSDP2)
        self._pending_state: dict[str, Any] | None = None  # loaded before the reference was built
        self._active = False

    # ------------------------------------------------------------------ public API
    @property
    def enabled(self) -> bool:
        """False when ``kl_beta == 0``: no KL term, no reference."""
        return self.kl_beta > 0.0

    @property
    def uses_copy(self) -> bool:
        """True when the reference is a frozen copy of parameters held by this callback."""
        return self._built and self.enabled and not self._uses_context

    @property
    def reference_parameters(self) -> dict[str, torch.Tensor]:
        """The frozen reference values by parameter name (empty for a context reference or when disabled)."""
        return dict(self._ref)

    def build(self, pl_module: torch.nn.Module) -> None:
        """Make the reference from ``pl_module`` as it is now (``on_fit_start`` calls this)."""
        self._built, self._uses_context, self._ref = False, False, {}
        if not self.enabled:
            self._built = True
            return
        make = getattr(pl_module, "reference_context", None)
        if callable(make):
            if make() is not None:  # a probe only (never entered); each use makes a fresh context
                self._uses_context = True
                self._built = True
                return
        ref = copy_trained_parameters(pl_module, "ReferenceModel", "ref_param_device", self.ref_param_device)
        self._layout = layouts_of(named_parameters_of(pl_module, ref, "ReferenceModel"))
        if not ref:
            rank_zero_warn("ReferenceModel: the module has no parameters that require gradients; the reference "
                           "is the module itself.")
        self._ref = ref
        self._built = True

    @contextlib.contextmanager
    def reference(self, pl_module: torch.nn.Module) -> Iterator[None]:
        """A block in which ``pl_module`` computes as the reference model, under ``torch.no_grad``.

        With a copy, the reference values are swapped into the trained parameters and the live values are
        restored bit for bit afterwards (also on exceptions). With a module-provided context, that context is
        entered. Nested use is a no-op.
        """
        if not self.enabled:
            raise RuntimeError("ReferenceModel(kl_beta=0) builds no reference; set kl_beta > 0 to use one.")
        self._maybe_apply_pending(pl_module)
        if not self._built:
            raise RuntimeError(
                "ReferenceModel: the reference is built at fit start; call build(pl_module) first when using "
                "the module outside Trainer.fit."
            )
        if self._active:
            with torch.no_grad():
                yield
            return
        self._active = True
        try:
            with torch.no_grad():
                if self._uses_context:
                    ctx = pl_module.reference_context()
                    if ctx is None:
                        raise RuntimeError("ReferenceModel: reference_context() returned None after fit start "
                                           "had returned a context; it must be stable.")
                    with ctx:
                        yield
                else:
                    with swap_parameters(self._named_params(pl_module), self._ref, pl_module):
                        yield
        finally:
            self._active = False

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False
        self.build(pl_module)
        if self._ref:  # a copy of the trained parameters (full fine-tuning); a LoRA reference needs none
            refuse_sharded_parameters(trainer.strategy, "callbacks.ReferenceModel (full fine-tuning)")
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def state_dict(self) -> dict[str, Any]:
        if not self._built and self._pending_state is not None:
            return self._pending_state
        return {
            "config": {"kl_beta": self.kl_beta, "kl_type": self.kl_type, "ref_param_device": self.ref_param_device},
            "reference": {name: as_saved(t, self._layout.get(name)) for name, t in self._ref.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "reference" not in state_dict:
            raise KeyError("ReferenceModel state has no 'reference'; was it saved by callbacks.ReferenceModel?")
        if self._built:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    # ------------------------------------------------------------------ internals
    def _named_params(self, pl_module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return named_parameters_of(pl_module, self._ref, "ReferenceModel")

    def _maybe_apply_pending(self, pl_module: torch.nn.Module) -> None:
        """Outside fit (``trainer.validate(ckpt_path=...)``): build, then load the checkpoint's reference."""
        if not self._built and self._pending_state is not None:
            self.build(pl_module)
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved: dict[str, torch.Tensor] = state["reference"]
        if not self.uses_copy:
            if saved:
                rank_zero_warn(
                    "ReferenceModel: the checkpoint holds a reference copy but this run "
                    + ("has kl_beta=0" if not self.enabled else "uses the module's reference_context()")
                    + "; the saved copy is ignored."
                )
            return
        if not saved:
            rank_zero_warn(
                "ReferenceModel: the checkpoint holds no reference copy (it was saved with kl_beta=0 or a "
                "context reference); the reference is the weights this run started from."
            )
            return
        ours, theirs = set(self._ref), set(saved)
        if ours != theirs:
            raise RuntimeError(
                "ReferenceModel: the checkpoint's reference covers other parameters than this run trains "
                f"(only in the checkpoint: {sorted(theirs - ours)[:5]}, only in this run: {sorted(ours - theirs)[:5]}). "
                "Train the same parameters as the run that saved the checkpoint."
            )
        with torch.no_grad():
            for name, t in saved.items():
                shape = self._layout[name].shape if name in self._layout else self._ref[name].shape
                if t.shape != shape:
                    raise RuntimeError(
                        f"ReferenceModel: checkpoint reference {name!r} has shape {tuple(t.shape)}, the parameter "
                        f"has {tuple(shape)}."
                    )
                self._ref[name].copy_(local_part(t, self._layout.get(name)))
