"""CRD, Centered Reward Distillation: the implicit reward matched to the within-prompt centered reward (decoupled).

Checked against (formulas and defaults, not code): Flow-Factory's ``X-GenGroup/Flow-Factory``
``src/flow_factory/trainers/rl/crd.py`` (``_implicit_reward``, ``_compute_crd_loss``, ``_kl_loss``) and
``src/flow_factory/hparams/training_args/crd.py`` (option names and defaults ``crd_beta`` 1, ``crd_loss_type`` mse,
``adaptive_logp`` true, ``weight_temp`` -1, ``kl_cfg`` 4.5, ``reward_adaptive_kl`` true, ``kl_beta`` 0.1,
``timestep_range`` 0.99), which follows the paper's code (Zhu et al., "Diffusion Reinforcement Learning via
Centered Reward Distillation", arXiv 2603.14128; the authors' own repository was not found in the public index).

The loss (:func:`flowrl.losses.crd.crd_loss`): the implicit reward ``r_theta = -(err(v) - err(v_old))`` (each
squared velocity error normalised by its own mean absolute error with ``adaptive_logp``) and the reward mapped to
``r = clamp(A / c / 2 + 0.5, 0, 1)`` are both centred within each prompt's group, and ``crd_beta * r_theta_c`` is
matched to ``r_c`` (squared error, or BCE against ``sigmoid(r_c)``), scaled by ``c / crd_beta``; plus the KL to the
reference at guidance ``kl_cfg`` (the paper's CFG-guided anchor), weighted per sample by the reward with
``reward_adaptive_kl``.

Where flowrl differs, and why:

* **Centering is within each group** (each prompt's samples), as the paper derives it (the prompt's normaliser
  cancels only between samples of the same prompt). Flow-Factory centres over the whole gathered micro-batch of all
  processes, which equals it when that micro-batch is one group. In flowrl a micro-batch holds whole groups (the
  same construction rule as DGPO: ``train_batch_size`` a multiple of ``group_size`` or null, ``num_inner_epochs:
  1``; groups never span processes, ``flowrl.data`` shards whole groups), so no gather is needed.
* **One old model**: the implicit reward's baseline is flowrl's decoupled "old" policy, the weights that sampled
  the rollout (the EMA with ``callbacks.EMA`` + ``callbacks.OffPolicySampling``). The paper keeps two snapshots
  with separate blend schedules (``old_model_decay``, ``sampling_model_decay``); flowrl's single EMA callback is
  both, so those two options and ``use_old_for_loss`` are not offered.
* **The KL reference** is an enabled ``callbacks.ReferenceModel`` (its ``kl_beta``; LoRA: the adapter-disabled
  base model), evaluated at guidance ``kl_cfg`` instead of ``train_guidance_scale``; without one there is no KL term.
"""

from __future__ import annotations

import math

import torch

from callbacks import ReferenceModel
from flowrl.algorithms.decoupled import DecoupledModule
from flowrl.algorithms.dgpo import WholeGroups, check_whole_group_micro_batches
from flowrl.errors import ConfigError
from flowrl.losses.crd import CRD_LOSS_TYPES, crd_loss
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout
from flowrl.validation import check_number, check_range_option

__all__ = ["CRD"]


