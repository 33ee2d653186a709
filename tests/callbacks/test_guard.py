"""callbacks.RewardHackingGuard on a tiny Lightning module whose logged metrics follow a script.

The module logs ``train/reward`` at every step and ``val/gold`` (and ``val/diversity``) at every validation from
constructed histories, so each test knows exactly when the guard must fire; its weights, Adam state and an EMA
really train, so a rollback can be checked for an exact restore.
"""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EMA, ReferenceModel, RewardHackingGuard

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*callbacks used to create the checkpoint.*",
    "ignore:.*checkpoint that ended before the epoch ended.*",
    "ignore:.*is not a public API.*",
)

EVERY = 3  # a validation every 3 steps: at steps 0 (the "before" validation), 3, 6, 9, 12


class Scripted(LightningModule):
    """``val/gold`` of validation ``i`` (0: before training) is ``gold[i]``; ``train/reward`` at step ``s`` is
    ``train(s)``; the weights train for real (Adam)."""

    def __init__(self, gold, train=lambda step: 0.1 * step, diversity=None, log_train=True):
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.gold, self.train, self.diversity, self.log_train = gold, train, diversity, log_train
        self.validations = 0

    def training_step(self, batch, batch_idx):
        if self.log_train:
            self.log("train/reward", float(self.train(self.global_step)))
        return (self.layer(batch[0]) - 1.0).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/gold", float(self.gold[self.validations]), batch_size=1)
        if self.diversity is not None:
            self.log("val/diversity", float(self.diversity[self.validations]), batch_size=1)

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class Collect(Logger):
    """Keeps what is logged, by step."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "collect", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass

    def guard_rows(self):
        return [(s, m) for s, m in self.rows if any(k.startswith("guard/") for k in m)]


class States(Callback):
    """The trained weights, Adam state and EMA state at every training step's start (after the guard's restore)."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))  # (every test that uses States has one)
        opt = trainer.optimizers[0].state_dict()
        self.at[trainer.global_step] = {
            "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "adam": {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
            "ema": {k: v.clone() for k, v in ema.averaged_parameters.items()},
            "ema_updates": ema.num_updates,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }


def assert_same_state(a, b):
    for key in ("params", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["adam"].keys() == b["adam"].keys()
    for i in a["adam"]:
        assert all(torch.equal(a["adam"][i][k], b["adam"][i][k]) for k in a["adam"][i])
    assert a["ema_updates"] == b["ema_updates"]


def fit(module, guard, *extra, max_steps=12, sanity=-1, logger=None, ckpt_path=None, root=None):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = Trainer(max_steps=max_steps, val_check_interval=EVERY, check_val_every_n_epoch=None,
                      limit_val_batches=1, num_sanity_val_steps=sanity, accelerator="cpu", logger=logger or False,
                      enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in extra),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, *extra],
                      default_root_dir=root)
    trainer.fit(module, data, data, ckpt_path=ckpt_path)
    return trainer


# gold at validations 0 (before), 3, 6, 9, 12: best at step 3, then more than the margin below it from step 6 on
HACKED = [0.50, 0.60, 0.50, 0.45, 0.40]


def test_warn_fires_after_patience_validations_and_training_goes_on():
    logger = Collect()
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=2)
    with pytest.warns(UserWarning, match=r"RewardHackingGuard at step 9: hacking: gold val/gold 0.45 is 0.15 below "
                                         r"its best 0.6 \(step 3\) for 2 validation\(s\) while train/reward went"):
        trainer = fit(Scripted(HACKED), guard, logger=logger)
    assert trainer.global_step == 12  # warn only
    assert [d["step"] for d in guard.decisions] == [9, 12] and {d["action"] for d in guard.decisions} == {"warn"}
    assert [r["step"] for r in guard.history] == [0, 3, 6, 9, 12]
    assert [r["gold"] for r in guard.history] == pytest.approx(HACKED)
    # the training reward averaged over the window of each validation: steps 0-2 log 0.0, 0.1, 0.2 ...
    assert [r["train"] for r in guard.history] == pytest.approx([None, 0.1, 0.4, 0.7, 1.0])
    assert guard.best["step"] == 3 and guard.best["gold"] == pytest.approx(0.6)
    rows = dict(logger.guard_rows())
    assert sorted(rows) == [0, 3, 6, 9, 12]
    assert [rows[s]["guard/bad_validations"] for s in (3, 6, 9, 12)] == [0, 1, 2, 3]
    assert [rows[s]["guard/triggered"] for s in (0, 3, 6, 9, 12)] == [0, 0, 0, 1, 1]
    assert rows[6]["guard/gold_best"] == pytest.approx(0.6) and rows[6]["guard/train"] == pytest.approx(0.4)


