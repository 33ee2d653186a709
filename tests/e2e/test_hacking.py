"""The toy case that hacks, with and without callbacks.RewardHackingGuard.

``lightning_configs/toy/hacking.yaml`` trains on JPEG compressibility (a proxy: shapes shrink and vanish) and scores
the verifier at validation only. Shrunk to a few iterations, the run must show the hacking signature: held-out
accuracy (the gold metric) clearly below its best while the training reward rose. ``hacking_guard.yaml`` is the
same run with the guard in ``rollback`` mode: it must detect the fall, roll back, and end the run with the
best-gold state: a validation after training scores at least the best gold value (the eval sampler is
deterministic, so the restored state scores it exactly).
The full-length curves of both runs: ``benchmarks/hacking.py`` (``benchmarks/hacking.png``).
"""

from __future__ import annotations

import os

import lightning as L
import pytest

from callbacks import RewardHackingGuard
from flowrl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLD = "val/shapes_acc_overall"
#: the short run: 6 iterations, validations before training and at iterations 3 and 6. Measured (seed 0, float32):
#: held-out accuracy 0.29 -> 0.13 -> 0.06 while the training reward's mean went -1.05 (iterations 1-3) -> -0.97
#: (4-6); with the guard, a rollback at iteration 3 and the best (before-training) state restored at the end
SHORT = ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
         "--trainer.logger=false", "--trainer.precision=32-true"]
FALL = 0.05  # the gold metric's fall below its best that counts as measurable (the guard's margin)


class Curves(L.Callback):
    """The gold metric at every whole validation (the "before" one included) and the training reward per step."""

    def __init__(self):
        self.gold: list[tuple[int, float]] = []
        self.train: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(float(trainer.callback_metrics["train/reward_mean"]))

    def on_validation_end(self, trainer, pl_module):
        if GOLD in trainer.callback_metrics:
            self.gold.append((trainer.global_step, float(trainer.callback_metrics[GOLD])))


def run(config: str) -> tuple:
    cli = main(["--config", os.path.join(ROOT, "lightning_configs", "toy", config), *SHORT], run=False)
    curves = Curves()
    cli.trainer.callbacks.append(curves)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, curves


@pytest.mark.toy_learning
def test_without_the_guard_the_gold_metric_falls_while_the_training_reward_rises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli, curves = run("hacking.yaml")
    steps, gold = zip(*curves.gold)
    assert steps == (0, 3, 6), curves.gold
    print("gold without the guard:", curves.gold, "training reward:", [round(r, 3) for r in curves.train])
    assert gold[-1] < max(gold) - FALL, f"held-out accuracy did not fall measurably: {curves.gold}"
    assert sum(curves.train[3:]) / 3 > sum(curves.train[:3]) / 3, curves.train  # the proxy went up meanwhile


@pytest.mark.toy_learning
def test_with_the_guard_the_run_rolls_back_and_ends_at_its_best_gold_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli, curves = run("hacking_guard.yaml")
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RewardHackingGuard)]
    print("gold with the guard:", curves.gold, "decisions:", [d["message"] for d in guard.decisions])
    acted = [d for d in guard.decisions if d["action"] in ("rollback", "rollback_and_stop")]
    assert acted and any(s.startswith(("hacking", "diversity")) for s in acted[0]["signals"]), guard.decisions
    assert acted[0]["gold"] < guard.best["gold"] - FALL
    assert guard.rollbacks >= 1
    # after training: the state the run ended with, validated again
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0][GOLD]
    assert after >= guard.best["gold"] - 1e-6, (after, guard.best)