class CRD(WholeGroups, DecoupledModule):
    """``trainer_type: crd``. Rollouts keep only their clean latents ``x0`` (any sampler; ODE by default).

    Per training time ``t`` and fresh ``eps``, the policy's implicit reward against the old (sampling) policy is
    matched to the reward, both centred within each prompt's group (:func:`flowrl.losses.crd.crd_loss`). Groups
    must be whole in every micro-batch: ``train_batch_size`` a multiple of ``group_size`` (or null) and
    ``num_inner_epochs: 1``. The KL anchor is an enabled ``callbacks.ReferenceModel`` (``kl_type: v-based``).

    Takes :class:`~flowrl.algorithms.decoupled.DecoupledModule`'s options as well.

    Args:
        crd_beta: scale of the implicit reward matched to the centred reward.
        crd_loss_type: ``mse`` (squared error) or ``bce`` (logistic, against ``sigmoid`` of the centred reward).
        adaptive_logp: normalise each squared velocity error of the implicit reward by its own mean absolute error.
        weight_temp: centering weights within a group: < 0 uniform (the group mean); 0 the positive / negative
            samples' means (two directions averaged); > 0 ``softmax(+-r / weight_temp)``.
        kl_cfg: guidance scale of the reference's velocity in the KL term (1 = none; the paper anchors to the
            CFG-guided base model).
        reward_adaptive_kl: weight each sample's KL by its reward (``1e-4 / kl_beta + r (1 - 1e-4 / kl_beta)``).
    """

    trainer_type = "crd"

    def __init__(
        self,
        policy: PolicyConfig,
        crd_beta: float = 1.0,
        crd_loss_type: str = "mse",
        adaptive_logp: bool = True,
        weight_temp: float = -1.0,
        kl_cfg: float = 4.5,
        reward_adaptive_kl: bool = True,
        **kwargs,
    ):
        check_number("crd_beta", crd_beta, 0, low_open=True, hint=" (1.0 is the default)")
        if crd_loss_type not in CRD_LOSS_TYPES:
            raise ConfigError(f"unknown crd_loss_type {crd_loss_type!r}; choose one of {', '.join(CRD_LOSS_TYPES)}")
        if isinstance(weight_temp, bool) or not isinstance(weight_temp, (int, float)) or not math.isfinite(weight_temp):
            raise ConfigError(f"weight_temp={weight_temp!r}: it must be a finite number (< 0: uniform centering, 0: "
                              "the positive / negative samples, > 0: a softmax temperature)")
        check_number("kl_cfg", kl_cfg, 1.0, hint=" (1 = no guidance on the reference)")
        check_range_option("adv_clip_range", kwargs.get("adv_clip_range", 5.0), allow_none=False,
                           what=" (crd maps the clamped advantages to [0, 1] with it)")
        check_whole_group_micro_batches(self.trainer_type, kwargs)
        super().__init__(policy, **kwargs)
        self.check_guidance(kl_cfg)
        self.crd_beta = float(crd_beta)
        self.crd_loss_type = crd_loss_type
        self.adaptive_logp = bool(adaptive_logp)
        self.weight_temp = float(weight_temp)
        self.kl_cfg = float(kl_cfg)
        self.reward_adaptive_kl = bool(reward_adaptive_kl)
        self._hide_reference = False
        self._frozen_guidance: float | None = None

    @property
    def kl_reference(self) -> ReferenceModel | None:
        return None if self._hide_reference else super().kl_reference

    def train_velocity(self, rollout: Rollout, idx: torch.Tensor, k: int) -> torch.Tensor:
        x_t, _, _, t = self.noised(rollout, idx, k)
        guidance = self.train_guidance_scale if self._frozen_guidance is None else self._frozen_guidance
        return self.policy.velocity(x_t, t, self._cond(rollout, idx), guidance)

    def training_units(self, rollout: Rollout) -> list[int]:
        if getattr(rollout, "group_ids", None) is None:
            rollout.group_ids = self.group_labels(rollout.prompts)
        ref = self.kl_reference
        self._hide_reference = True  # the base class would evaluate the reference at train_guidance_scale
        try:
            units = super().training_units(rollout)
        finally:
            self._hide_reference = False
        if ref is not None:
            self._frozen_guidance = self.kl_cfg
            try:
                with ref.reference(self):
                    rollout.forward.v_ref = self._frozen_velocities(rollout, units)
            finally:
                self._frozen_guidance = None
        return units

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int):
        groups, v, target, t = self.group_velocity(rollout, idx, k)
        forward = rollout.forward
        out = crd_loss(v, self._frozen(forward.v_old, idx, k), target, advantages[idx], groups, self.crd_beta,
                       self.adv_clip_range, self.adaptive_logp, self.crd_loss_type, self.weight_temp,
                       self._frozen(forward.v_ref, idx, k), self._kl_beta(), self.reward_adaptive_kl)
        out["train_time_mean"] = t.detach().float().mean()
        return out
