"""Tests for flowrl.losses against hand-computed values and the on-policy properties."""

import math

import numpy as np
import pytest
import torch

from flowrl.dynamics import FlowSDE, gaussian_log_prob
from flowrl.losses import (
    AWM_WEIGHTINGS,
    as_range,
    awm_log_prob,
    awm_loss,
    clamp_advantages,
    clipped_policy_loss,
    grpo_guard_loss,
    grpo_loss,
    guard_log_ratio,
    kl_v_based,
    kl_x_based,
    nft_loss,
)


# ---------------------------------------------------------------------------------------------
# clipped surrogate and GRPO
# ---------------------------------------------------------------------------------------------
def test_clipped_policy_loss_hand_values():
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.05])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    # per sample max(-A r, -A clamp(r, .8, 1.2)): max(-.5,-.8)=-.5, 1, max(-3,-2.4)=-2.4, 2.1
    loss, clip_fraction = clipped_policy_loss(ratio, adv, 0.2)
    torch.testing.assert_close(loss, torch.tensor((-0.5 + 1.0 - 2.4 + 2.1) / 4))
    torch.testing.assert_close(clip_fraction, torch.tensor(0.5))
    # unclipped when clip_range is None or <= 0: mean(-A r) = (-.5 + 1 - 3 + 2.1) / 4
    for c in (None, 0.0, -1.0):
        loss, clip_fraction = clipped_policy_loss(ratio, adv, c)
        torch.testing.assert_close(loss, torch.tensor(-0.1))
        assert clip_fraction.item() == 0.0


def test_grpo_loss_hand_values():
    lp = torch.tensor([0.1, -0.2])
    old = torch.tensor([0.0, 0.0])
    adv = torch.tensor([10.0, -1.0])  # clamped to 5
    out = grpo_loss(lp, old, adv, clip_range=0.2, adv_clip_range=5.0)
    r0, r1 = math.exp(0.1), math.exp(-0.2)
    # sample 0: max(-5 r0, -5 min(r0, 1.2)) = -5 r0 ; sample 1: max(r1, clamp(r1)=0.8) = r1 (0.8187)
    torch.testing.assert_close(out["loss"], torch.tensor((-5 * r0 + r1) / 2))
    torch.testing.assert_close(out["ratio"], torch.tensor([r0, r1]))
    torch.testing.assert_close(out["approx_kl"], torch.tensor(0.5 * (0.01 + 0.04) / 2))
    torch.testing.assert_close(out["clip_fraction"], torch.tensor(0.0))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_grpo_on_policy_ratio_is_one_and_gradient_is_minus_a_grad_logprob():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    feats = torch.randn(4, 3)
    lp = torch.tanh(feats @ w)  # some differentiable log-prob
    adv = torch.tensor([1.0, -2.0, 0.5, 7.0])
    out = grpo_loss(lp, lp.detach(), adv, clip_range=1e-4, adv_clip_range=5.0)
    assert torch.equal(out["ratio"], torch.ones(4))
    assert out["clip_fraction"].item() == 0.0 and out["approx_kl"].item() == 0.0
    out["loss"].backward()
    a = adv.clamp(-5, 5)
    (grad_lp,) = torch.autograd.grad((-(a / 4) * torch.tanh(feats @ w)).sum(), w)
    torch.testing.assert_close(w.grad, grad_lp)


