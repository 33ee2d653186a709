import logging
import warnings

import lightning as L
import pytest
import torch
from tiny import make_module, randomize_lora

from callbacks import EMA, OffPolicySampling
from flowrl.algorithms import ALGORITHMS, AWM
from flowrl.data import PromptDataModule
from flowrl.losses import AWM_WEIGHTINGS, awm_loss
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2
ADV = torch.tensor([1.5, -1.5, 0.5, -0.5])


def make_awm(path, **kw):
    return make_module(AWM, path, **{"num_train_timesteps": 2, **kw})


def test_registered_and_decoupled_flags(tiny_sd3_path):
    assert ALGORITHMS["awm"] is AWM and AWM.trainer_type == "awm"
    assert AWM.needs_log_prob is False and AWM.stores_trajectory is False
    module = make_awm(tiny_sd3_path, dynamics_type="ODE")
    assert module.clip_range == 1e-5  # AWM's own default (the seed's recommendation)
    assert module.rollout(PROMPTS).latents is None


@pytest.mark.parametrize("dynamics_type", ["ODE", "CPS", "Flow-SDE", "Dance-SDE"])
def test_any_sampler_is_accepted_and_trains(tiny_sd3_path, dynamics_type):
    """Decoupled: the rollout's sampler only makes x0; the first loss on it is finite and on-policy exactly 1."""
    noise = {} if dynamics_type == "ODE" else {"noise_level": 0.5}
    module = make_awm(tiny_sd3_path, dynamics_type=dynamics_type, **noise)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    units = module.training_units(rollout)
    out = module.training_loss(rollout, ADV, torch.arange(4), units[0])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.equal(out["ratio"], torch.ones_like(out["ratio"]))


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
@pytest.mark.parametrize("train_guidance_scale", [1.0, 2.5])
def test_on_policy_ratio_is_exactly_one_through_the_module(tiny_sd3_path, weighting, train_guidance_scale):
    module = make_awm(tiny_sd3_path, awm_weighting=weighting, train_guidance_scale=train_guidance_scale,
                      time_sampling_strategy="uniform")
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    units = module.training_units(rollout)
    for sl in module.sampler.chunks(4):
        idx = torch.arange(4)[sl]
        for k in units:
            out = module.training_loss(rollout, ADV, idx, k)
            assert torch.equal(out["ratio"], torch.ones_like(out["ratio"])), out["ratio"]
            assert out["approx_kl"] == 0 and out["clip_fraction"] == 0


def test_loss_equals_the_loss_function(tiny_sd3_path):
    module = make_awm(tiny_sd3_path, awm_weighting="ghuber", ghuber_power=0.5, clip_range=1e-3)
    rollout = module.rollout(PROMPTS)
    units = module.training_units(rollout)
    randomize_lora(module)  # an update after the rollout: ratios move away from 1
    idx = torch.tensor([2, 3])
    for k in units:
        out = module.training_loss(rollout, ADV, idx, k)
        x0, eps, t = rollout.final[idx], rollout.forward.noise[k, idx], rollout.forward.times[idx, k]
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = module.policy.velocity(x_t, t, rollout.cond.select(idx), 1.0)
        expected = awm_loss(v, rollout.forward.v_old[k, idx], eps - x0, t, ADV[idx], "ghuber", 1e-3, 5.0, 0.5)
        assert torch.equal(out["loss"], expected["loss"]) and torch.equal(out["ratio"], expected["ratio"])
        assert not torch.equal(out["ratio"], torch.ones_like(out["ratio"]))


def test_loud_warning_without_any_constraint(tiny_sd3_path, caplog):
    for clip_range in (None,):  # (0 is refused: null is how clipping is disabled)
        with pytest.warns(UserWarning, match="no constraint"), caplog.at_level(logging.WARNING):
            make_awm(tiny_sd3_path, clip_range=clip_range, ema_kl_beta=0.0)
        assert "ema_kl_beta: 0.1" in caplog.text
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no constraint.*")
        make_awm(tiny_sd3_path, clip_range=None, ema_kl_beta=0.1)
        make_awm(tiny_sd3_path, clip_range=1e-5, ema_kl_beta=0.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(awm_weighting="t**3"), "awm_weighting"),
        (dict(ghuber_power=0.0), "ghuber_power"),
        (dict(ema_kl_beta=-1.0), "ema_kl_beta"),
        (dict(time_sampling_strategy="discrete_wo_init", timestep_fraction=0.25), "raise timestep_fraction"),
    ],
)
def test_configuration_errors(tiny_sd3_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_awm(tiny_sd3_path, **kw)


def test_ema_kl_without_ema_fails_at_fit_start_naming_the_fix(tiny_sd3_path, prompt_file):
    module = make_awm(tiny_sd3_path, ema_kl_beta=0.1)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    with pytest.raises(ValueError, match=r"add callbacks\.EMA to trainer\.callbacks.*ema_kl_beta: 0"):
        trainer.fit(module, datamodule=dm)
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


class RecordingAWM(AWM):
    def training_units(self, rollout):
        units = super().training_units(rollout)
        self.rollouts = getattr(self, "rollouts", []) + [rollout]
        return units


def test_ema_velocity_on_and_off_policy(tiny_sd3_path, prompt_file):
    """Off-policy the EMA is the sampling policy (v_ema is v_old); on-policy v_ema is its own pass."""
    for off_policy in (True, False):
        module = RecordingAWM(PolicyConfig(tiny_sd3_path, lora_rank=4), rewards=[RewardSpec("jpeg_incompressibility")],
                              group_size=2, resolution=16, num_inference_steps=4, guidance_scale=3.0,
                              train_batch_size=2, num_train_timesteps=2, ema_kl_beta=0.1,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        randomize_lora(module)
        ema = EMA(ema_decay=1.0)
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, use_distributed_sampler=False,
                            callbacks=[ema, OffPolicySampling(off_policy=off_policy)])
        trainer.fit(module, datamodule=PromptDataModule(prompt_file, group_size=2, batch_size=4))
        last = module.rollouts[-1].forward
        if off_policy:
            assert last.v_ema is last.v_old
        else:  # the second iteration samples with the trained weights; the EMA stayed at the initial ones
            assert not torch.allclose(last.v_ema, last.v_old)
        assert "train/ema_kl_loss" in trainer.logged_metrics


def test_fit_runs_awm_steps_and_logs(tiny_sd3_path, prompt_file, tmp_path):
    module = make_awm(tiny_sd3_path, dynamics_type="CPS", awm_weighting="t", ema_kl_beta=0.1,
                      gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    dm = PromptDataModule(prompt_file, val_prompts=["a red circle", "a cat"], group_size=2, batch_size=4,
                          val_batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                        limit_val_batches=1, val_check_interval=1, use_distributed_sampler=False,
                        callbacks=[EMA(ema_decay=0.9, ema_decay_schedule="power"), OffPolicySampling()])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and module.iteration == 2
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())
    for key in ["train/loss", "train/policy_loss", "train/ratio_mean", "train/ratio_min", "train/clip_fraction",
                "train/approx_kl", "train/ema_kl_loss", "train/grad_norm", "val/reward"]:
        assert key in trainer.logged_metrics, key
