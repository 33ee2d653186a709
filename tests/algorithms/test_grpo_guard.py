"""GRPO-Guard (trainer_type grpo-guard): RatioNorm ratio with per-step 1/(-dt) reweighting, Flow-SDE only."""

import math

import lightning as L
import pytest
import torch
from tiny import make_module

from flowrl.algorithms import ALGORITHMS, GRPOGuard
from flowrl.data import PromptDataModule
from flowrl.dynamics import FlowSDE
from flowrl.losses import grpo_guard_loss

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2


def make_guard(path, **kw):
    return make_module(GRPOGuard, path, **{"clip_range": 1e-2, **kw})


def test_registered_and_stores_means():
    assert ALGORITHMS["grpo-guard"] is GRPOGuard
    assert GRPOGuard.trainer_type == "grpo-guard" and GRPOGuard.stores_means and GRPOGuard.needs_log_prob


@pytest.mark.parametrize("dynamics_type", ["Dance-SDE", "CPS", "ODE"])
def test_only_flow_sde(tiny_sd3_path, dynamics_type):
    with pytest.raises(ValueError, match="dynamics: flowrl.dynamics.FlowSDE"):
        make_guard(tiny_sd3_path, dynamics_type=dynamics_type)


def test_zero_noise_level_is_refused(tiny_sd3_path):
    with pytest.raises(ValueError, match="noise_level > 0"):
        make_guard(tiny_sd3_path, noise_level=0.0)


def test_on_policy_ratio_is_one_and_loss_matches_the_formula(tiny_sd3_path):
    module = make_guard(tiny_sd3_path, noise_level=0.7)
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.normal_(0, 0.05)
    rollout = module.rollout(PROMPTS)
    assert rollout.means is not None and rollout.means.shape == rollout.latents.shape
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for sl in module.sampler.chunks(4):
        idx = torch.arange(4)[sl]
        for k in module.training_units(rollout):
            out = module.training_loss(rollout, advantages, idx, k)
            assert torch.equal(out["ratio"], torch.ones_like(out["ratio"])), out["ratio"]
            step = rollout.train_steps[k]
            s, s_next = rollout.sigmas[step].item(), rollout.sigmas[step + 1].item()
            scale = FlowSDE(0.7).std_dev_t(s, s_next).item() * math.sqrt(s - s_next)
            # on-policy: ratio 1, so the loss is mean(-A) / (-dt)
            assert torch.allclose(out["loss"], (-advantages[idx]).mean() / (s - s_next), rtol=1e-6)
            assert module.step_scale(s, s_next) == pytest.approx((scale, s_next - s), rel=1e-6)


def test_loss_equals_grpo_guard_loss_after_an_update(tiny_sd3_path):
    module = make_guard(tiny_sd3_path)
    rollout = module.rollout(PROMPTS)
    with torch.no_grad():  # the policy moves away from the one that sampled
        for p in module.policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    idx, k = torch.arange(2), 0
    out = module.training_loss(rollout, advantages, idx, k)
    new, _, s, s_next = module.step_forward(rollout, idx, k)
    scale = float(module.dynamics.std_dev_t(s, s_next)) * math.sqrt(s - s_next)
    expected = grpo_guard_loss(new.log_prob, rollout.log_probs[idx, k], new.mean, rollout.means[idx, k], scale,
                               s_next - s, advantages[idx], module.clip_range, module.adv_clip_range)
    assert torch.allclose(out["loss"], expected["loss"]) and torch.allclose(out["ratio"], expected["ratio"])
    assert not torch.equal(out["ratio"], torch.ones(2))
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.trainable_parameters())


def test_fit_runs_and_logs(tiny_sd3_path, prompt_file):
    module = make_guard(tiny_sd3_path)
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    assert module.iteration == 1
    for key in ("train/loss", "train/ratio_mean", "train/clip_fraction", "train/approx_kl"):
        assert key in trainer.logged_metrics