def test_no_signal_when_the_training_reward_falls_with_the_gold_metric():
    """Both falling is not the hacking signature (the run is just getting worse): no decision."""
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=1)
    fit(Scripted(HACKED, train=lambda step: 1.0 - 0.1 * step), guard)
    assert guard.decisions == [] and guard.bad_streak == 0


def test_stop_ends_training_at_the_signal_with_a_line_naming_it(caplog):
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=2, action="stop")
    trainer = fit(Scripted(HACKED), guard)
    assert trainer.global_step == 9 and guard.stopped
    (decision,) = guard.decisions
    assert decision["action"] == "stop" and decision["step"] == 9
    assert decision["message"].startswith("RewardHackingGuard stops training at step 9: hacking: gold val/gold 0.45")
    assert "train/reward went 0.1 -> 0.7" in decision["message"] and "\n" not in decision["message"]


def test_a_fall_from_the_before_training_validation_compares_with_the_first_training_average():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=1, action="stop")
    trainer = fit(Scripted([0.60, 0.50, 0.40, 0.40, 0.40]), guard)
    assert trainer.global_step == 3 and guard.best["step"] == 0
    assert guard.decisions[0]["message"] == (
        "RewardHackingGuard stops training at step 3: hacking: gold val/gold 0.5 is 0.1 below its best 0.6 (step 0) "
        "for 1 validation(s) while train/reward is 0.1 (its first training average).")


def test_diversity_and_limit_signals_fire_at_once():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", diversity="val/diversity",
                               min_diversity_fraction=0.5, limits={"train/reward": 0.65}, action="stop")
    trainer = fit(Scripted([0.5, 0.6, 0.7, 0.8, 0.9], diversity=[0.4, 0.3, 0.3, 0.1, 0.1]), guard)
    # step 6: the training reward's window mean is 0.4 (below the limit); step 9: 0.7 > 0.65 and diversity 0.1 < 0.2
    assert trainer.global_step == 9
    (decision,) = guard.decisions
    assert decision["signals"] == ["diversity: val/diversity 0.1 is below 0.5 of its start 0.4",
                                   "limit: train/reward 0.7 is above its limit 0.65"]
    assert guard.best["step"] == 6  # a validation that signals is never the best, even with the highest gold


def test_rollback_restores_exactly_the_best_weights_optimizer_and_ema_then_goes_on():
    states, ref = States(), ReferenceModel(kl_beta=0.1)
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=2,
                               action="rollback", kl_multiplier=10.0, lr_divisor=2.0, max_rollbacks=2)
    trainer = fit(Scripted(HACKED), guard, EMA(ema_decay=0.9), ref, states)
    assert trainer.global_step == 12 and not guard.stopped  # the run went on after the rollback
    (decision,) = guard.decisions
    assert decision["action"] == "rollback" and decision["step"] == 9 and guard.rollbacks == 1
    assert "rollback 1 of 2 to the state of step 3 (kl_beta x10, lr / 2)" in decision["message"]
    # the state at step 9's first batch (after the restore) is the state at step 3's first batch (after the best)
    assert_same_state(states.at[9], states.at[3])
    assert not torch.equal(states.at[6]["params"]["layer.weight"], states.at[3]["params"]["layer.weight"])
    assert states.at[9]["lr"] == pytest.approx(0.025) and states.at[8]["lr"] == pytest.approx(0.05)
    assert ref.kl_beta == pytest.approx(1.0) and guard.kl_factor == pytest.approx(10.0)


