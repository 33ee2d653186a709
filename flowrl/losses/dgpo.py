"""DGPO, Direct Group Preference Optimization: the group-level preference loss (pure functions, float32).

Conventions as in :mod:`flowrl.losses`: per-sample quantities are ``(B,)``, "mean over dims" is over every
non-batch dimension, the frozen side (reference / old velocities) is detached here, and the math runs in float32
whatever the dtype of the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.losses import Range, _kl_velocity, _mean_over_dims, as_range, clamp_advantages

__all__ = ["dense_group_index", "dgpo_loss", "dsm_error", "group_sums"]


def dsm_error(v: Tensor, target: Tensor) -> Tensor:
    """Denoising score-matching error of a velocity, ``(B,)`` float32: ``mean_over_dims((v - target)**2)``
    (``target = eps - x0``; differentiable in ``v``, ``target`` detached)."""
    return _mean_over_dims((v.to(torch.float32) - target.detach().to(torch.float32)) ** 2)


def dense_group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Group labels (any integers, ``(B,)``) as dense indices ``0 .. G-1`` and the number of groups ``G``."""
    unique, inverse = torch.unique(torch.as_tensor(group_ids).reshape(-1), return_inverse=True)
    return inverse, int(unique.numel())


def group_sums(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """``(num_groups,)`` sums of the per-sample ``values`` over each group (``group_index`` dense, ``(B,)``)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, group_index.to(values.device), values)


def dgpo_loss(
    v: Tensor,
    v_ref: Tensor,
    target: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    group_size: int,
    dpo_beta: float = 100.0,
    adv_clip_range: Range | None = 5.0,
    v_old: Tensor | None = None,
    clip_range: Range | None = None,
    mask: Tensor | None = None,
    v_kl_ref: Tensor | None = None,
    kl_beta: float = 0.0,
) -> dict[str, Tensor]:
    """DGPO loss of one micro-batch that holds whole groups (float32).

    With ``A`` the advantages clamped to ``adv_clip_range``, ``G = group_size``, ``target = eps - x0``::

        dsm_i     = mean_dims((v_i - target_i)**2)                       # the policy's denoising error
        ref_dsm_i = mean_dims((sg(v_ref_i) - target_i)**2)               # the DGPO reference's (frozen or EMA)
        S_g       = sum_{i in g} A_i * dpo_beta * (sg(dsm_i) - ref_dsm_i) / G
        w_i       = sg(sigmoid(S_{g(i)}))                                # one weight per group
        loss      = mean_i(w_i * A_i * dsm_i)  +  kl_beta * mean((v - sg(v_kl_ref))**2)

    ``w * A * grad(dsm)`` is the gradient of the group preference ``-log sigmoid(-S_g)`` up to ``dpo_beta / G``:
    a group whose positive samples the policy already denoises better than the reference (``S_g`` very negative)
    stops pulling.

    DSM clipping (``v_old`` given and ``clip_range`` not None): ``ratio_i = exp(old_dsm_i - sg(dsm_i))`` with
    ``old_dsm`` the old policy's error; a sample with ``A > 0`` and ``ratio > 1 + high``, or ``A <= 0`` and
    ``ratio < 1 + low`` (``(low, high) = as_range(clip_range)``) keeps ``dsm`` only as a constant (no gradient).

    ``mask`` (``(B,)`` bool, None = all kept): samples outside it take no part in the group sums nor in the mean.
    Returns ``loss``, ``policy_loss``, ``kl_loss``, ``dsm_loss``, ``ref_dsm_loss``, ``group_weight_mean``,
    ``clip_fraction`` (diagnostics detached).
    """
    if dpo_beta <= 0:
        raise ValueError(f"dpo_beta must be > 0, got {dpo_beta}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    batch = v.shape[0]
    keep = torch.ones(batch, dtype=torch.bool, device=v.device) if mask is None else mask.to(v.device).bool()
    adv = clamp_advantages(advantages.detach().to(device=v.device, dtype=torch.float32).reshape(batch),
                           adv_clip_range)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    dsm = dsm_error(v, target)
    with torch.no_grad():
        ref_dsm = dsm_error(v_ref.detach(), target)
        index, num_groups = dense_group_index(torch.as_tensor(group_ids, device=v.device))
        per_sample = adv * float(dpo_beta) * (dsm.detach() - ref_dsm) / float(group_size)
        weights = torch.sigmoid(group_sums(per_sample, index.to(v.device), num_groups))[index.to(v.device)]

    clip_fraction = torch.zeros((), dtype=torch.float32, device=v.device)
    bounds = as_range(clip_range)
    used = dsm
    if v_old is not None and bounds is not None:
        with torch.no_grad():
            ratio = torch.exp(dsm_error(v_old.detach(), target) - dsm.detach())
            clipped = torch.where(adv > 0, ratio > 1.0 + bounds[1], ratio < 1.0 + bounds[0]) & keep
        used = torch.where(clipped, dsm.detach(), dsm)
        clip_fraction = clipped[keep].to(torch.float32).mean() if keep.any() else clip_fraction

    n_kept = keep.sum().clamp_min(1).to(torch.float32)
    policy_loss = (weights * adv * used * keep).sum() / n_kept
    kl = _kl_velocity(v.to(torch.float32)[keep], None if v_kl_ref is None else v_kl_ref[keep], kl_beta,
                      "v_kl_ref", "kl_beta")
    loss = policy_loss + kl_beta * kl if kl_beta > 0 else policy_loss
    kept = keep.nonzero().reshape(-1)
    return {
        "loss": loss,
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl.detach(),
        "dsm_loss": dsm.detach()[kept].mean(),
        "ref_dsm_loss": ref_dsm[kept].mean(),
        "group_weight_mean": weights[kept].mean(),
        "clip_fraction": clip_fraction,
    }
