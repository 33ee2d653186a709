"""AWM, Advantage Weighted Matching: the flow-matching loss weighted by advantages (decoupled paradigm)."""

from __future__ import annotations

import logging
import warnings

import torch

from flowrl.algorithms.decoupled import DecoupledModule, _disabled
from flowrl.errors import ConfigError
from flowrl.losses import AWM_WEIGHTINGS, awm_loss
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout
from flowrl.validation import check_number, check_range_option

log = logging.getLogger(__name__)

_UNCONSTRAINED = (
    "AWM with ema_kl_beta=0 and clip_range disabled has no constraint on its updates: the advantage-weighted "
    "matching loss then tends to diverge (reward hacking, collapse). Set ema_kl_beta: 0.1 (with callbacks.EMA in "
    "trainer.callbacks) and/or clip_range: 1.0e-5."
)


class AWM(DecoupledModule):
    """``trainer_type: awm``. Rollouts keep only their clean latents ``x0``; any sampler works
    (``dynamics``: the ODE by default).

    Per training time ``t`` and fresh ``eps``: ``x_t = (1 - t) x0 + t eps``, the surrogate log-prob
    ``lp`` of the matching error ``mean((v - (eps - x0))**2)`` under ``awm_weighting``, and the same
    for the sampling policy's velocity (same ``eps`` and ``t``), ``lp_old``; then a PPO-clipped loss on
    ``exp(lp - lp_old)`` with the clamped advantages, plus ``ema_kl_beta * mean((v - v_ema)**2)`` and,
    with an enabled ``callbacks.ReferenceModel`` (``kl_type: v-based``), its ``kl_beta`` term
    (:func:`flowrl.losses.awm_loss`). On-policy, before an update, every ratio is exactly 1.

    Takes :class:`~flowrl.algorithms.decoupled.DecoupledModule`'s options as well.

    Args:
        awm_weighting: Uniform, t, t**2, huber or ghuber.
        ghuber_power: the power of ``ghuber``.
        ema_kl_beta: weight of the velocity-space KL to the EMA policy (needs ``callbacks.EMA``).
        clip_range: PPO clip range of the ratio, c or [low, high] (null disables clipping). Disabling both this and
            ``ema_kl_beta`` warns loudly: AWM then easily collapses.
    """

    trainer_type = "awm"

    def __init__(
        self,
        policy: PolicyConfig,
        awm_weighting: str = "Uniform",
        ghuber_power: float = 0.25,
        ema_kl_beta: float = 0.0,
        clip_range: float | None = 1e-5,
        **kwargs,
    ):
        if awm_weighting not in AWM_WEIGHTINGS:
            raise ConfigError(f"unknown awm_weighting {awm_weighting!r}; choose one of {', '.join(AWM_WEIGHTINGS)}")
        check_number("ghuber_power", ghuber_power, 0, low_open=True, hint=" (0.25 is the default)")
        check_number("ema_kl_beta", ema_kl_beta, 0, hint=" (0 disables the EMA KL term)")
        if _disabled(ema_kl_beta) and _disabled(clip_range):
            warnings.warn(_UNCONSTRAINED, UserWarning, stacklevel=2)
            log.warning(_UNCONSTRAINED)
        check_range_option("clip_range", clip_range, what="; null disables clipping")
        super().__init__(policy, **kwargs)
        self.clip_range = clip_range
        self.awm_weighting = awm_weighting
        self.ghuber_power = float(ghuber_power)
        self.ema_kl_beta = float(ema_kl_beta)

    def needs_ema_velocity(self) -> bool:
        return self.ema_kl_beta > 0

    def on_fit_start(self):
        super().on_fit_start()
        if self.ema_kl_beta > 0:
            ema = self._ema_callback()
            if ema is None:
                raise ConfigError(
                    f"ema_kl_beta={self.ema_kl_beta} needs an EMA of the policy, but the trainer has no EMA callback: "
                    "add callbacks.EMA to trainer.callbacks (e.g. ema_decay: 0.9, ema_decay_schedule: power), "
                    "or set model.ema_kl_beta: 0"
                )
            if not ema.enabled:
                warnings.warn("ema_kl_beta > 0 but the EMA callback has ema_decay=0: the 'EMA' is the live weights "
                              "of the iteration start, so the EMA KL term only limits each iteration's step", stacklevel=2)

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int):
        x_t, x0, eps, t = self.noised(rollout, idx, k)
        v = self.policy.velocity(x_t, t, self._cond(rollout, idx), self.train_guidance_scale)
        out = awm_loss(
            v,
            self._frozen(rollout.forward.v_old, idx, k),
            eps - x0,
            t,
            advantages[idx],
            self.awm_weighting,
            self.clip_range,
            self.adv_clip_range,
            self.ghuber_power,
            v_ref=self._frozen(rollout.forward.v_ref, idx, k),
            kl_beta=self._kl_beta(),
            v_ema=self._frozen(rollout.forward.v_ema, idx, k),
            ema_kl_beta=self.ema_kl_beta,
        )
        out["train_time_mean"] = t.detach().float().mean()
        return out
