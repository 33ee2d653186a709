"""Policy losses of the coupled (GRPO family) and decoupled (DiffusionNFT, AWM) algorithms.

Pure functions on tensors. Conventions:

* per-sample quantities are ``(B,)``; "mean over dims" means over every non-batch dimension;
* losses are returned as float32 scalars (AWM is computed in float64 and cast at the end);
* ``clip_range`` is ``c`` (the ratio is clipped to ``[1 - c, 1 + c]``) or a ``[low, high]`` pair
  (``[1 + low, 1 + high]``, ``low < 0 < high``: the guide's system's form; ``c`` equals ``[-c, c]``);
  None or a float ``<= 0`` means the ratio is not clipped (plain ``mean(-A * ratio)``);
* ``adv_clip_range`` likewise: ``c`` clamps the advantages to ``[-c, c]``, ``[low, high]`` to that
  range; None or a float ``<= 0`` means they are not clamped;
* everything on the "old"/reference side (old log-probs, old/ref/EMA velocities and means) is
  detached here, so no gradient can flow into a frozen network by accident.

Returned dicts hold the differentiable ``loss`` plus detached diagnostics: per-sample tensors
(``ratio``) and scalars (``ratio_mean``, ``clip_fraction``, ``approx_kl``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "AWM_WEIGHTINGS",
    "as_range",
    "awm_log_prob",
    "awm_loss",
    "clamp_advantages",
    "clipped_policy_loss",
    "grpo_guard_loss",
    "grpo_loss",
    "guard_log_ratio",
    "kl_v_based",
    "kl_x_based",
    "nft_loss",
]

AWM_WEIGHTINGS: tuple[str, ...] = ("Uniform", "t", "t**2", "huber", "ghuber")


def _mean_over_dims(x: Tensor) -> Tensor:
    """``(B, ...) -> (B,)`` mean over the non-batch dimensions (identity on ``(B,)``)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _per_sample(x: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """Scalar, ``(B,)`` or ``(B, 1, ..., 1)`` values as a ``(B,)`` tensor in ``like``'s dtype/device."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected a scalar or one value per sample ({batch}); got shape {tuple(t.shape)}")
    return t.reshape(batch)


def _as_column(t: Tensor | float, like: Tensor) -> Tensor:
    """Per-sample time ``(B,)`` (or scalar) reshaped to ``(B, 1, ..., 1)`` to broadcast with ``like``."""
    col = _per_sample(t, like.shape[0], like)
    return col.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


Range = float | Sequence[float]


def as_range(value: Range | None) -> tuple[float, float] | None:
    """``c -> (-c, c)``, ``[low, high] -> (low, high)``; None or a float ``<= 0`` -> None (no clipping)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (-float(value), float(value)) if value > 0 else None
    low, high = (float(v) for v in value)
    if not low < 0 < high:
        raise ValueError(f"a [low, high] range needs low < 0 < high, got {list(value)}")
    return low, high


def clamp_advantages(advantages: Tensor, adv_clip_range: Range | None) -> Tensor:
    """``clamp(A, low, high)`` with ``(low, high) = as_range(adv_clip_range)``; unchanged if that is None."""
    bounds = as_range(adv_clip_range)
    return advantages if bounds is None else advantages.clamp(*bounds)


def _clipped_terms(ratio: Tensor, advantages: Tensor, clip_range: Range | None) -> tuple[Tensor, Tensor]:
    """Per-sample ``max(-A * ratio, -A * clamp(ratio, 1 + low, 1 + high))`` and the clip mask (ratio outside)."""
    unclipped = -advantages * ratio
    bounds = as_range(clip_range)
    if bounds is None:
        return unclipped, torch.zeros_like(ratio, dtype=torch.bool)
    low, high = 1.0 + bounds[0], 1.0 + bounds[1]
    clipped = -advantages * ratio.clamp(low, high)
    r = ratio.detach()
    return torch.maximum(unclipped, clipped), (r < low) | (r > high)


def clipped_policy_loss(ratio: Tensor, advantages: Tensor, clip_range: Range | None) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate.

    ``loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))`` (``1 + low``, ``1 + high`` for a pair);
    ``clip_fraction = mean(ratio outside that range)`` (detached). With ``c`` None or ``<= 0`` the ratio is
    not clipped: ``loss = mean(-A * ratio)`` and ``clip_fraction = 0``.
    """
    terms, mask = _clipped_terms(ratio, advantages.to(ratio.dtype), clip_range)
    return terms.mean(), mask.to(torch.float32).mean()


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: Range | None,
    adv_clip_range: Range | None,
) -> dict[str, Tensor]:
    """Flow-GRPO policy loss at one trained step.

    ``A = clamp(A, -adv_clip_range, adv_clip_range)``, ``ratio = exp(log_prob - old_log_prob)``,
    ``loss = clipped_policy_loss(ratio, A, clip_range)``,
    ``approx_kl = 0.5 * mean((log_prob - old_log_prob)**2)``.

    Returns dict with ``loss`` (float32 scalar), ``ratio`` (``(B,)``, detached), ``ratio_mean``,
    ``clip_fraction`` and ``approx_kl`` (detached scalars).
    """
    lp = log_prob.to(torch.float32)
    diff = lp - old_log_prob.detach().to(torch.float32)
    ratio = torch.exp(diff)
    adv = clamp_advantages(advantages.detach().to(torch.float32), adv_clip_range)
    loss, clip_fraction = clipped_policy_loss(ratio, adv, clip_range)
    return {
        "loss": loss,
        "ratio": ratio.detach(),
        "ratio_mean": ratio.detach().mean(),
        "clip_fraction": clip_fraction,
        "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
    }


def kl_x_based(mean: Tensor, ref_mean: Tensor, std_dev_t: Tensor | float) -> Tensor:
    """x-based KL to the reference policy at one step, ``(B,)`` float32.

    ``kl = mean_over_dims((mean - ref_mean)**2) / (2 * std_dev_t**2)`` with ``std_dev_t`` the
    dynamics' diffusion coefficient (:meth:`SDESchedulerMixin.std_dev_t`; scalar, ``(B,)`` or
    ``(B, 1, ..., 1)``; must be > 0). ``ref_mean`` is detached.
    """
    m = mean.to(torch.float32)
    sq = _mean_over_dims((m - ref_mean.detach().to(torch.float32)) ** 2)
    std = _per_sample(std_dev_t, m.shape[0], sq)
    return sq / (2.0 * std**2)


def kl_v_based(v: Tensor, v_ref: Tensor) -> Tensor:
    """v-based KL to the reference policy, ``(B,)`` float32: ``mean_over_dims((v - v_ref)**2)`` (``v_ref`` detached)."""
    return _mean_over_dims((v.to(torch.float32) - v_ref.detach().to(torch.float32)) ** 2)


def guard_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, step_std: Tensor | float
) -> Tensor:
    """GRPO-Guard (RatioNorm) normalised log-ratio, ``(B,)`` float32.

    With ``scale = step_std`` (the step's std ``std_dev_t * sqrt(-dt)``; the reference uses the
    batch mean of ``sqrt(-dt)`` in it: the caller chooses what to pass)::

        bias = mean_over_dims((mean - old_mean)**2) / (2 * scale**2)
        log_ratio = (log_prob - old_log_prob + bias) * scale

    For Flow-SDE Gaussians with a common std this equals ``mean_over_dims(eps * (mean - old_mean))``
    when ``prev = old_mean + scale * eps``: zero mean over ``eps``. ``old_*`` are detached.
    """
    lp = log_prob.to(torch.float32)
    scale = _per_sample(step_std, lp.shape[0], lp)
    bias = _mean_over_dims((mean.to(torch.float32) - old_mean.detach().to(torch.float32)) ** 2) / (
        2.0 * scale**2
    )
    return (lp - old_log_prob.detach().to(torch.float32) + bias) * scale


def grpo_guard_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    step_std: Tensor | float,
    dt: Tensor | float,
    advantages: Tensor,
    clip_range: Range | None,
    adv_clip_range: Range | None,
    divide_by_dt: bool = True,
) -> dict[str, Tensor]:
    """GRPO-Guard loss: clipped PPO loss on the normalised ratio, reweighted by ``1 / (-dt)``.

    ``ratio = exp(guard_log_ratio(...))``; ``loss = mean_i(max(-A_i r_i, -A_i clamp(r_i)) / (-dt_i))``
    (``dt = sigma_next - sigma < 0``, scalar or per sample). ``divide_by_dt=False`` leaves out the
    ``1 / (-dt)`` factor (the reweighting then lives only in the ratio's ``scale``). Returns the keys of
    :func:`grpo_loss` (``approx_kl`` from the plain log-ratio ``log_prob - old_log_prob``).
    """
    log_ratio = guard_log_ratio(log_prob, old_log_prob, mean, old_mean, step_std)
    ratio = torch.exp(log_ratio)
    adv = clamp_advantages(advantages.detach().to(torch.float32), adv_clip_range)
    neg_dt = -_per_sample(dt, ratio.shape[0], ratio)
    terms, mask = _clipped_terms(ratio, adv, clip_range)
    plain = log_prob.detach().to(torch.float32) - old_log_prob.detach().to(torch.float32)
    return {
        "loss": (terms / neg_dt).mean() if divide_by_dt else terms.mean(),
        "ratio": ratio.detach(),
        "ratio_mean": ratio.detach().mean(),
        "clip_fraction": mask.to(torch.float32).mean(),
        "approx_kl": 0.5 * (plain**2).mean(),
    }


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    advantages: Tensor,
    nft_beta: float = 1.0,
    adv_clip_range: Range = 5.0,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
) -> dict[str, Tensor]:
    """DiffusionNFT loss (float32).

    With ``c = adv_clip_range`` (for a ``[low, high]`` pair: A clamped to it, ``c = high``), ``beta = nft_beta``
    and ``t`` the per-sample time ``(B,)``::

        r      = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)           # optimality probability
        v_pos  = beta * v + (1 - beta) * v_old
        v_neg  = (1 + beta) * v_old - beta * v
        x0_pos = x_t - t * v_pos ;  L_pos = mean_dims((x0_pos - x0)**2) / sg(mean_dims|x0_pos - x0|).clamp_min(1e-5)
        x0_neg = x_t - t * v_neg ;  L_neg likewise
        loss   = mean(r * L_pos + (1 - r) * L_neg) / beta * c  +  kl_beta * mean((v - v_ref)**2)

    ``v_old``, ``x_t``, ``x0``, ``v_ref`` are detached. Returns ``loss``, ``policy_loss``,
    ``kl_loss``, ``positive_loss``, ``negative_loss``, ``r_mean`` (diagnostics detached).
    """
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}")
    bounds = as_range(adv_clip_range)
    if bounds is None:
        raise ValueError(f"nft_loss needs adv_clip_range > 0 (it maps A to [0, 1]), got {adv_clip_range}")
    c = bounds[1]  # a [low, high] pair clamps A to it and scales by high, as the guide's system does
    v32 = v.to(torch.float32)
    v_old32 = v_old.detach().to(torch.float32)
    xt = x_t.detach().to(torch.float32)
    target = x0.detach().to(torch.float32)
    tt = _as_column(t.detach(), v32)

    adv = advantages.detach().to(torch.float32).clamp(*bounds)
    r = (adv / c / 2.0 + 0.5).clamp(0.0, 1.0)

    def _normalised_mse(v_mix: Tensor) -> Tensor:
        err = xt - tt * v_mix - target
        with torch.no_grad():
            weight = _mean_over_dims(err.abs().to(torch.float64)).clamp_min(1e-5).to(torch.float32)
        return _mean_over_dims(err**2) / weight

    positive = _normalised_mse(nft_beta * v32 + (1.0 - nft_beta) * v_old32)
    negative = _normalised_mse((1.0 + nft_beta) * v_old32 - nft_beta * v32)
    policy_loss = (r * positive + (1.0 - r) * negative).mean() / nft_beta * c
    kl = _kl_velocity(v32, v_ref, kl_beta, "v_ref", "kl_beta")
    loss = policy_loss + kl_beta * kl if kl_beta > 0 else policy_loss
    return {
        "loss": loss,
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl.detach(),
        "positive_loss": positive.detach().mean(),
        "negative_loss": negative.detach().mean(),
        "r_mean": r.mean(),
    }


def _kl_velocity(v: Tensor, other: Tensor | None, beta: float, other_name: str, beta_name: str) -> Tensor:
    """``mean((v - sg(other))**2)`` over everything (0 if beta is 0); ValueError if beta > 0 without ``other``."""
    if beta is None or beta <= 0:
        if other is None:
            return v.new_zeros(())
        return kl_v_based(v, other).mean().to(v.dtype)
    if other is None:
        raise ValueError(f"{beta_name}={beta} > 0 needs {other_name}; pass it or set {beta_name}=0")
    return ((v - other.detach().to(v.dtype)) ** 2).mean()


def awm_log_prob(v: Tensor, target: Tensor, t: Tensor, weighting: str, ghuber_power: float = 0.25) -> Tensor:
    """AWM surrogate log-probability, float64, ``(B,)``.

    ``L = mean_over_dims((v - target)**2)`` (``target = eps - x0``) and, by ``weighting``::

        Uniform : -L
        t       : -L * t
        t**2    : -L * t**2
        huber   : -(sqrt(L + 1e-10) - 1e-5) * t
        ghuber  : -((L + 1e-10)**p - (1e-10)**p) * t / p        (p = ghuber_power)
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(
            f"unknown awm_weighting {weighting!r}; choose one of {', '.join(map(repr, AWM_WEIGHTINGS))}"
        )
    v64 = v.to(torch.float64)
    loss = _mean_over_dims((v64 - target.detach().to(torch.float64)) ** 2)
    tt = _per_sample(t.detach() if isinstance(t, Tensor) else t, loss.shape[0], loss)
    if weighting == "Uniform":
        return -loss
    if weighting == "t":
        return -loss * tt
    if weighting == "t**2":
        return -loss * tt**2
    if weighting == "huber":
        return -(torch.sqrt(loss + 1e-10) - 1e-5) * tt
    p = float(ghuber_power)
    if p <= 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
    return -((loss + 1e-10) ** p - math.pow(1e-10, p)) * tt / p


