"""GRPO-Guard: GRPO with the RatioNorm-normalised ratio and TempFlow-style per-step reweighting."""

from __future__ import annotations

import math
from typing import Literal

import torch

from flowrl.algorithms.grpo import GRPO
from flowrl.dynamics import FlowSDE, StepOutput
from flowrl.errors import ConfigError
from flowrl.losses import grpo_guard_loss
from flowrl.policy import PolicyConfig

GUARD_LOSS_WEIGHTINGS = ("inverse_dt", "none")


class GRPOGuard(GRPO):
    """``trainer_type: grpo-guard`` (only with ``dynamics: flowrl.dynamics.FlowSDE``).

    At trained step ``k`` (``s -> s'``, ``dt = s' - s < 0``), with the step means stored at rollout
    (``mean_old``) and recomputed now (``mean_new``)::

        scale = std_dev_t(s, s') * sqrt(-dt)                         # the step's std
        bias  = mean_over_dims((mean_new - mean_old)**2) / (2 * scale**2)
        ratio = exp((log_prob_new - log_prob_old + bias) * scale)
        loss  = clipped PPO loss on that ratio, divided by (-dt)

    (:func:`flowrl.losses.grpo_guard_loss`). The division by ``-dt`` is the GRPO-Guard authors' form
    (``guard_loss_weighting: inverse_dt``, the default: their ``train_sd3_GRPO_Guard.py`` divides the
    policy loss by ``sqrt_dt.mean()**2``); ``guard_loss_weighting: none`` leaves it out, as the guide's
    system users migrate from does (its reweighting is only the ``scale`` in the ratio), for configs
    tuned there. Without the division, clip ranges and learning rates mean what they mean there. The reference code puts the batch mean of ``sqrt(-dt)`` in
    ``scale``; here every sample of a training unit is at the same step of the same schedule, so that
    batch mean is exactly the step's ``sqrt(-dt)``, and ``scale`` is the scalar std of the step. A KL
    term (:class:`callbacks.ReferenceModel`) is added as in :class:`GRPO`.
    """

    trainer_type = "grpo-guard"
    stores_means = True

    def __init__(self, policy: PolicyConfig, guard_loss_weighting: Literal["inverse_dt", "none"] = "inverse_dt",
                 **kwargs):
        """Other options: see :class:`GRPO`.

        Args:
            policy: the pretrained pipeline and which of its parameters train.
            guard_loss_weighting: ``inverse_dt`` divides each trained step's loss by -dt (the GRPO-Guard authors'
                code); ``none`` does not (the guide's system).
        """
        if guard_loss_weighting not in GUARD_LOSS_WEIGHTINGS:
            raise ConfigError(f"guard_loss_weighting={guard_loss_weighting!r}; choose one of {GUARD_LOSS_WEIGHTINGS}")
        super().__init__(policy, **kwargs)
        self.guard_loss_weighting = guard_loss_weighting

    def check_dynamics(self) -> None:
        if not isinstance(self.dynamics, FlowSDE):
            raise ConfigError(
                f"trainer_type 'grpo-guard' normalises the ratio of Flow-SDE steps only; got dynamics "
                f"{self.dynamics.name!r}. Set dynamics: flowrl.dynamics.FlowSDE, or use trainer_type: grpo for "
                "Dance-SDE / CPS (and nft / awm for ODE sampling)"
            )
        super().check_dynamics()  # noise_level 0 (a step std of 0) is refused there

    def step_scale(self, s: float, s_next: float) -> tuple[float, float]:
        """``(scale, dt)`` of the step ``s -> s_next``: ``scale = std_dev_t * sqrt(-dt)``."""
        dt = s_next - s
        return float(self.dynamics.std_dev_t(s, s_next)) * math.sqrt(-dt), dt

    def policy_loss(self, rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int, out: StepOutput,
                    s: float, s_next: float) -> dict[str, torch.Tensor]:
        if rollout.means is None:
            raise RuntimeError("GRPO-Guard needs the step means stored at rollout (stores_means = True)")
        scale, dt = self.step_scale(s, s_next)
        if not scale > 0:
            raise ConfigError(f"GRPO-Guard: the step {s:.4f} -> {s_next:.4f} has std 0; use noise_level > 0")
        return grpo_guard_loss(out.log_prob, rollout.log_probs[idx, k], out.mean, rollout.means[idx, k], scale, dt,
                               advantages[idx], self.clip_range, self.adv_clip_range,
                               divide_by_dt=self.guard_loss_weighting == "inverse_dt")
