"""A reward-hacking guard: at every validation, compare the training reward with a held-out "gold" metric and act.

This module depends on ``torch`` and ``lightning`` only, so any Lightning project can use it.

A policy that learns to please its training reward can do so by ways the reward's author never meant (flat images
for a compressibility reward, one image for every prompt): the training reward keeps rising while what one wanted
falls. The first thing that shows it is a metric the policy is not trained on (an evaluation reward, a verifier's
accuracy) falling while the training reward rises; others are the samples' diversity falling and the KL to the
reference growing. :class:`RewardHackingGuard` watches these at every validation and warns, stops the run or rolls
it back to the validation where the gold metric was best.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ._swap import copy_trained_parameters, named_parameters_of, restore_parameters
from .ema import EMA

__all__ = ["GUARD_ACTIONS", "GuardConfigError", "RewardHackingGuard"]

GUARD_ACTIONS = ("warn", "stop", "rollback")
_KEEP = ("memory", "disk")
_SHARDING = ("FSDP", "DeepSpeed", "ModelParallel")


class GuardConfigError(ValueError):
    """An option or a monitored metric the guard refuses; the message names it and the fix (``flowrl fit`` prints it
    as one ``error:`` line, as its own refusals)."""


def _finite(name: str, value: float, low: float, low_inclusive: bool = True) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok:
        raise GuardConfigError(f"RewardHackingGuard: {name} must be a finite number {'>=' if low_inclusive else '>'} "
                         f"{low}; got {value!r}.")
    return value


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state with every tensor cloned to the CPU: later in-place updates of the live
    state (an optimizer step, an EMA update) cannot reach it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class RewardHackingGuard(pl.Callback):
    """Watches the training reward against a held-out gold metric at every validation; warns, stops or rolls back.

    Signals, checked at every validation (the full "before" validation of ``num_sanity_val_steps: -1`` included; a
    partial sanity check is not a validation and is left out):

    * **hacking**: the gold metric is more than ``margin`` below its best value so far while the training reward
      (``train_metric``, averaged over the training steps since the previous validation) is not below its average
      at the best validation (the first training average when the best was the "before" validation); fires when
      this holds for ``patience`` validations in a row.
    * **diversity** (with ``diversity`` set): the diversity metric is below ``min_diversity_fraction`` of its first
      value; fires at once.
    * **limit** (with ``limits`` set): a metric is above its limit, e.g. ``{"train/kl": 0.05}`` (the KL to the
      reference) or a velocity-norm drift; a metric logged in training steps is averaged over the steps since the
      previous validation, one logged at validation is taken as logged. Fires at once.

    Gold and diversity are "higher is better". When a signal fires, ``action``:

    * ``warn``: a warning line, training goes on.
    * ``stop``: training ends after this validation, with a line naming the signal, the values and the step.
    * ``rollback``: the trained weights, the optimizer states and the :class:`callbacks.EMA` states of the
      best-gold validation are restored before the next training step (or at the end of training when the signal
      came at the last validation), the KL coefficient (``kl_beta`` of every callback that has one, such as
      :class:`callbacks.ReferenceModel`) multiplied by ``kl_multiplier`` and the learning rate divided by
      ``lr_divisor``; then training goes on. The learning rate keeps the scheduler's position (the restored optimizer
      gets the current rate, divided; a scheduler's base rates are divided too). After ``max_rollbacks`` rollbacks,
      the next signal restores the best state once more and stops: the run ends with the best-gold weights.
      With ``load_best_at_end`` the best state is also restored when training ends without that (the steps after
      the last validation, or validations below the best that did not fire), as Hugging Face's
      ``load_best_model_at_end``: the run always ends with the best-gold weights.

    Every validation logs ``guard/gold``, ``guard/gold_best``, ``guard/train`` (the training average),
    ``guard/bad_validations``, ``guard/diversity_fraction`` (with ``diversity``), ``guard/triggered``,
    ``guard/rollbacks`` and ``guard/stopped`` to the trainer's loggers; every decision also writes one line and is
    kept in :attr:`decisions`. The state (history, best, bad streak, rollbacks, decisions, the kept best state)
    is saved with the checkpoint, so a resumed run goes on with it (and with the multiplied ``kl_beta``).

    A monitored metric that nobody logs is refused (``ValueError``, one line listing the logged metrics) at the
    first validation, or for ``train_metric`` at the first validation after training steps.

    Args:
        gold: the held-out metric, higher is better (``val/shapes_acc_overall``, ``val/reward`` of eval rewards).
        train_metric: the training reward, logged at training steps.
        margin: how far below its best the gold metric must be to count (in the gold metric's units).
        patience: validations in a row the hacking signal must hold before acting.
        diversity: a diversity metric logged at validation (``val/diversity_pixel``), or None.
        min_diversity_fraction: the diversity signal fires below this fraction of the first diversity value.
        limits: upper limits of further metrics (the KL to the reference, a velocity drift), by metric name.
        action: ``warn``, ``stop`` or ``rollback``.
        kl_multiplier: ``rollback``: multiply ``kl_beta`` of the callbacks that have one by this at each rollback.
        lr_divisor: ``rollback``: divide the learning rate by this at each rollback.
        max_rollbacks: ``rollback``: rollbacks before a signal restores the best state and stops.
        keep_best: ``rollback``: where the best state is kept: ``memory`` (host memory; saved inside the checkpoint)
            or ``disk`` (``<default_root_dir>/guard/best-rank<r>.pt``; the checkpoint names the file).
        load_best_at_end: ``rollback``: end every run with the best-gold state, whether a signal fired or not.
    """

    def __init__(
        self,
        gold: str,
        train_metric: str = "train/reward_mean",
        margin: float = 0.02,
        patience: int = 2,
        diversity: str | None = None,
        min_diversity_fraction: float = 0.5,
        limits: dict[str, float] | None = None,
        action: str = "warn",
        kl_multiplier: float = 1.0,
        lr_divisor: float = 1.0,
        max_rollbacks: int = 1,
        keep_best: str = "memory",
        load_best_at_end: bool = False,
    ) -> None:
        super().__init__()
        if action not in GUARD_ACTIONS:
            raise GuardConfigError(f"RewardHackingGuard: unknown action {action!r}; choose one of {', '.join(GUARD_ACTIONS)}.")
        if keep_best not in _KEEP:
            raise GuardConfigError(f"RewardHackingGuard: unknown keep_best {keep_best!r}; choose one of {', '.join(_KEEP)}.")
        if not gold or not train_metric or gold == train_metric:
            raise GuardConfigError("RewardHackingGuard: gold and train_metric must be two different metric names "
                             f"(got gold={gold!r}, train_metric={train_metric!r}).")
        if int(patience) != patience or patience < 1 or int(max_rollbacks) != max_rollbacks or max_rollbacks < 0:
            raise GuardConfigError(f"RewardHackingGuard: patience must be an integer >= 1 and max_rollbacks >= 0; got "
                             f"{patience!r}, {max_rollbacks!r}.")
        fraction = _finite("min_diversity_fraction", min_diversity_fraction, 0.0, low_inclusive=False)
        if fraction > 1.0:
            raise GuardConfigError(f"RewardHackingGuard: min_diversity_fraction must be in (0, 1]; got {fraction!r}.")
        self.kl_multiplier = _finite("kl_multiplier", kl_multiplier, 1.0)
        self.lr_divisor = _finite("lr_divisor", lr_divisor, 1.0)
        if action != "rollback" and (self.kl_multiplier != 1.0 or self.lr_divisor != 1.0 or load_best_at_end):
            raise GuardConfigError(f"RewardHackingGuard: kl_multiplier, lr_divisor and load_best_at_end act with the kept best "
                             f"state; set action: rollback or leave them at 1, 1, false (action is {action!r}).")
        self.gold, self.train_metric, self.diversity = gold, train_metric, diversity
        self.margin = _finite("margin", margin, 0.0)
        self.patience, self.max_rollbacks = int(patience), int(max_rollbacks)
        self.min_diversity_fraction = fraction
        self.limits = {str(k): _finite(f"limits[{k!r}]", v, -math.inf) for k, v in (limits or {}).items()}
        self.action, self.keep_best, self.load_best_at_end = action, keep_best, bool(load_best_at_end)

        self.history: list[dict[str, Any]] = []  # one record per validation
        self.decisions: list[dict[str, Any]] = []  # one record per signal acted on
        self.best: dict[str, Any] | None = None  # the best-gold validation's record
        self.bad_streak = 0  # validations in a row with the hacking signal
        self.diversity_start: float | None = None
        self.rollbacks = 0
        self.kl_factor = 1.0  # product of the kl_multipliers applied (re-applied on resume)
        self.stopped = False
        self._train_window: dict[str, list[float]] = {}  # training-step values since the last validation
        self._steps_in_window = 0
        self._val_keys: set[str] = set()  # metrics logged at validation (not averaged over training steps)
        self._before_validation: dict[str, Any] = {}
        self._pending: list[str] = []  # "snapshot", "restore", "restore_and_stop": done before the next step
        self._snapshot: dict[str, Any] | None = None  # the best state (memory), or None
        self._snapshot_path: str | None = None  # the best state's file (disk)
        self._resumed = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gold=self.gold, train_metric=self.train_metric)

    @property
    def has_best_state(self) -> bool:
        return self._snapshot is not None or (self._snapshot_path is not None and os.path.exists(self._snapshot_path))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.action != "rollback":
            return
        if any(name in type(trainer.strategy).__name__ for name in _SHARDING):
            raise GuardConfigError(f"RewardHackingGuard: action rollback keeps a copy of the whole trained weights and "
                             f"optimizer state, which {type(trainer.strategy).__name__} shards; use strategy: ddp, "
                             "or action: warn or stop.")
        if self.kl_multiplier != 1.0 and not self._kl_holders(trainer):
            raise GuardConfigError(f"RewardHackingGuard: kl_multiplier={self.kl_multiplier:g} but no callback has a kl_beta "
                             "> 0; add callbacks.ReferenceModel with kl_beta > 0 or leave kl_multiplier at 1.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed and self.kl_factor != 1.0:  # kl_beta comes from the config: apply the rollbacks' factor
            for cb in self._kl_holders(trainer):
                cb.kl_beta = float(cb.kl_beta) * self.kl_factor
        self._resumed = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._do_pending(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps_in_window += 1
        metrics = trainer.callback_metrics
        for name in (self.train_metric, *self.limits):
            if name in metrics and name not in self._val_keys:
                self._train_window.setdefault(name, []).append(float(metrics[name]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(task != "snapshot" for task in self._pending):  # the signal came at the last validation
            self._do_pending(trainer, pl_module)
        elif self.load_best_at_end and self.best is not None and self._ends_off_best(trainer):
            self._pending = []
            self._restore(trainer, pl_module, adjust=False)
            line = (f"RewardHackingGuard: training ended at step {trainer.global_step}; the state of step "
                    f"{self.best['step']} (best gold {_fmt(self.best['gold'])}) restored (load_best_at_end).")
            rank_zero_info(line)
            self.decisions.append({"step": int(trainer.global_step), "signals": [], "action": "load_best_at_end",
                                   "gold": None, "train": None, "best_gold": self.best["gold"],
                                   "best_step": self.best["step"], "message": line})
        self._pending = []

    def _ends_off_best(self, trainer: pl.Trainer) -> bool:
        """Whether the weights at the end differ from the best validation's: training went on after it."""
        if not self.has_best_state:
            return False  # the best is the last validation and no step followed it (else a snapshot was taken)
        return self.best["step"] != trainer.global_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking and trainer.num_sanity_val_steps != float("inf"):
            return  # a partial validation (a few batches) does not stand for one
        if trainer.state.fn != "fit":
            return
        metrics = dict(trainer.callback_metrics)
        self._val_keys |= {k for k, v in metrics.items() if self._before_validation.get(k) is not v}
        # the training average is this process's (a module need not sync it): every process judges rank 0's record,
        # so that all keep the same state and act alike
        record = trainer.strategy.broadcast(self._record(trainer, metrics), src=0)
        decision = self._judge(record)
        self.history.append(record)
        if decision is not None:
            self._act(trainer, decision)
        self._log(trainer, record, decision)
        self._train_window, self._steps_in_window = {}, 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history, "decisions": self.decisions, "best": self.best, "bad_streak": self.bad_streak,
            "diversity_start": self.diversity_start, "rollbacks": self.rollbacks, "kl_factor": self.kl_factor,
            "stopped": self.stopped, "pending": self._pending, "val_keys": sorted(self._val_keys),
            "train_window": self._train_window, "steps_in_window": self._steps_in_window,
            "snapshot": self._snapshot, "snapshot_path": self._snapshot_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"history", "decisions", "best", "rollbacks", "kl_factor"} - set(state_dict)
        if missing:
            raise KeyError(f"RewardHackingGuard state is missing {sorted(missing)}; was it saved by this callback?")
        self.history, self.decisions = list(state_dict["history"]), list(state_dict["decisions"])
        self.best, self.bad_streak = state_dict["best"], int(state_dict.get("bad_streak", 0))
        self.diversity_start = state_dict.get("diversity_start")
        self.rollbacks, self.kl_factor = int(state_dict["rollbacks"]), float(state_dict["kl_factor"])
        self.stopped, self._pending = bool(state_dict.get("stopped", False)), list(state_dict.get("pending", ()))
        self._val_keys = set(state_dict.get("val_keys", ()))
        self._train_window = {k: list(v) for k, v in state_dict.get("train_window", {}).items()}
        self._steps_in_window = int(state_dict.get("steps_in_window", 0))
        self._snapshot, self._snapshot_path = state_dict.get("snapshot"), state_dict.get("snapshot_path")
        self._resumed = True

    # ------------------------------------------------------------------ the judgement
    def _value(self, name: str, metrics: dict[str, Any], window: bool) -> float | None:
        values = self._train_window.get(name) if window else None
        if values:
            return sum(values) / len(values)
        return float(metrics[name]) if name in metrics and name in self._val_keys else None

    def _refuse_missing(self, name: str, what: str, metrics: dict[str, Any]) -> None:
        logged = ", ".join(sorted(metrics)) or "none"
        fix = "name one of them in limits" if what == "limits" else f"set {what} to one of them"
        raise GuardConfigError(f"RewardHackingGuard: {what} {name!r} is not logged; the logged metrics are: {logged}. "
                         f"{fix[0].upper()}{fix[1:]}.")

    def _record(self, trainer: pl.Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
        """This validation's values; a monitored metric nobody logs is refused here."""
        gold = self._value(self.gold, metrics, window=False)
        if gold is None:
            self._refuse_missing(self.gold, "gold", metrics)
        train = self._value(self.train_metric, metrics, window=True)
        if train is None and self._steps_in_window > 0:
            self._refuse_missing(self.train_metric, "train_metric", metrics)
        record: dict[str, Any] = {"step": int(trainer.global_step), "gold": gold, "train": train}
        if self.diversity is not None:
            record["diversity"] = self._value(self.diversity, metrics, window=False)
            if record["diversity"] is None:
                self._refuse_missing(self.diversity, "diversity", metrics)
        record["limits"] = {}
        for name in self.limits:
            value = self._value(name, metrics, window=True)
            if value is None and (self._steps_in_window > 0 or name.startswith("val")):
                self._refuse_missing(name, "limits", metrics)
            record["limits"][name] = value
        return record

    def _judge(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Updates best / streak / diversity start with ``record``; the decision when a signal fires, else None."""
        gold, train, step = record["gold"], record["train"], record["step"]
        signals = []
        if self.diversity is not None:
            value = record["diversity"]
            if self.diversity_start is None:
                self.diversity_start = value
            elif value < self.min_diversity_fraction * self.diversity_start:
                signals.append(f"diversity: {self.diversity} {_fmt(value)} is below {self.min_diversity_fraction:g} "
                               f"of its start {_fmt(self.diversity_start)}")
        for name, value in record["limits"].items():
            if value is not None and value > self.limits[name]:
                signals.append(f"limit: {name} {_fmt(value)} is above its limit {self.limits[name]:g}")
        first_average = self.best is not None and self.best.get("train") is None and train is not None
        if first_average:
            self.best["train"] = train  # the best was the "before" validation: the first training average stands in
        if self.best is None or (gold > self.best["gold"] and not signals):  # a state that signals is no best
            self.best = dict(record)
            self.bad_streak = 0
            if self.action == "rollback":
                self._pending = [task for task in self._pending if task != "snapshot"] + ["snapshot"]
        else:
            fell = gold < self.best["gold"] - self.margin
            reference = self.best.get("train")
            rose = train is None or reference is None or train >= reference
            self.bad_streak = self.bad_streak + 1 if fell and rose else 0
            if self.bad_streak >= self.patience:
                signals.insert(0,
                    f"hacking: gold {self.gold} {_fmt(gold)} is {_fmt(self.best['gold'] - gold)} below its best "
                    f"{_fmt(self.best['gold'])} (step {self.best['step']}) for {self.bad_streak} validation(s) while "
                    + (f"{self.train_metric} is {_fmt(train)} (its first training average)" if first_average else
                       f"{self.train_metric} went {_fmt(reference)} -> {_fmt(train)}"))
        if not signals:
            return None
        action = self.action
        if action == "rollback":
            if not self.has_best_state and "snapshot" not in self._pending:
                action = "stop"  # nothing kept to roll back to
            elif self.rollbacks >= self.max_rollbacks:
                action = "rollback_and_stop"
        return {"step": step, "signals": signals, "action": action, "gold": gold, "train": train,
                "best_gold": self.best["gold"], "best_step": self.best["step"]}

    def _act(self, trainer: pl.Trainer, decision: dict[str, Any]) -> None:
        action, step = decision["action"], decision["step"]
        what = "; ".join(decision["signals"])
        if action == "warn":
            line = f"RewardHackingGuard at step {step}: {what}."
            rank_zero_warn(line)
        elif action == "stop":
            trainer.should_stop, self.stopped = True, True
            line = f"RewardHackingGuard stops training at step {step}: {what}."
        else:
            self.bad_streak = 0
            if action == "rollback":
                self.rollbacks += 1
                self._pending.append("restore")  # after a snapshot still due (no step since the best)
                changes = [f"kl_beta x{self.kl_multiplier:g}"] * (self.kl_multiplier != 1.0) + \
                          [f"lr / {self.lr_divisor:g}"] * (self.lr_divisor != 1.0)
                line = (f"RewardHackingGuard at step {step}: {what}; rollback {self.rollbacks} of {self.max_rollbacks} "
                        f"to the state of step {decision['best_step']}"
                        + (f" ({', '.join(changes)})" if changes else "") + ".")
            else:
                trainer.should_stop, self.stopped = True, True
                self._pending.append("restore_and_stop")
                line = (f"RewardHackingGuard stops training at step {step}: {what}; {self.rollbacks} rollback(s) "
                        f"done, the state of step {decision['best_step']} (gold {_fmt(decision['best_gold'])}) "
                        "restored.")
        if action != "warn":
            rank_zero_info(line)
        self.decisions.append({**decision, "message": line})

    def _log(self, trainer: pl.Trainer, record: dict[str, Any], decision: dict[str, Any] | None) -> None:
        values = {"guard/gold": record["gold"], "guard/gold_best": self.best["gold"],
                  "guard/bad_validations": float(self.bad_streak), "guard/triggered": float(decision is not None),
                  "guard/rollbacks": float(self.rollbacks), "guard/stopped": float(self.stopped)}
        if record["train"] is not None:
            values["guard/train"] = record["train"]
        if self.diversity is not None and self.diversity_start:
            values["guard/diversity_fraction"] = record["diversity"] / self.diversity_start
        record["logged"] = values
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    # ------------------------------------------------------------------ the best state
    @staticmethod
    def _kl_holders(trainer: pl.Trainer) -> list[pl.Callback]:
        return [cb for cb in trainer.callbacks if isinstance(getattr(cb, "kl_beta", None), (int, float))
                and cb.kl_beta > 0]

    def _do_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, []
        for task in pending:
            if task == "snapshot":
                self._keep(trainer, pl_module)
            else:
                self._restore(trainer, pl_module, adjust=task == "restore")

    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copies the trained weights, the optimizers' and the EMA callbacks' states (CPU, or a file)."""
        state = {
            "step": int(trainer.global_step),
            "params": copy_trained_parameters(pl_module, "RewardHackingGuard", "keep_best", "cpu"),
            "optimizers": [_cpu_copy(opt.state_dict()) for opt in trainer.optimizers],
            "callbacks": {cb.state_key: _cpu_copy(cb.state_dict()) for cb in trainer.callbacks if isinstance(cb, EMA)},
        }
        if self.keep_best == "memory":
            self._snapshot = state
            return
        folder = os.path.join(trainer.default_root_dir, "guard")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"best-rank{trainer.global_rank}.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a run killed while saving keeps the previous best
        self._snapshot_path = os.path.abspath(path)

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, adjust: bool) -> None:
        state = self._snapshot if self.keep_best == "memory" or self._snapshot is not None else \
            torch.load(self._snapshot_path, map_location="cpu", weights_only=True)
        restore_parameters(named_parameters_of(pl_module, state["params"], "RewardHackingGuard"), state["params"])
        for opt, saved in zip(trainer.optimizers, state["optimizers"]):
            rates = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(saved))  # a copy: the optimizer updates its state in place
            for group, lr in zip(opt.param_groups, rates):
                group["lr"] = lr
        by_key = {cb.state_key: cb for cb in trainer.callbacks if isinstance(cb, EMA)}
        for key, saved in state["callbacks"].items():
            if key in by_key:
                by_key[key].load_state_dict(_cpu_copy(saved))
        if not adjust:
            return
        if self.kl_multiplier != 1.0:
            for cb in self._kl_holders(trainer):
                cb.kl_beta = float(cb.kl_beta) * self.kl_multiplier
            self.kl_factor *= self.kl_multiplier
        if self.lr_divisor != 1.0:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] /= self.lr_divisor
                    if "initial_lr" in group:
                        group["initial_lr"] /= self.lr_divisor
            for config in trainer.lr_scheduler_configs:  # schedulers that compute from base rates keep the division
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [lr / self.lr_divisor for lr in config.scheduler.base_lrs]
