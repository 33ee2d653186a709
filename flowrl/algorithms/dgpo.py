"""DGPO, Direct Group Preference Optimization: a group-level preference loss on the forward process (decoupled).

Checked against (formulas and defaults, not code):

* the DGPO authors' ``Luo-Yihong/DGPO`` ``scripts/train_sd3_dgpo.py`` (``compute_group_dgpo_loss_allreduce``,
  the shared per-group training noise, the DSM clipping) and ``config/dgpo.py`` (``beta_dpo`` 100/101,
  ``clip_range`` 1e-2 on GenEval and OCR, ``use_shared_noise``, ``num_inner_epochs`` 1);
* Flow-Factory's ``X-GenGroup/Flow-Factory`` ``src/flow_factory/trainers/rl/dgpo.py`` and
  ``src/flow_factory/hparams/training_args/dgpo.py`` (the option names ``dpo_beta``, ``use_shared_noise``,
  ``clip_dsm``, ``clip_range``, ``use_ema_ref``, ``kl_beta``; ``use_ema_ref`` is TDM-R1's dynamic reference,
  ``Luo-Yihong/TDM-R1``).

The loss (:func:`flowrl.losses.dgpo.dgpo_loss`): per sample the denoising error ``dsm = mean((v - (eps - x0))**2)``
and the reference's ``ref_dsm``; per group ``S_g = sum_i A_i * dpo_beta * (dsm_i - ref_dsm_i) / group_size``
(detached); ``loss = mean(sigmoid(S_g) * A * dsm)``, the DSM of samples whose ratio ``exp(old_dsm - dsm)`` left
``[1 + low, 1 + high]`` on the advantage's side kept as a constant (``clip_dsm``), plus the v-based KL of an enabled
``callbacks.ReferenceModel``.

Where flowrl differs, and why:

* **The old policy of the DSM clip** is flowrl's decoupled "old" policy (the weights that sampled the rollout: the
  EMA with ``callbacks.EMA`` + ``callbacks.OffPolicySampling``, else the live weights of the iteration start), not
  a second fast EMA beside the sampling one. The authors' fast EMA (decay ``min(0.3, 0.001 * step)``) is
  ``callbacks.EMA(ema_decay: 0.3, ema_decay_schedule: piecewise_linear, flat_steps: 0, ramp_rate: 0.001)``; the
  authors switch sampling to it after ``switch_ema_ref`` steps, flowrl samples with it from the start when
  ``OffPolicySampling`` is on (one EMA, one meaning).
* **The frozen reference** is the base model: with LoRA the adapter-disabled network (no copy), with full
  fine-tuning the copy of an enabled ``callbacks.ReferenceModel`` (whose ``kl_beta`` then also adds its KL term).
  ``use_ema_ref: true`` uses the old (EMA) policy instead, as TDM-R1.
* **Training times** are drawn by flowrl's decoupled time sampling (``time_sampling_strategy`` ...), per group
  rather than one set for the whole batch: with ``use_shared_noise`` every member of a group gets its group's
  training times *and* noise (the same draw, keyed by the group's first sample), so the DSM deltas of a group are
  compared at equal ``(t, eps)``, on every process alike.
* **Group completeness** is a construction rule, not a collective: DGPO's sigmoid needs each group's whole sum.
  flowrl's data module gives every process whole groups, contiguous and never spanning processes
  (``flowrl.data.GroupBatchSampler``), and the first inner epoch's micro-batches keep the rollout order, so a
  ``train_batch_size`` that is a multiple of ``group_size`` puts every group inside one micro-batch (hence one
  optimizer step and one process) and the group sum needs no all-reduce. A ``train_batch_size`` that is not, or
  ``num_inner_epochs > 1`` (later epochs shuffle samples across micro-batches), is refused at construction; each
  micro-batch's groups are checked again when its loss is computed.
"""

from __future__ import annotations

import torch

from flowrl.algorithms.decoupled import _TIMES_SALT, DecoupledModule
from flowrl.errors import ConfigError
from flowrl.losses.dgpo import dgpo_loss
from flowrl.policy import PolicyConfig
from flowrl.rollout import Rollout, keyed_generator
from flowrl.validation import check_number, check_range_option

__all__ = ["DGPO", "WholeGroups", "check_whole_group_micro_batches"]


