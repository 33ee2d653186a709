"""DiffusionOPD, on-policy distillation: the per-step Gaussian KL between the student's transition and each
teacher's on the student's own trajectory (pure functions, float32).

Conventions as in :mod:`flowrl.losses`: per-sample tensors are ``(B,)``, "mean over dims" is over every non-batch
dimension, the teachers' side is detached here, and the math runs in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flowrl.losses.dppo import transition_kl

__all__ = ["opd_loss"]


def opd_loss(
    mean: Tensor,
    teacher_means: Mapping[str, Tensor],
    weights: Mapping[str, float],
    std: Tensor | float | None = None,
    coef: float = 1.0,
) -> dict[str, Tensor]:
    """The distillation loss of one trained step.

    For teacher ``j`` (a key of ``teacher_means`` and ``weights``) with weight ``w_j`` and transition mean ``mu_j``
    (the same step taken with its velocity from the same ``x``)::

        kl_j = mean_over_dims((mean - mu_j)**2) / (2 * std**2)      # per sample; std=None: / 2 (mean matching)
        loss = coef * mean over samples of sum_j w_j * kl_j

    Both transitions of an SDE step are Gaussians with the step's std, so ``kl_j`` is their exact KL (as a mean over
    the dims); under the ODE (``std=None``) it is half the squared distance of the means, whose gradient is the
    same direction. With several teachers the minimiser is the weights' average of the teacher means.

    Returns ``loss`` (to back-propagate), ``distill_kl`` (the weighted sum's batch mean, detached) and
    ``distill_kl_<j>`` (each teacher's batch mean, detached).
    """
    if not teacher_means or set(teacher_means) != set(weights):
        raise ValueError(f"teachers {sorted(teacher_means)} but weights for {sorted(weights)}; give one weight a teacher")
    kls = {j: transition_kl(mean, mu, std) for j, mu in teacher_means.items()}
    total = torch.stack([weights[j] * kl for j, kl in kls.items()]).sum(0)
    out = {"loss": coef * total.mean(), "distill_kl": total.detach().mean()}
    out.update({f"distill_kl_{j}": kl.detach().mean() for j, kl in kls.items()})
    return out