# ---------------------------------------------------------------------------------------------
# KL terms
# ---------------------------------------------------------------------------------------------
def test_kl_x_based_hand_values_and_gradients():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    # mean_dims sq = [2.5, 1]; / (2 std^2) with std = [0.5, 2] -> [5, 0.125]
    kl = kl_x_based(mean, ref, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(kl, torch.tensor([5.0, 0.125]))
    kl.sum().backward()
    assert mean.grad is not None and torch.count_nonzero(mean.grad) > 0
    assert ref.grad is None
    # scalar and (B, 1) std_dev_t broadcast the same way
    torch.testing.assert_close(kl_x_based(mean, ref, 0.5), torch.tensor([5.0, 2.0]))
    torch.testing.assert_close(
        kl_x_based(mean, ref, torch.tensor([[0.5], [2.0]])), torch.tensor([5.0, 0.125])
    )


def test_kl_v_based_hand_values_and_gradients():
    v = torch.tensor([[1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    v_ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    kl = kl_v_based(v, v_ref)
    torch.testing.assert_close(kl, torch.tensor([1.0, 2.5]))
    kl.mean().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, -0.5], [1.0, -0.5]]))  # 2 (v - ref) / 4
    assert v_ref.grad is None


# ---------------------------------------------------------------------------------------------
# GRPO-Guard
# ---------------------------------------------------------------------------------------------
def test_guard_log_ratio_hand_values():
    lp, old = torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.0])
    mean = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    old_mean = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # bias = [0.5, 0.25] / (2 * 0.5^2) = [1.0, 0.5]; ratio_log = (lp - old + bias) * 0.5
    torch.testing.assert_close(guard_log_ratio(lp, old, mean, old_mean, 0.5), torch.tensor([0.6, 0.2]))


def test_guard_log_ratio_has_zero_mean_over_eps():
    gen = torch.Generator().manual_seed(0)
    n, d = 4000, 16
    sde = FlowSDE(0.7)
    s, s_next = 0.6, 0.5
    scale = float(sde.std_dev_t(s, s_next)) * math.sqrt(s - s_next)
    old_mean = torch.randn(1, d, generator=gen).expand(n, d)
    delta = 0.3 * scale * torch.randn(1, d, generator=gen)  # new policy = old + perturbation
    new_mean = old_mean + delta
    eps = torch.randn(n, d, generator=gen)
    prev = old_mean + scale * eps
    std = torch.full((n, 1), scale)
    lp_new, lp_old = gaussian_log_prob(prev, new_mean, std), gaussian_log_prob(prev, old_mean, std)
    g = guard_log_ratio(lp_new, lp_old, new_mean, old_mean, scale)
    # closed form: mean_dims(eps * (mean_new - mean_old))
    torch.testing.assert_close(g, (eps * delta).mean(dim=1), atol=1e-5, rtol=1e-3)
    # zero mean (loose: 5 standard errors), while the plain log-ratio is biased by -bias
    assert abs(g.mean().item()) < 5 * g.std().item() / math.sqrt(n)
    plain = lp_new - lp_old
    bias = (delta**2).mean().item() / (2 * scale**2)
    assert plain.mean().item() == pytest.approx(-bias, rel=0.1)


def test_grpo_guard_loss_on_policy_and_dt_reweighting():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    feats = torch.randn(2, 3)
    lp = feats @ w
    mean = torch.randn(2, 4)
    adv = torch.tensor([1.0, -3.0])
    dt = torch.tensor([-0.1, -0.5])
    out = grpo_guard_loss(
        lp, lp.detach(), mean, mean.clone(), 0.2, dt, adv, clip_range=0.2, adv_clip_range=5.0
    )
    assert torch.equal(out["ratio"], torch.ones(2))
    # loss = mean(-A * 1 / (-dt)) = (-1/0.1 + 3/0.5) / 2 = -2
    torch.testing.assert_close(out["loss"], torch.tensor(-2.0))
    out["loss"].backward()
    # d/dw: -A_i * scale * dlp_i / (-dt_i) / B
    expected = ((-adv * 0.2 / 0.1 * torch.tensor([1.0, 0.2]))[:, None] * feats).sum(0) / 2
    torch.testing.assert_close(w.grad, expected)



