"""CRD, Centered Reward Distillation: the implicit reward matched to the within-prompt centered reward (pure
functions, float32).

Conventions as in :mod:`flowrl.losses`: per-sample quantities are ``(B,)``, "mean over dims" is over every
non-batch dimension, the frozen side (old / reference velocities) is detached here, and the math runs in float32
whatever the dtype of the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.losses import Range, _mean_over_dims, as_range
from flowrl.losses.dgpo import dense_group_index

__all__ = ["CRD_LOSS_TYPES", "crd_loss", "implicit_reward", "within_group_centering"]

CRD_LOSS_TYPES: tuple[str, ...] = ("mse", "bce")


def implicit_reward(v: Tensor, v_old: Tensor, target: Tensor, adaptive_logp: bool = True) -> Tensor:
    """The implicit reward of the policy against the old model, ``(B,)`` float32 (differentiable in ``v``).

    ``r_theta = -mean_dims((v - target)**2 / w - (sg(v_old) - target)**2 / w_old)`` where, with
    ``adaptive_logp``, ``w = sg(mean_dims|v - target|).clamp_min(1e-5)`` and ``w_old`` likewise for ``v_old``
    (each error normalised by its own size, as DiffusionNFT's adaptive weighting), else ``w = w_old = 1``.
    """
    v32 = v.to(torch.float32)
    old32 = v_old.detach().to(torch.float32)
    tgt = target.detach().to(torch.float32)
    err, err_old = (v32 - tgt) ** 2, (old32 - tgt) ** 2
    if adaptive_logp:
        with torch.no_grad():
            w = _mean_over_dims((v32 - tgt).abs().to(torch.float64)).clamp_min(1e-5).to(torch.float32)
            w_old = _mean_over_dims((old32 - tgt).abs().to(torch.float64)).clamp_min(1e-5).to(torch.float32)
        return -(_mean_over_dims(err) / w - _mean_over_dims(err_old) / w_old)
    return -(_mean_over_dims(err) - _mean_over_dims(err_old))


def _group_weights(values: Tensor, index: Tensor, num_groups: int, weight_temp: float, sign: float) -> Tensor:
    """Per-sample centering weights, summing to 1 within each group: uniform (``weight_temp < 0``), the samples whose
    advantage has the sign ``sign`` only (``weight_temp == 0``, ``r`` above / below 1/2; uniform in a group that has
    none) or ``softmax(sign * r / T)``."""
    weights = torch.empty_like(values)
    for g in range(num_groups):
        members = index == g
        r = values[members]
        if weight_temp < 0:
            p = torch.full_like(r, 1.0 / r.numel())
        elif weight_temp == 0:
            chosen = (sign * (r - 0.5)) > 0  # r > 0.5 is A > 0
            p = chosen.to(r.dtype) / chosen.sum() if chosen.any() else torch.full_like(r, 1.0 / r.numel())
        else:
            p = torch.softmax(sign * r / weight_temp, dim=0)
        weights[members] = p
    return weights


def within_group_centering(values: Tensor, index: Tensor, num_groups: int, weights: Tensor) -> Tensor:
    """``values_i - sum_{j in g(i)} weights_j * values_j``: each value minus its group's weighted mean."""
    centers = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, weights * values)
    return values - centers[index]


