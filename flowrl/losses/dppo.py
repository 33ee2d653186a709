"""Flow-DPPO's pure functions: the exact KL between the old and new Gaussian transition of one sampling step, and
the policy loss whose trust region is a mask on that KL (instead of PPO's clip of the ratio).

Conventions as in :mod:`flowrl.losses`: per-sample tensors are ``(B,)``; "mean over dims" is the mean over every
non-batch dimension (so a KL here is the exact KL of the whole step divided by the number of latent dims, as
flowrl's log-probs are means); the math runs in float32 whatever the input dtype; the old side (old log-probs,
old means) and the advantages are detached here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.losses import Range, _mean_over_dims, _per_sample, clamp_advantages

__all__ = ["dppo_loss", "transition_kl"]


def transition_kl(mean: Tensor, old_mean: Tensor, std: Tensor | float | None) -> Tensor:
    """Per-sample KL between the old and the new transition of one step, ``(B,)`` float32.

    Both transitions are Gaussians with the same per-sample std ``s`` (the step's own std, which the policy does
    not change): ``N(old_mean, s^2 I)`` and ``N(mean, s^2 I)``. Their KL (either direction: equal covariances make
    it symmetric) is ``sum((mean - old_mean)**2) / (2 s**2)``; this returns its mean over the dims::

        kl = mean_over_dims((mean - old_mean)**2) / (2 * std**2)

    ``std`` is a scalar, ``(B,)`` or ``(B, 1, ..., 1)``. ``std=None`` leaves the normaliser out
    (``mean_over_dims((mean - old_mean)**2) / 2``: the reference's ``add_kl_coefficient: false``). A sample whose
    std is 0 (a deterministic step, whose log-prob flowrl defines as 0) gets KL 0: a point mass has no finite KL,
    and such a step carries no policy gradient anyway. ``old_mean`` is detached.
    """
    m = mean.to(torch.float32)
    half_sq = _mean_over_dims((m - old_mean.detach().to(torch.float32)) ** 2) / 2.0
    if std is None:
        return half_sq
    s = _per_sample(std.detach() if isinstance(std, Tensor) else std, m.shape[0], half_sq)
    zero = s <= 0
    kl = half_sq / torch.where(zero, torch.ones_like(s), s) ** 2
    return torch.where(zero, torch.zeros_like(kl), kl)


def dppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    kl: Tensor,
    advantages: Tensor,
    kl_mask_threshold: float,
    adv_clip_range: Range | None = None,
) -> dict[str, Tensor]:
    """Flow-DPPO policy loss at one trained step: the unclipped ratio surrogate under an asymmetric KL mask.

    With ``A = clamp(A, adv_clip_range)``, ``ratio = exp(log_prob - old_log_prob)`` and ``kl`` the per-sample
    transition KL (:func:`transition_kl`, the old-to-new divergence of this step)::

        masked_i = kl_i >= kl_mask_threshold  and  ((A_i > 0 and ratio_i > 1) or (A_i < 0 and ratio_i < 1))
        loss     = mean_i( 0 if masked_i else -A_i * ratio_i )

    A sample is masked (no gradient) only when it is outside the trust region *and* its update still pushes it
    further out: a positive-advantage sample whose probability already rose, a negative-advantage one whose
    probability already fell. Samples inside the region, and corrective moves outside it, keep the plain
    ``-A * ratio`` term. The mean runs over every sample, masked ones included (as zeros). ``kl`` only selects;
    no gradient flows through it.

    Returns ``loss`` (float32 scalar), ``ratio`` (``(B,)``, detached) and detached scalars: ``ratio_mean``,
    ``approx_kl`` (``0.5 * mean((log_prob - old_log_prob)**2)``), ``kl_old_mean`` / ``kl_old_max`` (the transition
    KL), ``kl_exceeded_fraction`` (KL over the threshold), ``pos_masked_fraction``, ``neg_masked_fraction`` and
    ``masked_fraction`` (the samples without gradient).
    """
    lp = log_prob.to(torch.float32)
    diff = lp - old_log_prob.detach().to(torch.float32)
    ratio = torch.exp(diff)
    adv = clamp_advantages(advantages.detach().to(torch.float32), adv_clip_range)
    kl32 = kl.detach().to(torch.float32)
    r = ratio.detach()
    exceeded = kl32 >= kl_mask_threshold
    pos_masked = exceeded & (adv > 0) & (r > 1.0)
    neg_masked = exceeded & (adv < 0) & (r < 1.0)
    masked = pos_masked | neg_masked
    # where, not multiply, on both sides of exp: a masked sample whose ratio overflows gives a loss term of 0 and a
    # gradient of 0 (not inf * 0 = nan)
    live = torch.exp(torch.where(masked, diff.detach(), diff))
    terms = torch.where(masked, torch.zeros_like(live), -adv * live)
    return {
        "loss": terms.mean(),
        "ratio": r,
        "ratio_mean": r.mean(),
        "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
        "kl_old_mean": kl32.mean(),
        "kl_old_max": kl32.max(),
        "kl_exceeded_fraction": exceeded.to(torch.float32).mean(),
        "pos_masked_fraction": pos_masked.to(torch.float32).mean(),
        "neg_masked_fraction": neg_masked.to(torch.float32).mean(),
        "masked_fraction": masked.to(torch.float32).mean(),
    }