def test_after_max_rollbacks_the_next_signal_restores_the_best_state_and_stops(tmp_path):
    states = States()
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=1,
                               action="rollback", max_rollbacks=1, keep_best="disk")
    module = Scripted(HACKED)
    trainer = fit(module, guard, EMA(ema_decay=0.9), states, root=str(tmp_path))
    assert [d["action"] for d in guard.decisions] == ["rollback", "rollback_and_stop"]
    assert [d["step"] for d in guard.decisions] == [6, 9] and trainer.global_step == 9 and guard.stopped
    assert (tmp_path / "guard" / "best-rank0.pt").exists()
    # the run ends with the best-gold weights (step 3), restored at the end of training
    final = {k: v.detach() for k, v in module.named_parameters()}
    assert all(torch.equal(final[k], states.at[3]["params"][k]) for k in final)


def test_load_best_at_end_ends_the_run_with_the_best_state_when_no_signal_fired():
    states = States()
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=1,
                               action="rollback", load_best_at_end=True)
    module = Scripted([0.50, 0.60, 0.58, 0.59, 0.57])  # never more than the margin below the best (step 3)
    fit(module, guard, EMA(ema_decay=0.9), states)
    assert [d["action"] for d in guard.decisions] == ["load_best_at_end"]
    assert guard.decisions[0]["message"] == ("RewardHackingGuard: training ended at step 12; the state of step 3 "
                                             "(best gold 0.6) restored (load_best_at_end).")
    final = {k: v.detach() for k, v in module.named_parameters()}
    assert all(torch.equal(final[k], states.at[3]["params"][k]) for k in final)


def test_load_best_at_end_keeps_the_weights_when_the_last_validation_is_the_best():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", action="rollback", load_best_at_end=True)
    module = Scripted([0.50, 0.60, 0.58, 0.59, 0.70])
    fit(module, guard)
    assert guard.decisions == [] and guard.best["step"] == 12


def test_resume_keeps_history_best_rollbacks_the_kept_state_and_the_kl_factor(tmp_path):
    """A run resumed from a checkpoint written at a validation goes on with the guard's whole state: the history, the
    best, the rollbacks done, a rollback still to do, the kept best state and the KL factor."""
    def make():
        return (RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=1,
                                   action="rollback", kl_multiplier=3.0, max_rollbacks=2),
                ReferenceModel(kl_beta=0.1), EMA(ema_decay=0.9), States())
    guard, ref, ema, states = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # written at the end of every validation
    fit(Scripted(HACKED), guard, ref, ema, states, ckpt, max_steps=10)
    assert [(d["step"], d["action"]) for d in guard.decisions] == [(6, "rollback"), (9, "rollback")]
    assert ref.kl_beta == pytest.approx(0.1 * 3 * 3)

    resumed, ref2, ema2, states2 = make()
    module = Scripted(HACKED)
    module.validations = 4  # the script goes on where the checkpoint (validation at step 9) left it
    trainer = fit(module, resumed, ref2, ema2, states2, ModelCheckpoint(dirpath=tmp_path / "2"),
                  ckpt_path=str(tmp_path / "last.ckpt"))
    assert [r["step"] for r in resumed.history] == [0, 3, 6, 9, 12] and resumed.best["step"] == 3
    # the checkpoint held kl_factor 3 (one rollback applied) and step 9's rollback still to do
    assert ref2.kl_beta == pytest.approx(0.1 * 3 * 3) and resumed.kl_factor == pytest.approx(9.0)
    assert_same_state(states2.at[9], states.at[3])  # the kept best state travelled with the checkpoint
    assert [(d["step"], d["action"]) for d in resumed.decisions] == [(6, "rollback"), (9, "rollback"),
                                                                     (12, "rollback_and_stop")]
    assert trainer.global_step == 12 and resumed.stopped


def test_state_dict_round_trip():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", margin=0.05, patience=2)
    fit(Scripted(HACKED), guard, max_steps=9)
    other = RewardHackingGuard(gold="val/gold", train_metric="train/reward")
    other.load_state_dict(guard.state_dict())
    assert other.history == guard.history and other.decisions == guard.decisions and other.best == guard.best
    assert other.bad_streak == guard.bad_streak == 2
    with pytest.raises(KeyError, match="was it saved by this callback"):
        other.load_state_dict({"history": []})