def test_grpo_guard_loss_without_dt_division_is_the_guides_form():
    """``divide_by_dt=False`` (``guard_loss_weighting: none``) is Flow-Factory's grpo-guard trainer: its loss is the
    clipped surrogate on the normalised ratio, with no per-step factor (the reweighting is only the ratio's
    ``scale = std_dev_t * sqrt(-dt)``). The default ``divide_by_dt=True`` is the GRPO-Guard authors' code
    (flow_grpo ``scripts/train_sd3_GRPO_Guard.py``: ``policy_loss / sqrt_dt.mean()**2``, i.e. divided by -dt)."""
    torch.manual_seed(0)
    lp = torch.randn(2, requires_grad=True)
    old, mean, old_mean = lp.detach() - 0.01, torch.randn(2, 4), torch.randn(2, 4)
    adv, dt = torch.tensor([1.0, -3.0]), -0.25
    authors = grpo_guard_loss(lp, old, mean, old_mean, 0.2, dt, adv, 0.2, 5.0)
    guide = grpo_guard_loss(lp, old, mean, old_mean, 0.2, dt, adv, 0.2, 5.0, divide_by_dt=False)
    torch.testing.assert_close(authors["loss"], guide["loss"] / 0.25)
    ratio = torch.exp(guard_log_ratio(lp, old, mean, old_mean, 0.2))
    expected, _ = clipped_policy_loss(ratio, adv, 0.2)
    torch.testing.assert_close(guide["loss"], expected)
    assert torch.equal(authors["ratio"], guide["ratio"])


# ---------------------------------------------------------------------------------------------
# clip ranges: c or [low, high]
# ---------------------------------------------------------------------------------------------
def test_as_range():
    assert as_range(0.2) == (-0.2, 0.2) and as_range([-0.1, 0.3]) == (-0.1, 0.3)
    assert as_range(None) is None and as_range(0.0) is None
    with pytest.raises(ValueError, match="low < 0 < high"):
        as_range([0.2, 0.28])  # the guide's system accepts this and clamps the ratio to [1.2, 1.28]


def test_symmetric_pair_equals_the_number_in_every_loss():
    torch.manual_seed(1)
    lp = torch.randn(6, requires_grad=True)
    old = lp.detach() + 0.3 * torch.randn(6)
    adv = 4 * torch.randn(6)
    for c, a in [(0.1, 2.0), (1e-4, 5.0)]:
        x, pair = grpo_loss(lp, old, adv, c, a), grpo_loss(lp, old, adv, [-c, c], [-a, a])
        assert torch.equal(x["loss"], pair["loss"]) and torch.equal(x["clip_fraction"], pair["clip_fraction"])
        gx = torch.autograd.grad(x["loss"], lp)[0]
        gp = torch.autograd.grad(pair["loss"], lp)[0]
        assert torch.equal(gx, gp)
    v, v_old, target = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    t = torch.rand(6)
    x = awm_loss(v, v_old, target, t, adv, "ghuber", 1e-3, 2.0)
    pair = awm_loss(v, v_old, target, t, adv, "ghuber", [-1e-3, 1e-3], [-2.0, 2.0])
    assert torch.equal(x["loss"], pair["loss"])
    x_t, x0 = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    assert torch.equal(nft_loss(v, v_old, x_t, x0, t, adv, 1.0, 2.0)["loss"],
                       nft_loss(v, v_old, x_t, x0, t, adv, 1.0, [-2.0, 2.0])["loss"])