def crd_loss(
    v: Tensor,
    v_old: Tensor,
    target: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    crd_beta: float = 1.0,
    adv_clip_range: Range = 5.0,
    adaptive_logp: bool = True,
    crd_loss_type: str = "mse",
    weight_temp: float = -1.0,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
    reward_adaptive_kl: bool = True,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """CRD loss of one micro-batch that holds whole groups (float32).

    With ``c`` the upper bound of ``adv_clip_range`` (``c`` or ``[low, high]``), ``beta = crd_beta``::

        r_i       = clamp(clamp(A_i, low, high) / c / 2 + 0.5, 0, 1)            # the reward, in [0, 1]
        r_theta_i = implicit_reward(v_i, v_old_i, target_i, adaptive_logp)       # policy vs old model
        R_i       = r_i - sum_{j in g} p_j r_j ;   Rt_i = r_theta_i - sg(sum_{j in g} p_j r_theta_j)
        mse:  L = mean((beta * Rt - R)**2) ;   bce:  L = mean(BCE_logits(beta * Rt, sigmoid(R)))
        policy_loss = L * c / beta

    ``p`` are the within-group centering weights: uniform for ``weight_temp < 0`` (the group mean); otherwise two
    directions averaged, ``L = (L(p+) + L(p-)) / 2`` with ``p+ = softmax(r / T)``, ``p- = softmax(-r / T)`` per
    group (``T = 0``: the samples of positive / negative advantage only; Flow-Factory tests the sign of the
    [0, 1]-mapped reward there, which selects every sample). Centering inside each prompt's group cancels the
    prompt's intractable normaliser; a group whose rewards are all equal has ``R = 0`` and only pulls the implicit
    rewards together.

    KL to the (CFG-guided) reference: ``kl_i = mean_dims((v_i - sg(v_ref_i))**2)``; ``kl_loss = kl_beta * mean(kl)``,
    or with ``reward_adaptive_kl`` ``kl_beta * mean((m + r_i (1 - m)) * kl_i)``, ``m = 1e-4 / kl_beta`` (a weak
    anchor on low-reward samples, the full one on high-reward samples).

    ``mask`` (``(B,)`` bool, None = all kept): samples outside it take no part in the centering nor the means.
    Returns ``loss``, ``policy_loss``, ``unweighted_policy_loss``, ``kl_loss``, ``r_theta_mean``, ``r_mean``.
    """
    if crd_beta <= 0:
        raise ValueError(f"crd_beta must be > 0, got {crd_beta}")
    if crd_loss_type not in CRD_LOSS_TYPES:
        raise ValueError(f"unknown crd_loss_type {crd_loss_type!r}; choose one of {', '.join(CRD_LOSS_TYPES)}")
    bounds = as_range(adv_clip_range)
    if bounds is None:
        raise ValueError(f"crd_loss needs adv_clip_range > 0 (it maps A to [0, 1]), got {adv_clip_range}")
    batch = v.shape[0]
    keep = torch.ones(batch, dtype=torch.bool, device=v.device) if mask is None else mask.to(v.device).bool()
    kept = keep.nonzero().reshape(-1)
    c = bounds[1]
    adv = advantages.detach().to(device=v.device, dtype=torch.float32).reshape(batch)[kept].clamp(*bounds)
    r = (adv / c / 2.0 + 0.5).clamp(0.0, 1.0)
    r_theta = implicit_reward(v[kept], v_old[kept], target[kept], adaptive_logp)
    index, num_groups = dense_group_index(torch.as_tensor(group_ids, device=v.device).reshape(batch)[kept])

    def matching(sign: float) -> Tensor:
        p = _group_weights(r, index, num_groups, weight_temp, sign)
        centered = within_group_centering(r, index, num_groups, p)
        with torch.no_grad():
            centers = torch.zeros(num_groups, dtype=r_theta.dtype, device=r.device).index_add_(
                0, index, p * r_theta.detach())
        centered_theta = r_theta - centers[index]
        if crd_loss_type == "bce":
            return F.binary_cross_entropy_with_logits(crd_beta * centered_theta, torch.sigmoid(centered))
        return ((crd_beta * centered_theta - centered) ** 2).mean()

    unweighted = matching(1.0) if weight_temp < 0 else 0.5 * (matching(1.0) + matching(-1.0))
    policy_loss = unweighted * c / crd_beta
    loss = policy_loss
    kl_loss = torch.zeros((), dtype=torch.float32, device=v.device)
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError(f"kl_beta={kl_beta} > 0 needs v_ref; pass it or set kl_beta=0")
        kl = _mean_over_dims((v[kept].to(torch.float32) - v_ref[kept].detach().to(torch.float32)) ** 2)
        if reward_adaptive_kl:
            floor = 1e-4 / kl_beta
            kl_loss = kl_beta * ((floor + r * (1.0 - floor)) * kl).mean()
        else:
            kl_loss = kl_beta * kl.mean()
        loss = loss + kl_loss
    return {
        "loss": loss,
        "policy_loss": policy_loss.detach(),
        "unweighted_policy_loss": unweighted.detach(),
        "kl_loss": kl_loss.detach(),
        "r_theta_mean": r_theta.detach().mean(),
        "r_mean": r.mean(),
    }
