"""Flow-DPPO: GRPO's SDE rollouts and ratio, with the ratio clip replaced by a trust region on the exact per-step
Gaussian KL between the old and the new transition (an asymmetric mask on the samples outside it)."""

from __future__ import annotations

import torch

from flowrl.algorithms.grpo import GRPO
from flowrl.dynamics import StepOutput
from flowrl.errors import ConfigError
from flowrl.losses.dppo import dppo_loss, transition_kl
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout
from flowrl.validation import check_number


class FlowDPPO(GRPO):
    """``trainer_type: dppo`` (Flow-DPPO, "Divergence Proximal Policy Optimization for Flow Matching Models",
    arXiv 2606.11025). Rollouts as :class:`GRPO` (``dynamics`` FlowSDE, DanceSDE or CPS at the trained steps, ODE
    elsewhere; ODE dynamics are refused), which also store each trained step's Gaussian mean. At trained step
    ``k`` the training pass recomputes the step (``mean``, ``std``, ``log_prob``) with the current weights; with
    the rollout's ``mean_old`` and ``log_prob_old``::

        kl     = mean_over_dims((mean - mean_old)**2) / (2 * std**2)       # per sample, this step only
        ratio  = exp(log_prob - log_prob_old)
        masked = kl >= kl_mask_threshold and ((A > 0 and ratio > 1) or (A < 0 and ratio < 1))
        loss   = mean over samples of (0 if masked else -A * ratio)

    (:func:`flowrl.losses.dppo.transition_kl`, :func:`flowrl.losses.dppo.dppo_loss`). Both transitions are
    Gaussians with the step's std, which the weights do not change, so their KL is exact and cheap: no sampled
    estimate. The mask is per sample and per trained step, one bound for both signs of the advantage, asymmetric
    in direction: a sample outside the trust region loses its gradient only while its update still moves it away
    from the old policy (probability up for A > 0, down for A < 0); a corrective move keeps it. Inside the region
    nothing is clipped.

    The KL bound. Like flowrl's log-probs, the KL is a mean over the latent's dims (C x H x W, times frames for
    video): the whole step's exact KL is ``D * kl`` for ``D`` dims. ``kl_mask_threshold`` bounds the mean, so the
    bound on the whole step's KL is ``kl_mask_threshold * D`` (SD3.5 at 512 px, 16 x 64 x 64 latents: 1e-5 bounds
    it at 0.66 nats). The threshold therefore carries over between resolutions as a per-dim bound, the way the
    authors' code and their configs use it.

    Checked against the authors' code: Tencent-Hunyuan/UniRL ``unirl/algorithms/flowdppo.py`` (the paper's own
    repository, its ``FlowDPPO/`` README and ``examples/diffusion/sd3_flowdppo.yaml``) and
    verl-project/verl-omni ``verl_omni/trainer/diffusion/diffusion_algos.py`` (``FlowDPPOLoss``, the same rule).
    Flow-Factory (X-GenGroup/Flow-Factory, every branch of the stored snapshot) has no DPPO trainer, so the option
    names are those two codebases': ``kl_mask_threshold`` (default 1e-5) and ``add_kl_coefficient`` (default true).
    The KL, the mask (per sample and step; the same threshold for A > 0 and A < 0; masked when the KL is at or
    above it and the ratio moves with the advantage), the unclipped ``-A * ratio`` surrogate and the mean over all
    samples are theirs. Where flowrl differs, and why:

    * the KL's std is the dynamics' own step std (``StepOutput.std``), so the KL is exact for Dance-SDE and CPS too;
      UniRL computes ``std_dev_t * sqrt(-dt)`` from Flow-SDE's formula whatever the sampler, and at ``sigma = 1``
      clamps the denominator's sigma to 0.99 where flowrl's :class:`~flowrl.dynamics.FlowSDE` uses the schedule's
      next sigma (the same rule as its log-probs), so the first step's KL differs slightly;
    * the advantages are clamped by the shared ``adv_clip_range`` (5 by default, as for GRPO) before the loss; the
      references do not clamp. Group-normalised advantages of a group of G stay within sqrt(G - 1), so this only
      matters with ``global_std`` or large groups; ``adv_clip_range: null`` gives the references' loss exactly;
    * the old means are the rollout's (stored at sampling, ``stores_means``) rather than a separate no-grad replay
      before the updates (UniRL's ``prepare_segment``): on-policy the training pass reproduces the rollout bit for
      bit, so they are the same numbers without a second forward pass, and the first update's KL is exactly 0;
    * a KL reference (:class:`callbacks.ReferenceModel`, ``kl_beta``) adds its term as in :class:`GRPO`; the
      references' Flow-DPPO has none (use ``kl_beta: 0``, the default, for their setup).
    """

    trainer_type = "dppo"
    stores_means = True
    #: GRPO's option this class sets itself (the trust region replaces the ratio clip)
    fixed_options = ("clip_range",)

    def __init__(self, policy: PolicyConfig, kl_mask_threshold: float = 1e-5, add_kl_coefficient: bool = True,
                 **kwargs):
        """Other options: see :class:`~flowrl.algorithms.base.FlowRLModule` (GRPO's ``clip_range`` does not apply:
        the KL mask replaces it).

        Args:
            policy: the pretrained pipeline and which of its parameters train.
            kl_mask_threshold: the trust region's bound on the per-sample, per-step transition KL (a mean over the
                latent's dims); a sample at or above it loses its gradient when its update moves it further away.
            add_kl_coefficient: divide the squared mean shift by the step's variance (the exact KL); false uses
                ``mean_over_dims((mean - mean_old)**2) / 2`` (the references' unnormalised variant).
        """
        if "clip_range" in kwargs:
            raise ConfigError("Flow-DPPO has no ratio clip: its trust region is the KL mask (kl_mask_threshold); "
                              "remove clip_range")
        check_number("kl_mask_threshold", kl_mask_threshold, 0, low_open=True,
                     hint=" (the bound on the mean-over-dims KL between old and new step; the authors' default is 1e-5)")
        if not isinstance(add_kl_coefficient, bool):
            raise ConfigError(f"add_kl_coefficient must be true or false, got {add_kl_coefficient!r}")
        super().__init__(policy, clip_range=None, **kwargs)
        self.kl_mask_threshold = float(kl_mask_threshold)
        self.add_kl_coefficient = add_kl_coefficient

    def policy_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int, out: StepOutput,
                    s: float, s_next: float) -> dict[str, torch.Tensor]:
        """The KL-masked policy terms of one trained step (without a reference KL term)."""
        if rollout.means is None:
            raise RuntimeError("Flow-DPPO needs the step means stored at rollout (stores_means = True)")
        kl = transition_kl(out.mean, rollout.means[idx, k], out.std if self.add_kl_coefficient else None)
        return dppo_loss(out.log_prob, rollout.log_probs[idx, k], kl, advantages[idx], self.kl_mask_threshold,
                         self.adv_clip_range)
