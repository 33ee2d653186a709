"""DiffusionNFT: negative-aware fine-tuning on the forward process (decoupled paradigm)."""

from __future__ import annotations

import torch

from flowrl.algorithms.decoupled import DecoupledModule
from flowrl.losses import nft_loss
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout
from flowrl.validation import check_number, check_range_option


class NFT(DecoupledModule):
    """``trainer_type: nft``. Rollouts keep only their clean latents ``x0``; any sampler works
    (``dynamics``: the ODE by default, CPS or an SDE for more exploration).

    Per training time ``t`` and fresh ``eps``, with ``x_t = (1 - t) x0 + t eps``, the current
    velocity ``v`` and the sampling policy's ``v_old``, the reward (through the group advantage,
    mapped to ``r`` in [0, 1] with ``adv_clip_range``) weighs an implicit positive policy
    ``beta v + (1 - beta) v_old`` against a negative one ``(1 + beta) v_old - beta v``
    (:func:`flowrl.losses.nft_loss`). Trains without classifier-free guidance by default
    (``train_guidance_scale: 1``). A KL to the reference is added when the trainer has an enabled
    ``callbacks.ReferenceModel`` (``kl_beta`` there, ``kl_type: v-based``).

    The "old" policy is the one that generated the rollout: the EMA weights with
    ``callbacks.EMA`` + ``callbacks.OffPolicySampling`` (recommended, ``ema_decay_schedule:
    piecewise_linear``), otherwise the live weights before this iteration's updates.

    Takes :class:`~flowrl.algorithms.decoupled.DecoupledModule`'s options as well.

    Args:
        nft_beta: the policy-mixing coefficient ``beta`` (1 by default; 0.1 is faster, less stable).
    """

    trainer_type = "nft"

    def __init__(self, policy: PolicyConfig, nft_beta: float = 1.0, **kwargs):
        check_number("nft_beta", nft_beta, 0, low_open=True, hint=" (1.0 is the default, 0.1 trains faster)")
        check_range_option("adv_clip_range", kwargs.get("adv_clip_range", 5.0), allow_none=False,
                           what=" (nft maps the clamped advantages to [0, 1] with it)")
        super().__init__(policy, **kwargs)
        self.nft_beta = float(nft_beta)

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int):
        x_t, x0, _, t = self.noised(rollout, idx, k)
        v = self.policy.velocity(x_t, t, self._cond(rollout, idx), self.train_guidance_scale)
        out = nft_loss(v, self._frozen(rollout.forward.v_old, idx, k), x_t, x0, t, advantages[idx], self.nft_beta,
                       self.adv_clip_range, self._frozen(rollout.forward.v_ref, idx, k), self._kl_beta())
        out["train_time_mean"] = t.detach().float().mean()
        return out