def test_asymmetric_ranges_clamp_to_their_own_bounds():
    ratio = torch.tensor([0.5, 0.95, 1.0, 1.15, 2.0])
    adv = torch.ones(5)
    # ratio clamped to [1 - 0.1, 1 + 0.2]: with A > 0 the surrogate is max(-r, -clamp(r)) = -min(r, clamp(r))
    loss, frac = clipped_policy_loss(ratio, adv, [-0.1, 0.2])
    expected = -torch.minimum(ratio, ratio.clamp(0.9, 1.2)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(frac, torch.tensor(2 / 5))  # 0.5 and 2.0 lie outside [0.9, 1.2]
    a = torch.tensor([-9.0, -1.0, 0.5, 7.0])
    torch.testing.assert_close(clamp_advantages(a, [-2.0, 5.0]), torch.tensor([-2.0, -1.0, 0.5, 5.0]))
    # NFT with a pair clamps A to it and scales by high (as the guide's system): r = clamp(A)/high/2 + 1/2
    v, v_old, x_t, x0 = (torch.randn(4, 3, 2, 2) for _ in range(4))
    t = torch.rand(4)
    out = nft_loss(v, v_old, x_t, x0, t, a, 1.0, [-2.0, 5.0])
    r = (a.clamp(-2.0, 5.0) / 5.0 / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out["r_mean"], r.mean())

# ---------------------------------------------------------------------------------------------
# DiffusionNFT
# ---------------------------------------------------------------------------------------------
def _np_nft(v, v_old, x_t, x0, t, adv, beta, c, v_ref=None, kl_beta=0.0):
    r = np.clip(np.clip(adv, -c, c) / c / 2 + 0.5, 0, 1)
    tt = t[:, None]

    def norm_mse(vm):
        err = x_t - tt * vm - x0
        return (err**2).mean(1) / np.maximum(np.abs(err).mean(1), 1e-5)

    lpos = norm_mse(beta * v + (1 - beta) * v_old)
    lneg = norm_mse((1 + beta) * v_old - beta * v)
    loss = (r * lpos + (1 - r) * lneg).mean() / beta * c
    if kl_beta:
        loss += kl_beta * ((v - v_ref) ** 2).mean()
    return loss


def test_nft_loss_hand_values():
    v = np.array([[1.0, -0.5, 0.0], [0.2, 0.4, -1.0]])
    v_old = np.array([[0.5, 0.0, 0.5], [0.0, 0.4, -0.5]])
    x_t = np.array([[0.3, 0.1, -0.2], [1.0, -1.0, 0.5]])
    x0 = np.array([[0.0, 0.5, 0.0], [0.5, -0.5, 1.0]])
    t = np.array([0.8, 0.3])
    adv = np.array([2.5, -7.0])  # r = [0.75, 0]
    v_ref = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    for beta, kl_beta in ((1.0, 0.0), (0.1, 0.0), (1.0, 0.5)):
        out = nft_loss(
            T(v),
            T(v_old),
            T(x_t),
            T(x0),
            T(t),
            T(adv),
            nft_beta=beta,
            adv_clip_range=5.0,
            v_ref=T(v_ref),
            kl_beta=kl_beta,
        )
        expected = _np_nft(v, v_old, x_t, x0, t, adv, beta, 5.0, v_ref, kl_beta)
        torch.testing.assert_close(out["loss"], torch.tensor(expected, dtype=torch.float32))
        assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["r_mean"], torch.tensor(0.375))


def test_nft_gradients_flow_to_v_only():
    torch.manual_seed(0)
    v = torch.randn(2, 4, requires_grad=True)
    v_old = torch.randn(2, 4, requires_grad=True)
    v_ref = torch.randn(2, 4, requires_grad=True)
    out = nft_loss(
        v,
        v_old,
        torch.randn(2, 4),
        torch.randn(2, 4),
        torch.tensor([0.5, 0.9]),
        torch.tensor([1.0, -1.0]),
        v_ref=v_ref,
        kl_beta=0.1,
    )
    out["loss"].backward()
    assert v.grad is not None and torch.count_nonzero(v.grad) > 0
    assert v_old.grad is None and v_ref.grad is None
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(v, v_old, v, v, torch.tensor([0.5, 0.5]), torch.zeros(2), kl_beta=0.1)


def test_nft_on_policy_positive_equals_negative():
    torch.manual_seed(0)
    v = torch.randn(2, 4)
    out = nft_loss(
        v,
        v.clone(),
        torch.randn(2, 4),
        torch.randn(2, 4),
        torch.tensor([0.5, 0.9]),
        torch.tensor([1.0, -1.0]),
    )
    torch.testing.assert_close(out["positive_loss"], out["negative_loss"])


