"""Flow-DPPO (flowrl.algorithms.dppo.FlowDPPO): the exact transition KL and the KL-masked loss on hand-computed
numbers, exact on-policy KL 0 / ratio 1 on every SDE dynamics, one LoRA optimizer step on every model family, and
its options' range checks."""

import math

import lightning as L
import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, make_module, randomize_lora

from flowrl.advantages import group_advantages
from flowrl.algorithms.dppo import FlowDPPO
from flowrl.data import PromptDataModule
from flowrl.errors import ConfigError
from flowrl.losses.dppo import dppo_loss, transition_kl

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])


# ----------------------------------------------------------------------------------------- the pure functions


def test_transition_kl_by_hand():
    # sample 0: shift (1, 2) -> squares (1, 4), mean 2.5; std 0.5: 2.5 / (2 * 0.25) = 5
    # sample 1: shift (1, -1) -> squares (1, 1), mean 1;   std 2:   1 / (2 * 4)     = 0.125
    mean = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    old = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    kl = transition_kl(mean, old, torch.tensor([0.5, 2.0]).reshape(2, 1))
    assert kl.dtype == torch.float32 and kl.shape == (2,)
    assert torch.allclose(kl, torch.tensor([5.0, 0.125]))
    # a scalar std is every sample's; no std (add_kl_coefficient false): mean of squares / 2 = 1.25, 0.5
    assert torch.allclose(transition_kl(mean, old, 2.0), torch.tensor([2.5 / 8, 0.125]))
    assert torch.allclose(transition_kl(mean, old, None), torch.tensor([1.25, 0.5]))


def test_transition_kl_is_exactly_zero_for_equal_means_and_on_deterministic_steps():
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(transition_kl(x, x.clone(), torch.tensor([0.3, 0.1, 1e-4])), torch.zeros(3))
    # a step of std 0 (CPS at sigma_next 0): no finite KL; defined 0 like its log-prob, not inf or nan
    kl = transition_kl(x + 1.0, x, torch.tensor([0.0, 0.5, 0.0]))
    assert kl[0] == 0 and kl[2] == 0 and torch.isclose(kl[1], torch.tensor(1.0 / (2 * 0.25)))


def test_transition_kl_matches_the_full_gaussian_kl_over_the_dims():
    """The mean-over-dims KL is the whole step's exact KL (torch.distributions) divided by the number of dims."""
    torch.manual_seed(0)
    mean, old, std = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 0.7
    full = torch.distributions.kl_divergence(torch.distributions.Normal(old, std), torch.distributions.Normal(mean, std))
    assert torch.allclose(transition_kl(mean, old, std), full.reshape(2, -1).sum(1) / 48, rtol=1e-5)


def test_transition_kl_gradient_only_through_the_new_mean():
    mean = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]], requires_grad=True)
    transition_kl(mean, old, 1.0).sum().backward()
    # d/dm mean((m - o)^2) / 2 = (m - o) / 2 per dim
    assert torch.allclose(mean.grad, torch.tensor([[0.5, 1.0]])) and old.grad is None


def test_dppo_loss_by_hand():
    # threshold 0.1. Per sample (ratio, A, KL):
    #   0: (1.5,  1, 0.2)  outside, probability already up for A > 0   -> masked (positive side)
    #   1: (0.5, -2, 0.3)  outside, probability already down for A < 0 -> masked (negative side)
    #   2: (1.5, -1, 0.5)  outside but corrective (A < 0, ratio > 1)   -> kept: -A * ratio = 1.5
    #   3: (2.0,  2, 0.05) inside                                       -> kept: -A * ratio = -4
    # loss = (0 + 0 + 1.5 - 4) / 4 = -0.625; d loss / d log_prob = -A * ratio / 4 = (0, 0, 0.375, -1)
    ratio = torch.tensor([1.5, 0.5, 1.5, 2.0])
    old = torch.tensor([-1.0, 0.3, 2.0, 0.0])
    lp = (old + ratio.log()).requires_grad_(True)
    out = dppo_loss(lp, old, torch.tensor([0.2, 0.3, 0.5, 0.05]), torch.tensor([1.0, -2.0, -1.0, 2.0]), 0.1)
    assert torch.isclose(out["loss"], torch.tensor(-0.625))
    assert torch.allclose(out["ratio"], ratio)
    out["loss"].backward()
    assert torch.allclose(lp.grad, torch.tensor([0.0, 0.0, 0.375, -1.0]))
    assert lp.grad[0] == 0 and lp.grad[1] == 0  # masked samples: exactly no gradient
    assert out["masked_fraction"] == 0.5 and out["pos_masked_fraction"] == 0.25 and out["neg_masked_fraction"] == 0.25
    assert out["kl_exceeded_fraction"] == 0.75
    assert torch.isclose(out["kl_old_mean"], torch.tensor(0.2625)) and torch.isclose(out["kl_old_max"], torch.tensor(0.5))
    logs = torch.log(ratio)
    assert torch.isclose(out["approx_kl"], 0.5 * (logs**2).mean())


