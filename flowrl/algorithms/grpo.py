"""Flow-GRPO / DanceGRPO / MixGRPO: clipped-ratio policy gradient over SDE sampling steps."""

from __future__ import annotations

import torch

from flowrl.algorithms.base import FlowRLModule, Rollout
from flowrl.losses import grpo_loss


class GRPO(FlowRLModule):
    """``trainer_type: grpo``. Rollouts with SDE dynamics (``dynamics_type``: Flow-SDE, Dance-SDE, CPS)
    at the trained steps (MixGRPO ``train_steps`` / ``num_train_steps``), ODE elsewhere; then
    ``num_inner_epochs`` of PPO-style updates on the stored trajectory."""

    trainer_type = "grpo"

    def step_forward(self, rollout: Rollout, idx: torch.Tensor, k: int):
        """Recompute trained step ``k`` for samples ``idx``: returns (step output, velocity, sigma, sigma_next)."""
        step = rollout.train_steps[k]
        s, s_next = rollout.sigmas[step].item(), rollout.sigmas[step + 1].item()
        cond = {name: t[idx] for name, t in rollout.cond.items()}
        x = rollout.latents[idx, k]
        v = self.policy.velocity(x, s, cond, self.guidance_scale)
        out = self.dynamics.step(x, v, s, s_next, prev_sample=rollout.next_latents[idx, k])
        return out, v, s, s_next

    def training_loss(self, rollout, advantages, idx, k):
        out, _, _, _ = self.step_forward(rollout, idx, k)
        return grpo_loss(out.log_prob, rollout.log_probs[idx, k], advantages[idx], self.clip_range, self.adv_clip_range)
