"""Exponential moving average (EMA) of the trained parameters, as a Lightning callback.

This module depends on ``torch`` and ``lightning`` only, so any Lightning project can use it.

Update rule, applied every ``ema_update_interval`` training batches::

    ema = d * ema + (1 - d) * param          # in float32 (or wider), whatever the parameter dtype

where ``d = decay_at(ema_decay_schedule, num_updates, ema_decay, ...)`` and ``num_updates`` is the number of
EMA updates made so far (0 for the first update).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ._swap import (
    Layout,
    as_saved,
    check_device_option,
    copy_trained_parameters,
    layouts_of,
    local,
    local_part,
    named_parameters_of,
    refuse_sharded_parameters,
    swap_parameters,
)

__all__ = ["EMA", "EMA_DECAY_SCHEDULES", "decay_at"]

EMA_DECAY_SCHEDULES = ("constant", "power", "linear", "piecewise_linear", "cosine", "warmup_cosine")



def _check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(
            f"{name} must be in [0, 1] (0 disables averaging, 1 freezes the average); got {value!r}."
        )


def _check_schedule(schedule: str) -> None:
    if schedule not in EMA_DECAY_SCHEDULES:
        raise ValueError(
            f"Unknown ema_decay_schedule {schedule!r}; choose one of {', '.join(EMA_DECAY_SCHEDULES)}."
        )


def decay_at(
    schedule: str,
    step: int,
    decay: float,
    *,
    warmup_steps: int = 10,
    initial_decay: float = 0.0,
    decay_steps: int = 1000,
    flat_steps: int = 0,
    ramp_rate: float = 0.001,
) -> float:
    """The EMA decay after ``step`` EMA updates.

    With ``d = decay``, ``d0 = initial_decay``, ``W = warmup_steps`` and ``T = decay_steps``:

    ====================  ==================================================================
    ``constant``          ``d``
    ``power``             ``min(d, (1 + step) / (W + step))``
    ``linear``            ``d0 + (d - d0) * min(step / W, 1)``
    ``piecewise_linear``  ``0`` if ``step < flat_steps`` else ``min((step - flat_steps) * ramp_rate, d)``
    ``cosine``            ``d0 + (d - d0) * (1 - cos(pi * min(step / T, 1))) / 2``
    ``warmup_cosine``     linear ``0 -> d0`` over ``W`` steps, then cosine ``d0 -> d`` over ``T`` steps
    ====================  ==================================================================

    ``warmup_steps = 0`` means no warm-up (``linear`` and ``power`` give ``d`` at once, ``warmup_cosine``
    starts its cosine at step 0).
    """
    _check_schedule(schedule)
    _check_unit_interval("ema_decay", decay)
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}.")
    d, d0, W, T = float(decay), float(initial_decay), int(warmup_steps), int(decay_steps)

    if schedule == "constant":
        return d
    if schedule == "power":
        if W + step == 0:  # W = 0: (1 + step) / step >= 1 for every step, i.e. plain d
            return d
        return min(d, (1.0 + step) / (W + step))
    if schedule == "linear":
        frac = 1.0 if W <= 0 else min(step / W, 1.0)
        return d0 + (d - d0) * frac
    if schedule == "piecewise_linear":
        if step < flat_steps:
            return 0.0
        return min((step - flat_steps) * float(ramp_rate), d)

    def _cosine(s: int) -> float:
        frac = 1.0 if T <= 0 else min(s / T, 1.0)
        return d0 + (d - d0) * (1.0 - math.cos(math.pi * frac)) / 2.0

    if schedule == "cosine":
        return _cosine(step)
    # warmup_cosine
    if step < W:
        return d0 * step / W
    return _cosine(step - W)


class EMA(pl.Callback):
    r"""Exponential moving average of the trained parameters.

    Only the parameters that require gradients when fitting starts are averaged (LoRA adapters, or the whole
    model when it is fully fine-tuned); frozen parameters and buffers are left alone. The average lives in a
    float32 copy (float64 parameters stay float64) on ``ema_device``, whatever the parameters' dtype, and is
    initialised to the parameters' values at ``on_fit_start`` (after ``configure_model`` and after the
    strategy has moved the model to its device).

    The average is updated at the end of every ``ema_update_interval``-th training batch
    (``on_train_batch_end``): ``ema = d * ema + (1 - d) * param``, with ``d`` given by
    :func:`decay_at` for the number of updates made so far (:attr:`num_updates`).

    * Manual optimization: every training batch counts, however many optimizer steps it makes (in an RL
      module one batch is one iteration: rollouts, then one or several updates).
    * Automatic optimization: only batches that ended with an optimizer step count, so that gradient
      accumulation does not update the average with unchanged weights.

    Args:
        ema_decay: the target decay ``d`` in ``[0, 1]``. ``0`` disables averaging: no copy is kept, the
            "average" is the live weights at all times, :meth:`swapped` changes nothing.
        ema_decay_schedule: constant, power, linear, piecewise_linear, cosine or warmup_cosine (see :func:`decay_at`).
        ema_update_interval: update the average every this many (counted) training batches.
        ema_device: where the average is kept: ``"cpu"``, ``"cuda"``, any ``torch.device`` string, or
            ``"same_as_model"`` (each parameter's own device). A device without index (``"cuda"``) of the
            parameter's device type means the parameter's device (the rank's GPU under DDP).
        flat_steps: ``piecewise_linear`` schedule: decay 0 for this many updates, then ramping up.
        ramp_rate: ``piecewise_linear`` schedule: decay growth per update after flat_steps, up to ema_decay.
        warmup_steps: ``power``, ``linear`` and ``warmup_cosine`` schedules.
        initial_decay: ``d0`` of the ``linear``, ``cosine`` and ``warmup_cosine`` schedules.
        decay_steps: ``T`` of the ``cosine`` and ``warmup_cosine`` schedules.
        swap_for_validation: run validation with the average swapped into the model, restore afterwards.

    Checkpoints: the callback state (averages keyed by parameter name, counters, config) is saved with the
    Trainer checkpoint and restored by ``trainer.fit(ckpt_path=...)``, so a resumed run continues exactly.
    When the state arrives before the averages exist (the usual case), it is kept and applied at fit start.
    The constructor's configuration wins over the checkpoint's (a warning lists differences); the
    trained-parameter names must match those of the run that saved the checkpoint.

    Each ``trainer.fit`` call without a checkpoint starts a fresh average from the current weights.

    Sharded parameters (FSDP2 under :class:`callbacks.FSDP2Strategy`): each process averages its own shards (on
    ``ema_device``: host memory holds a shard, not the model), swaps them in, and saves them as DTensors in the
    sharded checkpoint; no process ever gathers the whole model. Other sharding strategies are refused at setup.

    Example::

        ema = EMA(ema_decay=0.9, ema_decay_schedule="power")
        trainer = Trainer(callbacks=[ema])
        trainer.fit(model)
        with ema.swapped(model):
            samples = model.generate(...)
    """

    def __init__(
        self,
        ema_decay: float = 0.9,
        ema_decay_schedule: str = "constant",
        ema_update_interval: int = 1,
        ema_device: str = "cpu",
        flat_steps: int = 0,
        ramp_rate: float = 0.001,
        warmup_steps: int = 10,
        initial_decay: float = 0.0,
        decay_steps: int = 1000,
        swap_for_validation: bool = True,
    ) -> None:
        super().__init__()
        _check_schedule(ema_decay_schedule)
        _check_unit_interval("ema_decay", ema_decay)
        _check_unit_interval("initial_decay", initial_decay)
        if int(ema_update_interval) != ema_update_interval or ema_update_interval < 1:
            raise ValueError(f"ema_update_interval must be an integer >= 1; got {ema_update_interval!r}.")
        check_device_option("ema_device", ema_device)
        for name, value in (("flat_steps", flat_steps), ("warmup_steps", warmup_steps)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
        if int(decay_steps) != decay_steps or decay_steps < 1:
            raise ValueError(f"decay_steps must be an integer >= 1; got {decay_steps!r}.")
        if ramp_rate < 0:
            raise ValueError(f"ramp_rate must be >= 0; got {ramp_rate!r}.")

        self.ema_decay = float(ema_decay)
        self.ema_decay_schedule = ema_decay_schedule
        self.ema_update_interval = int(ema_update_interval)
        self.ema_device = ema_device
        self.flat_steps = int(flat_steps)
        self.ramp_rate = float(ramp_rate)
        self.warmup_steps = int(warmup_steps)
        self.initial_decay = float(initial_decay)
        self.decay_steps = int(decay_steps)
        self.swap_for_validation = bool(swap_for_validation)

        self.num_updates = 0  # EMA updates so far: the schedule's step
        self._counted_batches = 0  # training batches that count towards ema_update_interval
        self._last_global_step = 0  # trainer.global_step at the last counted batch (automatic optimization)
        self._ema: dict[str, torch.Tensor] | None = None  # name -> average (local shard), None until fit start
        self._layout: dict[str, Layout] = {}  # name -> layout of a sharded parameter (FSDP2)
        self._pending_state: dict[str, Any] | None = None  # loaded before the averages existed
        self._backup: dict[str, torch.Tensor] | None = None  # live weights while the average is swapped in
        self._validation_swap: Any = None  # the open swapped() context during validation

    # ------------------------------------------------------------------ public API
    @property
    def enabled(self) -> bool:
        """False when ``ema_decay == 0`` (no averaging: the live weights are the average)."""
        return self.ema_decay > 0.0

    @property
    def config(self) -> dict[str, Any]:
        return {
            "ema_decay": self.ema_decay,
            "ema_decay_schedule": self.ema_decay_schedule,
            "ema_update_interval": self.ema_update_interval,
            "ema_device": self.ema_device,
            "flat_steps": self.flat_steps,
            "ramp_rate": self.ramp_rate,
            "warmup_steps": self.warmup_steps,
            "initial_decay": self.initial_decay,
            "decay_steps": self.decay_steps,
            "swap_for_validation": self.swap_for_validation,
        }

    @property
    def current_decay(self) -> float:
        """The decay the next update will use (``decay_at`` at ``num_updates``); 0 when disabled."""
        if not self.enabled:
            return 0.0
        return decay_at(
            self.ema_decay_schedule,
            self.num_updates,
            self.ema_decay,
            warmup_steps=self.warmup_steps,
            initial_decay=self.initial_decay,
            decay_steps=self.decay_steps,
            flat_steps=self.flat_steps,
            ramp_rate=self.ramp_rate,
        )

    @property
    def averaged_parameters(self) -> dict[str, torch.Tensor]:
        """The averages keyed by parameter name (empty before fit start or when disabled). Do not modify."""
        return dict(self._ema or {})

    @staticmethod
    def used_for_validation(callbacks) -> EMA | None:
        """The EMA among ``callbacks`` whose average validation runs with (enabled, swapping for validation,
        already built), or None when validation uses the live weights."""
        return next((cb for cb in callbacks if isinstance(cb, EMA) and cb.enabled and cb.swap_for_validation
                     and cb.averaged_parameters), None)

    @property
    def is_swapped(self) -> bool:
        return self._backup is not None

    @contextmanager
    def swapped(self, pl_module: torch.nn.Module) -> Iterator[None]:
        """Copy the average into the trained parameters for the duration of the block, then restore them.

        Restores the live weights bit for bit, also when the block raises. Runs under ``torch.no_grad`` (the
        copies are not recorded by autograd). Nested use is a no-op. Before the average exists (no fit
        started) and when averaging is disabled, the average equals the live weights and nothing is copied.
        """
        self._maybe_apply_pending(pl_module)
        if self._ema is None or self._backup is not None:
            yield
            return
        params = self._named_trained_params(pl_module)
        with swap_parameters(params, self._ema, pl_module) as backup:
            self._backup = backup  # the live weights, read by update() and on_save_checkpoint() meanwhile
            try:
                yield
            finally:
                self._backup = None

    def copy_to(self, pl_module: torch.nn.Module) -> None:
        """Overwrite the trained parameters with the average for good (e.g. before exporting weights)."""
        self._maybe_apply_pending(pl_module)
        if self._ema is None:
            return
        if self._backup is not None:
            raise RuntimeError("EMA.copy_to() cannot be used inside EMA.swapped().")
        params = self._named_trained_params(pl_module)
        with torch.no_grad():
            for name, p in params.items():
                local(p).copy_(self._ema[name])

    def update(self, pl_module: torch.nn.Module) -> None:
        """One EMA update with the current decay (the hooks call this; public for custom loops)."""
        if not self.enabled or self._ema is None:
            self.num_updates += 1
            return
        d = self.current_decay
        params = self._named_trained_params(pl_module)
        with torch.no_grad():
            for name, p in params.items():
                ema = self._ema[name]
                # while swapped, the live weights are in the backup
                src = self._backup[name] if self._backup is not None else local(p.detach())
                src = src.to(device=ema.device, dtype=ema.dtype)
                if d == 0.0:
                    ema.copy_(src)
                else:
                    ema.mul_(d).add_(src, alpha=1.0 - d)
        self.num_updates += 1

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled:
            refuse_sharded_parameters(trainer.strategy, "callbacks.EMA")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backup = None
        self._validation_swap = None
        self._initialize(pl_module)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            if trainer.global_step <= self._last_global_step:
                return  # no optimizer step in this batch (gradient accumulation, skipped step)
            self._last_global_step = trainer.global_step
        self._counted_batches += 1
        if self._counted_batches % self.ema_update_interval == 0:
            self.update(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.swap_for_validation and self._validation_swap is None:
            ctx = self.swapped(pl_module)
            ctx.__enter__()
            self._validation_swap = ctx

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_validation_swap()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_validation_swap()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A checkpoint written while the average is swapped in must still hold the live weights.
        if self._backup is None or "state_dict" not in checkpoint:
            return
        sd = checkpoint["state_dict"]
        for name, live in self._backup.items():
            if name in sd:
                saved = sd[name]
                layout = Layout(saved) if name in self._layout else None
                sd[name] = as_saved(live.to(local(saved).device, copy=True), layout)

    def state_dict(self) -> dict[str, Any]:
        if self._ema is None and self._pending_state is not None:
            return self._pending_state
        return {
            "config": self.config,
            "num_updates": self.num_updates,
            "counted_batches": self._counted_batches,
            "last_global_step": self._last_global_step,
            "ema": {name: as_saved(t, self._layout.get(name)) for name, t in (self._ema or {}).items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"config", "num_updates", "counted_batches", "last_global_step", "ema"} - set(state_dict)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)}; was it saved by callbacks.EMA?")
        diffs = {
            k: (v, self.config.get(k)) for k, v in state_dict["config"].items() if self.config.get(k, v) != v
        }
        if diffs:
            rank_zero_warn(
                "EMA: the checkpoint was saved with a different EMA configuration; using this run's values: "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())
            )
        if self._ema is not None:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    # ------------------------------------------------------------------ internals
    def _named_trained_params(self, pl_module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        assert self._ema is not None
        return named_parameters_of(pl_module, self._ema, "EMA")

    def _initialize(self, pl_module: torch.nn.Module) -> None:
        if not self.enabled:
            self._ema = {}
            return
        ema = copy_trained_parameters(pl_module, "EMA", "ema_device", self.ema_device, promote_to_float32=True)
        self._layout = layouts_of(named_parameters_of(pl_module, ema, "EMA"))
        if not ema:
            rank_zero_warn("EMA: the module has no parameters that require gradients; nothing is averaged.")
        self._ema = ema
        self.num_updates = 0
        self._counted_batches = 0
        self._last_global_step = 0

    def _maybe_apply_pending(self, pl_module: torch.nn.Module) -> None:
        """Outside fit (e.g. ``trainer.validate(ckpt_path=...)``): build the averages for a loaded state."""
        if self._ema is None and self._pending_state is not None:
            self._initialize(pl_module)
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._ema is not None
        saved: dict[str, torch.Tensor] = state["ema"]
        if self.enabled and saved:
            ours, theirs = set(self._ema), set(saved)
            if ours != theirs:
                only_ckpt, only_run = sorted(theirs - ours), sorted(ours - theirs)
                raise RuntimeError(
                    "EMA: the checkpoint averages other parameters than this run trains.\n"
                    f"  only in the checkpoint ({len(only_ckpt)}): {only_ckpt[:5]}\n"
                    f"  only in this run ({len(only_run)}): {only_run[:5]}\n"
                    "Train the same parameters as the run that saved the checkpoint (same LoRA/adapter "
                    "config and frozen modules), or drop the EMA state from the checkpoint "
                    "(checkpoint['callbacks']) to start a fresh average."
                )
            for name, t in saved.items():
                shape = self._layout[name].shape if name in self._layout else self._ema[name].shape
                if t.shape != shape:
                    raise RuntimeError(
                        f"EMA: checkpoint average {name!r} has shape {tuple(t.shape)}, the parameter has "
                        f"{tuple(shape)}."
                    )
            with torch.no_grad():
                for name, t in saved.items():
                    self._ema[name].copy_(local_part(t, self._layout.get(name)))
        elif self.enabled and not saved:
            rank_zero_warn(
                "EMA: the checkpoint holds no averages; starting the average from the loaded weights."
            )
        self.num_updates = int(state["num_updates"])
        self._counted_batches = int(state["counted_batches"])
        self._last_global_step = int(state["last_global_step"])

    def _close_validation_swap(self) -> None:
        ctx, self._validation_swap = self._validation_swap, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