def awm_loss(
    v: Tensor,
    v_old: Tensor,
    target: Tensor,
    t: Tensor,
    advantages: Tensor,
    weighting: str,
    clip_range: Range | None,
    adv_clip_range: Range | None,
    ghuber_power: float = 0.25,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
    v_ema: Tensor | None = None,
    ema_kl_beta: float = 0.0,
) -> dict[str, Tensor]:
    """Advantage Weighted Matching loss (computed in float64, returned float32).

    ``lp = awm_log_prob(v, ...)``, ``lp_old = awm_log_prob(sg(v_old), ...)`` (same eps and t),
    ``ratio = exp(lp - lp_old)``, ``A = clamp(A, -adv_clip_range, adv_clip_range)``::

        loss = clipped_policy_loss(ratio, A, clip_range)
               + kl_beta * mean((v - v_ref)**2) + ema_kl_beta * mean((v - v_ema)**2)

    Returns ``loss``, ``policy_loss``, ``ratio`` (``(B,)``), ``ratio_mean``, ``clip_fraction``,
    ``approx_kl`` (``0.5 * mean((lp - lp_old)**2)``), ``kl_loss``, ``ema_kl_loss``.
    """
    lp = awm_log_prob(v, target, t, weighting, ghuber_power)
    lp_old = awm_log_prob(v_old.detach(), target, t, weighting, ghuber_power)
    diff = lp - lp_old
    ratio = torch.exp(diff)
    adv = clamp_advantages(advantages.detach().to(torch.float64), adv_clip_range)
    policy_loss, clip_fraction = clipped_policy_loss(ratio, adv, clip_range)
    v64 = v.to(torch.float64)
    kl = _kl_velocity(v64, v_ref, kl_beta, "v_ref", "kl_beta")
    ema_kl = _kl_velocity(v64, v_ema, ema_kl_beta, "v_ema", "ema_kl_beta")
    loss = policy_loss
    if kl_beta > 0:
        loss = loss + kl_beta * kl
    if ema_kl_beta > 0:
        loss = loss + ema_kl_beta * ema_kl
    return {
        "loss": loss.to(torch.float32),
        "policy_loss": policy_loss.detach().to(torch.float32),
        "ratio": ratio.detach().to(torch.float32),
        "ratio_mean": ratio.detach().mean().to(torch.float32),
        "clip_fraction": clip_fraction,
        "approx_kl": (0.5 * (diff.detach() ** 2).mean()).to(torch.float32),
        "kl_loss": kl.detach().to(torch.float32),
        "ema_kl_loss": ema_kl.detach().to(torch.float32),
    }


# The newer algorithms' losses, each in its own module (imported last: they use the helpers above).
from flowrl.losses.crd import CRD_LOSS_TYPES, crd_loss, implicit_reward  # noqa: E402
from flowrl.losses.dgpo import dgpo_loss, dsm_error  # noqa: E402
from flowrl.losses.dpo import denoising_error, dpo_loss, dpo_pairs  # noqa: E402
from flowrl.losses.dppo import dppo_loss, transition_kl  # noqa: E402

__all__ += ["CRD_LOSS_TYPES", "crd_loss", "denoising_error", "dgpo_loss", "dpo_loss", "dpo_pairs", "dppo_loss", "dsm_error", "implicit_reward", "transition_kl"]