# ---------------------------------------------------------------------------------------------
# AWM
# ---------------------------------------------------------------------------------------------
def test_awm_log_prob_every_weighting_hand_values():
    target = torch.zeros(2, 2)
    v = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # L = [1, 2]
    t = torch.tensor([0.5, 0.25])
    p = 0.25
    expected = {
        "Uniform": [-1.0, -2.0],
        "t": [-0.5, -0.5],
        "t**2": [-0.25, -0.125],
        "huber": [-(math.sqrt(1 + 1e-10) - 1e-5) * 0.5, -(math.sqrt(2 + 1e-10) - 1e-5) * 0.25],
        "ghuber": [-((1 + 1e-10) ** p - 1e-10**p) * 0.5 / p, -((2 + 1e-10) ** p - 1e-10**p) * 0.25 / p],
    }
    assert set(expected) == set(AWM_WEIGHTINGS)
    for weighting, values in expected.items():
        lp = awm_log_prob(v, target, t, weighting)
        assert lp.dtype == torch.float64
        torch.testing.assert_close(lp, torch.tensor(values, dtype=torch.float64))
    # ghuber with another power: p = 0.5
    torch.testing.assert_close(
        awm_log_prob(v, target, t, "ghuber", ghuber_power=0.5),
        torch.tensor(
            [-((1 + 1e-10) ** 0.5 - 1e-5) * 0.5 / 0.5, -((2 + 1e-10) ** 0.5 - 1e-5) * 0.25 / 0.5],
            dtype=torch.float64,
        ),
    )
    with pytest.raises(ValueError, match="Uniform.*ghuber"):
        awm_log_prob(v, target, t, "uniform")


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
def test_awm_on_policy_ratio_one_and_gradient(weighting):
    torch.manual_seed(0)
    v = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4)
    t = torch.tensor([0.2, 0.5, 0.9])
    adv = torch.tensor([1.0, -2.0, 9.0])
    out = awm_loss(v, v.detach().clone(), target, t, adv, weighting, clip_range=1e-3, adv_clip_range=5.0)
    torch.testing.assert_close(out["ratio"], torch.ones(3))
    assert out["clip_fraction"].item() == 0.0
    out["loss"].backward()
    (grad_lp,) = torch.autograd.grad(
        (-(adv.clamp(-5, 5).double() / 3) * awm_log_prob(v, target, t, weighting)).sum(), v
    )
    torch.testing.assert_close(v.grad, grad_lp.float())


def test_awm_loss_hand_values_with_kl_terms():
    target = torch.zeros(2, 2)
    v = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)  # L = [1, 2]
    v_old = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # L_old = [0.5, 2]
    v_ref = torch.zeros(2, 2, requires_grad=True)
    v_ema = torch.ones(2, 2)
    t = torch.tensor([0.5, 0.5])
    adv = torch.tensor([1.0, -1.0])
    out = awm_loss(
        v,
        v_old,
        target,
        t,
        adv,
        "Uniform",
        clip_range=0.2,
        adv_clip_range=5.0,
        v_ref=v_ref,
        kl_beta=0.1,
        v_ema=v_ema,
        ema_kl_beta=0.01,
    )
    r0 = math.exp(-1.0 + 0.5)  # 0.6065 -> clipped side for A = 1: max(-0.6065, -0.8) = -0.6065
    policy = (-r0 + 1.0) / 2  # sample 1: ratio 1, -A r = 1
    kl = (1 + 1 + 4 + 0) / 4
    ema_kl = (0 + 0 + 1 + 1) / 4
    torch.testing.assert_close(out["loss"], torch.tensor(policy + 0.1 * kl + 0.01 * ema_kl))
    torch.testing.assert_close(out["clip_fraction"], torch.tensor(0.5))
    out["loss"].backward()
    assert v.grad is not None and v_ref.grad is None
    with pytest.raises(ValueError, match="v_ema"):
        awm_loss(v, v_old, target, t, adv, "t", 0.2, 5.0, ema_kl_beta=0.1)