def check_whole_group_micro_batches(trainer_type: str, options: dict) -> None:
    """Refuse micro-batching that could split a group across micro-batches (so across optimizer steps).
    ``options``: the constructor's keyword options (read here, not in the constructor, so that jsonargparse keeps
    the base class's types for them)."""
    group_size, train_batch_size = options.get("group_size", 8), options.get("train_batch_size")
    num_inner_epochs = options.get("num_inner_epochs", 1)
    if train_batch_size is not None and isinstance(group_size, int) and group_size >= 1 and \
            isinstance(train_batch_size, int) and train_batch_size % group_size:
        lower = max(group_size, train_batch_size // group_size * group_size)
        raise ConfigError(
            f"{trainer_type} needs every group whole in one micro-batch (its loss is computed per group), but "
            f"train_batch_size={train_batch_size} is not a multiple of group_size={group_size} and would split "
            f"groups across micro-batches and optimizer steps; set train_batch_size to a multiple of group_size "
            f"(e.g. {lower}) or null (the whole batch)")
    if isinstance(num_inner_epochs, int) and num_inner_epochs > 1:
        raise ConfigError(
            f"{trainer_type} needs every group whole in one micro-batch, but num_inner_epochs={num_inner_epochs}: "
            "inner epochs after the first shuffle samples across micro-batches and split groups; set "
            "num_inner_epochs: 1 (draw more training times per sample with num_train_timesteps instead)")


class WholeGroups:
    """What the group-wise decoupled losses (DGPO, CRD) share: each rollout keeps its samples' group labels
    (``rollout.group_ids``, ``(B,)``), and every micro-batch is checked to hold whole groups."""

    group_size: int
    trainer_type: str

    def rollout(self, prompts, group_ids=None, on_chunk=None, conditions=None) -> Rollout:
        rollout = super().rollout(prompts, group_ids, on_chunk, conditions)
        rollout.group_ids = self.group_labels(prompts, group_ids)
        return rollout

    def group_labels(self, prompts, group_ids=None) -> torch.Tensor:
        """``(B,)`` group labels: the data's ``group_ids``, or (none given) consecutive blocks of ``group_size``
        equal prompts, the layout of flowrl's data module."""
        if group_ids is not None:
            return torch.as_tensor(group_ids).reshape(-1).long().cpu()
        n, size = len(prompts), self.group_size
        blocks = [list(prompts[i:i + size]) for i in range(0, n, size)]
        if n % size or any(len(set(b)) != 1 for b in blocks):
            raise ValueError(f"{self.trainer_type}: without group_ids the prompts must come in consecutive blocks of "
                             f"group_size={size} equal prompts; pass group_ids")
        return torch.arange(n) // size

    def micro_batch_groups(self, rollout: Rollout, idx: torch.Tensor) -> torch.Tensor:
        """The group labels of samples ``idx``, after checking that each of their groups is whole there."""
        labels = getattr(rollout, "group_ids", None)
        if labels is None:
            labels = rollout.group_ids = self.group_labels(rollout.prompts)
        groups = labels[idx.cpu()]
        _, counts = torch.unique(groups, return_counts=True)
        if not bool((counts == self.group_size).all()):
            raise RuntimeError(
                f"{self.trainer_type}: a micro-batch holds part of a group (members per group {counts.tolist()}, "
                f"group_size={self.group_size}); the loss needs whole groups: use flowrl.data.PromptDataModule (whole "
                "groups, consecutive) and a train_batch_size that is a multiple of group_size")
        return groups

    def group_velocity(self, rollout: Rollout, idx: torch.Tensor, k: int):
        """``(groups, v, target, t)`` of micro-batch ``idx`` at training unit ``k``: its (whole) groups' labels, the
        trained velocity at the re-noised latents and the flow-matching target ``eps - x0``."""
        groups = self.micro_batch_groups(rollout, idx)
        x_t, x0, eps, t = self.noised(rollout, idx, k)
        v = self.policy.velocity(x_t, t, self._cond(rollout, idx), self.train_guidance_scale)
        return groups, v, eps - x0, t

    def group_leaders(self, rollout: Rollout) -> torch.Tensor:
        """``(B,)`` the index of each sample's group's first sample in this process's batch."""
        labels = rollout.group_ids
        first: dict[int, int] = {}
        return torch.tensor([first.setdefault(int(g), i) for i, g in enumerate(labels.tolist())])


class DGPO(WholeGroups, DecoupledModule):
    """``trainer_type: dgpo``. Rollouts keep only their clean latents ``x0`` (any sampler; ODE by default).

    Per training time ``t`` and noise ``eps`` (shared by a group with ``use_shared_noise``), the denoising errors of
    the policy and of the DGPO reference give each group a preference score; its sigmoid weighs the
    advantage-weighted denoising loss of the group's samples (:func:`flowrl.losses.dgpo.dgpo_loss`). Groups must be
    whole in every micro-batch (see the module docstring): ``train_batch_size`` a multiple of ``group_size`` (or
    null) and ``num_inner_epochs: 1``.

    Takes :class:`~flowrl.algorithms.decoupled.DecoupledModule`'s options as well.

    Args:
        dpo_beta: scale of the group preference inside the sigmoid (the authors' ``beta_dpo``).
        use_shared_noise: every member of a group is re-noised with the same training times and noise.
        clip_dsm: keep the denoising error of samples whose ratio ``exp(old_dsm - dsm)`` left the clip range on
            their advantage's side as a constant (PPO-style, against the old/EMA policy).
        clip_range: the DSM ratio's clip range, ``c`` or ``[low, high]`` (used when ``clip_dsm``).
        use_ema_ref: the reference of the preference is the old (EMA) policy, TDM-R1's dynamic reference, instead of
            the frozen base model.
    """

    trainer_type = "dgpo"

    def __init__(
        self,
        policy: PolicyConfig,
        dpo_beta: float = 100.0,
        use_shared_noise: bool = True,
        clip_dsm: bool = True,
        clip_range: float | list[float] = 1e-2,
        use_ema_ref: bool = False,
        **kwargs,
    ):
        check_number("dpo_beta", dpo_beta, 0, low_open=True, hint=" (100 is the default)")
        check_range_option("clip_range", clip_range, allow_none=False,
                           what=" (the DSM ratio's clip range; clip_dsm: false turns the clipping off)")
        check_whole_group_micro_batches(self.trainer_type, kwargs)
        super().__init__(policy, **kwargs)
        self.dpo_beta = float(dpo_beta)
        self.use_shared_noise = bool(use_shared_noise)
        self.clip_dsm = bool(clip_dsm)
        self.clip_range = clip_range
        self.use_ema_ref = bool(use_ema_ref)
        self._shared_draw_leaders: torch.Tensor | None = None

    def on_fit_start(self):
        self.check_frozen_reference()
        super().on_fit_start()

    def check_frozen_reference(self) -> None:
        """Full fine-tuning keeps the frozen base model only in an enabled ``callbacks.ReferenceModel``."""
        if not self.use_ema_ref and self.kl_reference is None and self.policy.finetune_type != "lora":
            raise ConfigError(
                "dgpo compares the policy with a frozen reference, which full fine-tuning keeps only in an enabled "
                "callbacks.ReferenceModel: add it to trainer.callbacks (kl_beta > 0, kl_type: v-based), or use "
                "finetune_type: lora (the adapter-disabled base model), or set model.use_ema_ref: true")

    def _sample_generators(self, n: int, *salt) -> list[torch.Generator]:
        leaders = self._shared_draw_leaders
        if leaders is None or salt != (self.iteration, _TIMES_SALT):
            return super()._sample_generators(n, *salt)
        first = self.global_rank * n  # the group's first sample's generator, as the base class keys it
        return [keyed_generator(self.seed, *salt, first + int(j)) for j in leaders]

    def training_units(self, rollout: Rollout) -> list[int]:
        if getattr(rollout, "group_ids", None) is None:
            rollout.group_ids = self.group_labels(rollout.prompts)
        self._shared_draw_leaders = self.group_leaders(rollout) if self.use_shared_noise else None
        try:
            units = super().training_units(rollout)
        finally:
            self._shared_draw_leaders = None
        forward = rollout.forward
        if not self.use_ema_ref and forward.v_ref is None:  # no ReferenceModel: the LoRA base model
            if self.policy.finetune_type != "lora":
                raise ConfigError("dgpo with full fine-tuning needs an enabled callbacks.ReferenceModel for its "
                                  "frozen reference, or model.use_ema_ref: true")
            with self.policy.adapter_disabled():
                forward.v_ref = self._frozen_velocities(rollout, units)
        return units

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int):
        groups, v, target, t = self.group_velocity(rollout, idx, k)
        forward = rollout.forward
        v_old = self._frozen(forward.v_old, idx, k)
        v_ref = self._frozen(forward.v_ref, idx, k)
        out = dgpo_loss(v, v_old if self.use_ema_ref else v_ref, target, advantages[idx], groups, self.group_size,
                        self.dpo_beta, self.adv_clip_range, v_old=v_old if self.clip_dsm else None,
                        clip_range=self.clip_range, v_kl_ref=v_ref, kl_beta=self._kl_beta())
        out["train_time_mean"] = t.detach().float().mean()
        return out
