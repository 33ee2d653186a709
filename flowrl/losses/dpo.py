"""Diffusion-DPO: chosen/rejected pairs within groups and the preference loss on denoising errors.

Pure functions on tensors, float32 math whatever the inputs' dtype. Conventions:

* a per-sample *denoising error* is ``mean_over_dims((v - target)**2)``, ``(B,)``; flow matching predicts the
  velocity, so ``target = eps - x0`` (the original Diffusion-DPO predicts the noise: ``target = eps``);
* the chosen (preferred, "w") and rejected ("l") arms of a pair share the noise level ``t`` and the noise ``eps``;
* the reference side (its two errors) is detached here, so no gradient can reach a frozen network by accident.

The loss (Diffusion-DPO, Wallace et al. 2023, as its authors' training script computes it)::

    policy_diff = err_w - err_l                  # the policy's errors on the chosen and rejected arms
    ref_diff    = ref_err_w - ref_err_l          # the reference's, same x_t and t
    logits      = -beta / 2 * (policy_diff - ref_diff)
    loss        = mean(-logsigmoid(logits))

``beta`` (``dpo_beta``) is the paper's ``beta * T`` folded into one number (T = the number of diffusion timesteps,
1000): large values (2000 to 5000) because the error differences are small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["denoising_error", "dpo_loss", "dpo_pairs"]


def denoising_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``mean_over_dims((prediction - target)**2)``, ``(B,)`` float32 (the target is detached)."""
    diff = prediction.to(torch.float32) - target.detach().to(torch.float32)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def dpo_pairs(advantages: Tensor, group_ids: Tensor, keep: Tensor | None = None) -> Tensor:
    """One ``(chosen, rejected)`` index pair per group: the group's highest and lowest advantage.

    The rule of Flow-Factory's online DPO trainer (best and worst of each group), with two refinements: a group
    whose kept members all have the same advantage (all-equal rewards) gives no pair (Flow-Factory would pair a
    sample with itself, a zero-gradient term that still counts in the mean), and so does a group with fewer than
    two kept members. Ties go to the first index. Groups come in the order of their first member.

    Args:
        advantages: ``(B,)`` per-sample advantages (any monotone transform of the group's rewards gives the
            same pairs).
        group_ids: ``(B,)`` group of each sample.
        keep: ``(B,)`` bool, samples that may be paired (dropped groups are False); None = all.

    Returns:
        ``(P, 2)`` long tensor of sample indices, column 0 chosen, column 1 rejected (``(0, 2)`` if none).
    """
    adv = advantages.detach().to(torch.float64).reshape(-1).cpu()
    groups = group_ids.detach().reshape(-1).cpu()
    if adv.shape != groups.shape:
        raise ValueError(f"advantages {tuple(adv.shape)} and group_ids {tuple(groups.shape)} differ in length")
    allowed = torch.ones_like(groups, dtype=torch.bool) if keep is None else keep.detach().reshape(-1).cpu().bool()
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for g in groups.tolist():
        if g in seen:
            continue
        seen.add(g)
        members = torch.nonzero((groups == g) & allowed).reshape(-1)
        if len(members) < 2:
            continue
        values = adv[members]
        hi, lo = values.max(), values.min()
        if not bool(hi > lo):
            continue
        chosen = members[torch.nonzero(values == hi)[0, 0]]
        rejected = members[torch.nonzero(values == lo)[0, 0]]
        pairs.append((int(chosen), int(rejected)))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def dpo_loss(
    policy_chosen_error: Tensor,
    policy_rejected_error: Tensor,
    ref_chosen_error: Tensor,
    ref_rejected_error: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Diffusion-DPO loss from per-pair denoising errors (all ``(P,)``), float32.

    ``logits = -beta / 2 * ((err_w - err_l) - (ref_err_w - ref_err_l))``, ``loss = mean(-logsigmoid(logits))``.

    Returns ``loss`` (differentiable scalar) and detached diagnostics: ``implicit_accuracy`` (share of pairs with
    ``logits > 0``: the policy prefers the chosen arm more than the reference does), ``reward_margin``
    (``mean(logits)``), ``implicit_reward_chosen`` / ``implicit_reward_rejected`` (``mean(-beta / 2 *
    (err - ref_err))`` per arm), ``policy_chosen_error``, ``policy_rejected_error``, ``ref_chosen_error``,
    ``ref_rejected_error`` (means).
    """
    if not beta > 0:
        raise ValueError(f"dpo_beta must be > 0, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen_error, policy_rejected_error, ref_chosen_error,
                                       ref_rejected_error)}
    if len(shapes) != 1:
        raise ValueError(f"the four error tensors must have one shape, got {sorted(shapes)}")
    w = policy_chosen_error.to(torch.float32)
    lo = policy_rejected_error.to(torch.float32)
    ref_w = ref_chosen_error.detach().to(torch.float32)
    ref_l = ref_rejected_error.detach().to(torch.float32)
    scale = -0.5 * float(beta)
    logits = scale * ((w - lo) - (ref_w - ref_l))
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        reward_w = scale * (w - ref_w)
        reward_l = scale * (lo - ref_l)
        return {
            "loss": loss,
            "implicit_accuracy": (logits > 0).to(torch.float32).mean(),
            "reward_margin": logits.detach().mean(),
            "implicit_reward_chosen": reward_w.mean(),
            "implicit_reward_rejected": reward_l.mean(),
            "policy_chosen_error": w.detach().mean(),
            "policy_rejected_error": lo.detach().mean(),
            "ref_chosen_error": ref_w.mean(),
            "ref_rejected_error": ref_l.mean(),
        }