def test_dppo_loss_bound_is_inclusive_and_one_for_both_signs():
    # KL exactly at the bound counts as outside (the references' kl >= threshold); the same bound for A > 0 and A < 0
    lp, old = torch.log(torch.tensor([2.0, 0.5])), torch.zeros(2)
    out = dppo_loss(lp, old, torch.tensor([0.1, 0.1]), torch.tensor([1.0, -1.0]), 0.1)
    assert out["masked_fraction"] == 1.0 and out["loss"] == 0
    out = dppo_loss(lp, old, torch.tensor([0.0999, 0.0999]), torch.tensor([1.0, -1.0]), 0.1)
    assert out["masked_fraction"] == 0.0 and torch.isclose(out["loss"], torch.tensor((-2.0 + 0.5) / 2))


def test_dppo_loss_zero_advantages_of_an_all_equal_group():
    """A group whose rewards are all equal gets advantage 0: nothing is masked (neither sign), loss and gradient 0."""
    adv = group_advantages(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 0, 0]))
    assert torch.equal(adv, torch.zeros(3))
    lp = torch.tensor([0.4, -0.2, 0.0], requires_grad=True)
    out = dppo_loss(lp, torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]), adv, 1e-5)
    out["loss"].backward()
    assert out["loss"] == 0 and out["masked_fraction"] == 0 and torch.equal(lp.grad, torch.zeros(3))


def test_dppo_loss_group_of_two():
    # rewards (1, 3): mean 2, population std 1 -> A = (-1, 1) / (1 + 1e-4)
    adv = group_advantages(torch.tensor([1.0, 3.0]), torch.tensor([7, 7]))
    a = 1.0 / (1.0 + 1e-4)
    assert torch.allclose(adv, torch.tensor([-a, a]))
    # ratios (0.8, 1.25), both KLs over the bound: both move away (A < 0 down, A > 0 up) -> both masked
    lp = torch.log(torch.tensor([0.8, 1.25])).requires_grad_(True)
    out = dppo_loss(lp, torch.zeros(2), torch.tensor([1e-3, 1e-3]), adv, 1e-5)
    out["loss"].backward()
    assert out["masked_fraction"] == 1.0 and out["loss"] == 0 and torch.equal(lp.grad, torch.zeros(2))
    # inside the bound: plain -A * ratio, mean over the two: (a * 0.8 - a * 1.25) / 2
    out = dppo_loss(torch.log(torch.tensor([0.8, 1.25])), torch.zeros(2), torch.tensor([0.0, 0.0]), adv, 1e-5)
    assert torch.isclose(out["loss"], torch.tensor(a * (0.8 - 1.25) / 2))


def test_dppo_loss_clamps_advantages_with_adv_clip_range():
    # A = 10 clamped to 5: -5 * ratio 1 = -5; unclamped (None): -10
    lp = torch.zeros(1)
    assert dppo_loss(lp, lp, torch.zeros(1), torch.tensor([10.0]), 1e-5, 5.0)["loss"] == -5.0
    assert dppo_loss(lp, lp, torch.zeros(1), torch.tensor([10.0]), 1e-5, None)["loss"] == -10.0


def test_masked_sample_with_an_overflowing_ratio_gives_no_nan():
    lp = torch.tensor([200.0, 0.1], requires_grad=True)  # exp(200) overflows float32
    out = dppo_loss(lp, torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), 1e-5)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(lp.grad).all() and lp.grad[0] == 0
    assert torch.isclose(out["loss"], -torch.exp(torch.tensor(0.1)) / 2)


def test_bf16_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    mean, old = torch.randn(3, 4, 4, dtype=torch.bfloat16), torch.randn(3, 4, 4, dtype=torch.bfloat16)
    std = torch.tensor([0.5, 0.7, 0.9], dtype=torch.bfloat16)
    kl = transition_kl(mean, old, std)
    assert kl.dtype == torch.float32
    assert torch.equal(kl, transition_kl(mean.float(), old.float(), std.float()))
    lp, old_lp = torch.tensor([0.01, -0.02, 0.03], dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.bfloat16)
    out = dppo_loss(lp, old_lp, kl, adv, 1e-5)
    ref = dppo_loss(lp.float(), old_lp.float(), kl, adv.float(), 1e-5)
    assert out["loss"].dtype == torch.float32 and out["ratio"].dtype == torch.float32
    assert torch.equal(out["loss"], ref["loss"]) and torch.equal(out["ratio"], ref["ratio"])


# --------------------------------------------------------------------------------------------- the algorithm


def make_dppo(path, **kw):
    return make_module(FlowDPPO, path, **kw)


def test_stores_means_and_is_coupled():
    assert FlowDPPO.trainer_type == "dppo" and FlowDPPO.stores_means and FlowDPPO.needs_log_prob