def test_a_partial_sanity_check_is_not_a_validation():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward")
    module = Scripted([0.5] * 6)
    fit(module, guard, sanity=1, max_steps=6)
    # a sanity check of a few batches (Lightning's default) is a glimpse, not the "before" validation: only
    # num_sanity_val_steps=-1 (the whole validation) is one
    assert [r["step"] for r in guard.history] == [3, 6]


def test_a_gold_metric_nobody_logs_is_refused_at_the_first_validation_before_training():
    guard = RewardHackingGuard(gold="val/accuracy", train_metric="train/reward")
    with pytest.raises(ValueError) as err:
        fit(Scripted(HACKED), guard)
    message = str(err.value)
    assert message == ("RewardHackingGuard: gold 'val/accuracy' is not logged; the logged metrics are: val/gold. "
                       "Set gold to one of them.")
    assert guard.history == []


def test_a_train_metric_nobody_logs_is_refused_at_the_first_validation_after_training_steps():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward_mean")
    with pytest.raises(ValueError, match=r"train_metric 'train/reward_mean' is not logged; the logged metrics are: "
                                         r"train/reward, val/gold\. Set train_metric to one of them\.$"):
        fit(Scripted(HACKED), guard)
    assert [r["step"] for r in guard.history] == [0]  # the "before" validation passed, step 3's refused


@pytest.mark.parametrize("kwargs, match", [
    ({"diversity": "val/diversity_pixel"}, r"diversity 'val/diversity_pixel' is not logged; the logged metrics are: "
                                           r"val/gold\. Set diversity to one of them\.$"),
    ({"limits": {"val/velocity_drift": 0.3}}, r"limits 'val/velocity_drift' is not logged; the logged metrics are: "
                                              r"val/gold\. Name one of them in limits\.$"),
])
def test_a_diversity_or_validation_limit_nobody_logs_is_refused_before_training(kwargs, match):
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", **kwargs)
    module = Scripted(HACKED)
    with pytest.raises(ValueError, match=match):
        fit(module, guard)
    assert module.global_step == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"action": "revert"}, "unknown action 'revert'; choose one of warn, stop, rollback"),
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"margin": -0.1}, "margin must be a finite number >= 0"),
    ({"min_diversity_fraction": 1.5}, r"min_diversity_fraction must be in \(0, 1\]"),
    ({"kl_multiplier": 10.0}, "kl_multiplier, lr_divisor and load_best_at_end act with the kept best state; set "
                              "action: rollback"),
    ({"load_best_at_end": True, "action": "stop"}, "load_best_at_end act with the kept best state"),
    ({"lr_divisor": 0.5, "action": "rollback"}, "lr_divisor must be a finite number >= 1"),
    ({"keep_best": "gpu"}, "unknown keep_best 'gpu'; choose one of memory, disk"),
    ({"train_metric": "val/gold"}, "gold and train_metric must be two different metric names"),
])
def test_bad_options_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        RewardHackingGuard(gold="val/gold", **kwargs)
    assert "\n" not in str(err.value)


def test_a_kl_multiplier_without_a_kl_coefficient_is_refused_at_setup():
    guard = RewardHackingGuard(gold="val/gold", train_metric="train/reward", action="rollback", kl_multiplier=10.0)
    with pytest.raises(ValueError, match="kl_multiplier=10 but no callback has a kl_beta > 0; add "
                                         "callbacks.ReferenceModel with kl_beta > 0"):
        fit(Scripted(HACKED), guard, ReferenceModel(kl_beta=0.0))


def test_flowrl_fit_refuses_a_gold_metric_nobody_logs_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the CLI the refusal is one ``error:`` line and status 2, as flowrl's own refusals."""
    import os

    from flowrl.cli import console_main

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.chdir(tmp_path)
    guard = '[{class_path: callbacks.RewardHackingGuard, init_args: {gold: val/not_logged}}]'
    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", os.path.join(root, "lightning_configs", "toy", "nft.yaml"),
                      f"--trainer.callbacks+={guard}", "--trainer.max_steps=1", "--trainer.accelerator=cpu",
                      "--trainer.precision=32-true", "--data.max_val_prompts=1", "--data.val_samples_per_prompt=2",
                      "--model.eval.num_inference_steps=2", "--trainer.logger=false"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "val/not_logged" in err and "Traceback" not in err
