"""Flow-GRPO / DanceGRPO / MixGRPO: clipped-ratio policy gradient over SDE sampling steps."""

from __future__ import annotations

import torch

from flowrl.algorithms.base import FlowRLModule
from flowrl.dynamics import StepOutput
from flowrl.losses import grpo_loss, kl_v_based, kl_x_based
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout
from flowrl.validation import check_range_option


class GRPO(FlowRLModule):
    """``trainer_type: grpo``. Rollouts with SDE ``dynamics`` (FlowSDE, DanceSDE, CPS) at the trained steps
    (``step_selection``: ``TrainSteps`` for MixGRPO's ``train_steps`` / ``num_train_steps``, or the progressive
    ``SlidingWindow``), ODE elsewhere; then
    ``num_inner_epochs`` of PPO-style updates on the stored trajectory.

    KL to a frozen reference: add a :class:`callbacks.ReferenceModel` (``kl_beta``, ``kl_type``,
    ``ref_param_device``) to the trainer callbacks. Each trained step's loss then gets ``kl_beta * KL``:

    * ``x-based``: ``mean_over_dims((mean - mean_ref)**2) / (2 * std_dev_t**2)`` on the step means, where
      ``mean_ref`` is the same dynamics step taken with the reference velocity and ``std_dev_t`` is the
      dynamics' coefficient at that step;
    * ``v-based``: ``mean_over_dims((v - v_ref)**2)``.

    Only the reference forward pass runs without gradient; it runs *before* the policy's forward pass,
    so a reference swapped into the live parameters never touches tensors saved for backward.
    """

    trainer_type = "grpo"
    recomputes_rollout_velocities = True

    def __init__(self, policy: PolicyConfig, clip_range: float | list[float] | None = 1e-4, **kwargs):
        """Other options: see :class:`~flowrl.algorithms.base.FlowRLModule`.

        Args:
            policy: the pretrained pipeline and which of its parameters train.
            clip_range: PPO clip of the ratio, c (ratio in [1 - c, 1 + c]) or [low, high] (ratio in
                [1 + low, 1 + high], low < 0 < high); null = no clipping.
        """
        check_range_option("clip_range", clip_range, what="; null disables clipping")
        super().__init__(policy, **kwargs)
        self.clip_range = clip_range

    def step_forward(self, rollout: Rollout, idx: torch.Tensor, k: int):
        """Recompute trained step ``k`` for samples ``idx``: returns (step output, velocity, sigma, sigma_next)."""
        step = rollout.train_steps[k]
        s, s_next = rollout.sigmas[step].item(), rollout.sigmas[step + 1].item()
        cond = rollout.cond.select(idx)
        x = rollout.latents[idx, k]
        # Before the iteration's first update the weights are the sampling ones: the rollout's unconditional
        # branch (no gradient) is what recomputing it would give (the update loop drops it at the first step).
        v_u = None if rollout.v_uncond is None else rollout.v_uncond[idx, k]
        v = self.policy.velocity(x, s, cond, self.guidance_scale, uncond_velocity=v_u)
        out = self.dynamics.step(x, v, s, s_next, prev_sample=rollout.next_latents[idx, k])
        return out, v, s, s_next

    def reference_velocity(self, rollout: Rollout, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Velocity of the KL reference model at trained step ``k`` for samples ``idx`` (no gradient)."""
        ref = self.kl_reference
        step = rollout.train_steps[k]
        cond = rollout.cond.select(idx)
        with ref.reference(self):
            return self.policy.velocity(rollout.latents[idx, k], rollout.sigmas[step].item(), cond, self.guidance_scale)

    def kl_divergence(self, rollout: Rollout, idx: torch.Tensor, k: int, out: StepOutput, v: torch.Tensor,
                      v_ref: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        """Per-sample ``(B,)`` KL to the reference at one trained step (``kl_type`` of the ReferenceModel)."""
        if self.kl_reference.kl_type == "v-based":
            return kl_v_based(v, v_ref)
        x = rollout.latents[idx, k]
        ref_mean = self.dynamics.step(x, v_ref, s, s_next, prev_sample=rollout.next_latents[idx, k]).mean
        return kl_x_based(out.mean, ref_mean, self.dynamics.std_dev_t(s, s_next))

    def policy_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int, out: StepOutput,
                    s: float, s_next: float) -> dict[str, torch.Tensor]:
        """The clipped policy-gradient terms of one trained step (without the KL term)."""
        return grpo_loss(out.log_prob, rollout.log_probs[idx, k], advantages[idx], self.clip_range, self.adv_clip_range)

    def training_loss(self, rollout, advantages, idx, k):
        ref = self.kl_reference
        v_ref = self.reference_velocity(rollout, idx, k) if ref is not None else None
        out, v, s, s_next = self.step_forward(rollout, idx, k)
        terms = self.policy_loss(rollout, advantages, idx, k, out, s, s_next)
        if ref is not None:
            kl = self.kl_divergence(rollout, idx, k, out, v, v_ref, s, s_next)
            terms["policy_loss"] = terms["loss"].detach()
            terms["kl"] = kl.detach().mean()
            terms["loss"] = terms["loss"] + ref.kl_beta * kl.mean()
        return terms