@pytest.mark.parametrize("dynamics_type, noise_level", [("Flow-SDE", 0.7), ("Dance-SDE", 0.3), ("CPS", 0.5)])
def test_on_policy_kl_is_exactly_zero_and_ratio_exactly_one(tiny_sd3_path, dynamics_type, noise_level):
    module = make_dppo(tiny_sd3_path, dynamics_type=dynamics_type, noise_level=noise_level)
    randomize_lora(module)  # a non-zero LoRA: the check is not about the base weights
    rollout = module.rollout(PROMPTS)
    assert rollout.means is not None and rollout.means.shape == rollout.latents.shape
    assert_on_policy_ratios_are_one(module, rollout, ADV)
    for k in module.training_units(rollout):
        out = module.training_loss(rollout, ADV, torch.arange(4), k)
        assert out["kl_old_max"] == 0.0 and out["masked_fraction"] == 0.0
        # ratio 1 and nothing masked: the loss is mean(-A)
        assert torch.equal(out["loss"], (-ADV).mean())


@pytest.mark.parametrize("dynamics_type, noise_level", [("Flow-SDE", 0.7), ("Dance-SDE", 0.3), ("CPS", 0.5)])
def test_loss_after_an_update_uses_the_steps_own_std(tiny_sd3_path, dynamics_type, noise_level):
    """Off-policy: the loss is dppo_loss on the exact KL with the dynamics' own step std, and it has a gradient."""
    module = make_dppo(tiny_sd3_path, dynamics_type=dynamics_type, noise_level=noise_level, kl_mask_threshold=1e-3)
    rollout = module.rollout(PROMPTS)
    randomize_lora(module)  # the policy moves away from the one that sampled
    idx, k = torch.arange(4), 0
    out = module.training_loss(rollout, ADV, idx, k)
    new, _, s, s_next = module.step_forward(rollout, idx, k)
    step_std = new.std.reshape(-1)
    if dynamics_type == "CPS":
        expected_std = s_next * math.sin(noise_level * math.pi / 2)
    else:
        expected_std = float(module.dynamics.std_dev_t(s, s_next)) * math.sqrt(s - s_next)
    assert torch.allclose(step_std, torch.full((4,), expected_std), rtol=1e-6)
    kl = ((new.mean - rollout.means[idx, k]) ** 2).reshape(4, -1).mean(1) / (2 * expected_std**2)
    expected = dppo_loss(new.log_prob, rollout.log_probs[idx, k], kl, ADV, 1e-3, module.adv_clip_range)
    assert torch.allclose(out["loss"], expected["loss"], rtol=1e-5)
    assert out["kl_old_max"] > 0 and not torch.equal(out["ratio"], torch.ones(4))
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.trainable_parameters())


def test_add_kl_coefficient_false_leaves_the_variance_out(tiny_sd3_path):
    module = make_dppo(tiny_sd3_path, add_kl_coefficient=False)
    rollout = module.rollout(PROMPTS)
    randomize_lora(module)
    out = module.training_loss(rollout, ADV, torch.arange(4), 0)
    new, *_ = module.step_forward(rollout, torch.arange(4), 0)
    raw = ((new.mean - rollout.means[:, 0]) ** 2).reshape(4, -1).mean(1) / 2
    assert torch.isclose(out["kl_old_mean"], raw.mean(), rtol=1e-5)


def test_fit_logs_the_trust_region_diagnostics(tiny_sd3_path, prompt_file):
    module = make_dppo(tiny_sd3_path, num_inner_epochs=2)
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.logged_metrics
    for key in ("train/loss", "train/ratio_mean", "train/kl_old_mean", "train/kl_old_max", "train/masked_fraction",
                "train/pos_masked_fraction", "train/neg_masked_fraction", "train/approx_kl"):
        assert key in metrics, key
    assert metrics["train/ratio_first_update_max_abs_dev"] == 0.0
    assert "train/clip_fraction" not in metrics  # no ratio clip


# ------------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize("value", [0.0, -1e-5, float("nan"), float("inf")])
def test_kl_mask_threshold_out_of_range_is_refused(tiny_sd3_path, value):
    with pytest.raises(ConfigError, match=r"kl_mask_threshold=.* is out of range: it must be > 0"):
        make_dppo(tiny_sd3_path, kl_mask_threshold=value)


def test_bad_add_kl_coefficient_and_ode_are_refused(tiny_sd3_path):
    with pytest.raises(ConfigError, match="add_kl_coefficient must be true or false"):
        make_dppo(tiny_sd3_path, add_kl_coefficient="yes")
    with pytest.raises(ConfigError, match="trainer_type 'dppo' needs a tractable log-prob.*Flow-SDE, Dance-SDE or CPS"):
        make_dppo(tiny_sd3_path, dynamics_type="ODE")
    with pytest.raises(ConfigError, match="noise_level > 0"):
        make_dppo(tiny_sd3_path, noise_level=0.0)


def test_no_ratio_clip_option(tiny_sd3_path):
    """The KL mask replaces GRPO's clip: clip_range is not one of FlowDPPO's options."""
    with pytest.raises(ConfigError, match="no ratio clip.*kl_mask_threshold.*remove clip_range"):
        make_dppo(tiny_sd3_path, clip_range=1e-4)
