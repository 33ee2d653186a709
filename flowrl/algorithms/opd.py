"""DiffusionOPD: on-policy distillation of one or more frozen teachers into the policy, along the policy's own
sampling trajectories, by the closed-form per-step KL between the student's and each teacher's transition."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from flowrl.algorithms.base import FlowRLModule
from flowrl.dynamics import ODE, Dynamics
from flowrl.errors import ConfigError
from flowrl.losses.opd import opd_loss
from flowrl.policy import PolicyConfig
from flowrl.policy.policy import resolve_model_path
from flowrl.policy.teacher import frozen_denoiser, teacher_kind
from flowrl.rollout import Rollout
from flowrl.validation import check_number

__all__ = ["DiffusionOPD", "Teacher"]


@dataclass
class Teacher:
    """One teacher of :class:`DiffusionOPD`.

    Args:
        path: its weights: a LoRA (``pytorch_lora_weights.safetensors`` or the folder ``flowrl export`` wrote), an
            exported model folder, a flowrl checkpoint (``.ckpt``), or a registered alias (``flowrl:toy-teacher-
            graded``).
        weight: its weight in the summed KL (> 0).
        name: its name in logs (``train/distill_kl_<name>``); null = ``teacher<i>``.
        guidance_scale: classifier-free guidance of its velocity; null = the rollout's ``guidance_scale``.
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    guidance_scale: float | None = None


class _Frozen(nn.ModuleList):
    """The teachers: moved with the module, never trained, never switched to train mode (no dropout)."""

    def train(self, mode: bool = True):
        return super().train(False)


class DiffusionOPD(FlowRLModule):
    """``trainer_type: diffusion-opd`` (DiffusionOPD, on-policy distillation for diffusion and flow models). The
    student (the policy) samples its rollouts as usual (``dynamics``: ODE by default, or FlowSDE / DanceSDE / CPS
    at the trained steps); at each trained step ``k`` of a sample, from its rollout latent ``x`` at ``sigma``, every
    teacher ``j`` predicts its velocity (no gradient) and the step's transition mean ``mu_j`` follows from the same
    dynamics; the student's mean ``mu`` is recomputed with gradient, and::

        loss = pathwise_coef * mean over samples of sum_j weight_j * mean_over_dims((mu - mu_j)**2) / (2 * d)

    with ``d = std**2`` (the step's variance: the exact Gaussian KL, ``add_kl_coefficient: true``, SDE only) or
    ``d = 1`` (mean matching, the default, which the ODE needs). :func:`flowrl.losses.opd.opd_loss`. Rewards are not
    needed for the loss: the configured ones are scored and logged (``train/reward_*``) as a monitor, and validation
    runs as for every algorithm.

    Teachers (:class:`Teacher`, at least one): each a frozen copy of the denoiser with its own weights
    (:mod:`flowrl.policy.teacher`: a LoRA fused into the base, an exported model or a flowrl checkpoint), driven by
    the policy's text encoders and guidance; memory grows by one denoiser per teacher.

    Checked against Tencent-Hunyuan/UniRL ``unirl/algorithms/diffusionopd.py`` (the per-step Gaussian KL between
    student and teacher means on the student's replayed trajectory, ``add_kl_coefficient`` false by default and
    only for stochastic steps, a per-teacher guidance scale, the mean over samples and steps) and X-GenGroup/
    Flow-Factory ``src/flow_factory/trainers/diffusion_opd/trainer.py`` with its arguments in
    ``src/flow_factory/hparams/training_args/diffusion_opd.py`` (``trainer_type: diffusion-opd``; ODE rollouts; the
    loss ``pathwise_coef * 0.5 * mean((mu_S - mu_T)**2)`` per step; teachers as LoRA files; a per-teacher
    ``guidance_scale``). Where flowrl differs, and why:

    * the references route each prompt source to one teacher (``applicable_datasets`` / a domain key): each batch
      is distilled from one teacher. flowrl sums the weighted KLs of every teacher on every sample (one prompt
      source; the minimiser is the weights' average of the teachers' means); routing by source is left out;
    * the trained steps are the ``step_selection`` of every algorithm (``train_steps`` / ``num_train_steps``) instead
      of Flow-Factory's ``timestep_range`` fraction band, and one loss is back-propagated per trained step as there;
    * teachers are frozen copies (merged weights) rather than adapters swapped into the student: a full fine-tune,
      a LoRA of another rank or an exported model can teach, and no swap can leave teacher weights in the student;
      the cost is one denoiser of memory per teacher;
    * the student samples with its ``dynamics`` through the shared sampler (Flow-Factory advances the ODE with the
      student's mean inside the update loop): the same trajectories, and the rollout is reused for every trained
      step and inner epoch.
    """

    trainer_type = "diffusion-opd"
    needs_log_prob = False
    recomputes_rollout_velocities = True

    def __init__(self, policy: PolicyConfig, teachers: list[Teacher] | None = None, add_kl_coefficient: bool = False,
                 pathwise_coef: float = 1.0, **kwargs):
        """Other options: see :class:`~flowrl.algorithms.base.FlowRLModule`.

        Args:
            policy: the pretrained pipeline and which of its parameters train (the student).
            teachers: the frozen teachers, each ``{path, weight, name, guidance_scale}`` (:class:`Teacher`).
            add_kl_coefficient: divide each squared mean gap by the step's variance (the exact KL of two SDE
                transitions); false: mean matching (needed under ODE dynamics).
            pathwise_coef: scale of the loss.
        """
        self.teacher_specs = self._check_teachers(teachers)
        if not isinstance(add_kl_coefficient, bool):
            raise ConfigError(f"add_kl_coefficient must be true or false, got {add_kl_coefficient!r}")
        check_number("pathwise_coef", pathwise_coef, 0, low_open=True, hint=" (the loss's scale; 1.0 is the default)")
        super().__init__(policy, **kwargs)
        if add_kl_coefficient and not self.dynamics.is_stochastic:
            raise ConfigError(f"add_kl_coefficient divides by the step's variance, which dynamics {self.dynamics.name!r}"
                              " does not have (std 0); set add_kl_coefficient: false (mean matching) or use an SDE")
        self.check_guidance(*(t.guidance_scale for t in self.teacher_specs))
        self.add_kl_coefficient, self.pathwise_coef = add_kl_coefficient, float(pathwise_coef)
        self.teachers = _Frozen([frozen_denoiser(self.policy, resolve_model_path(t.path)) for t in self.teacher_specs])

    def default_dynamics(self) -> Dynamics:
        """ODE rollouts (Flow-Factory's DiffusionOPD samples with the ODE only)."""
        return ODE()

    @staticmethod
    def _check_teachers(teachers) -> list[Teacher]:
        if not teachers:
            raise ConfigError("diffusion-opd needs at least one teacher: model.teachers: [{path: <LoRA, exported "
                              "model or .ckpt>, weight: 1.0}]")
        specs = [Teacher(**t) if isinstance(t, dict) else t for t in teachers]
        names = []
        for i, t in enumerate(specs):
            if not isinstance(t.weight, (int, float)) or isinstance(t.weight, bool) or not math.isfinite(t.weight) \
                    or t.weight <= 0:
                raise ConfigError(f"teachers[{i}].weight={t.weight!r}: it must be a finite number > 0")
            check_number(f"teachers[{i}].guidance_scale", t.guidance_scale, 1.0, allow_none=True,
                         hint=" (1 = no classifier-free guidance; null = the rollout's)")
            teacher_kind(resolve_model_path(t.path))  # a missing or unknown file fails here, before any loading
            t.name = t.name or f"teacher{i}"
            names.append(t.name)
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names {names} repeat; give each teacher its own name")
        return specs

    def on_fit_start(self):
        if self.kl_reference is not None:
            raise ConfigError("diffusion-opd's anchor is its teachers: remove callbacks.ReferenceModel (or set its "
                              "kl_beta: 0)")
        super().on_fit_start()

    def teacher_mean(self, j: int, x: torch.Tensor, cond, s: float, s_next: float, prev: torch.Tensor) -> torch.Tensor:
        """Teacher ``j``'s transition mean from ``x`` at ``s`` (no gradient)."""
        spec = self.teacher_specs[j]
        scale = self.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
        with torch.no_grad():
            v = self.policy.velocity(x, s, cond, scale, denoiser=self.teachers[j])
            return self.dynamics.step(x, v, s, s_next, prev_sample=prev).mean

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, k: int):
        step = rollout.train_steps[k]
        s, s_next = rollout.sigmas[step].item(), rollout.sigmas[step + 1].item()
        cond = rollout.cond.select(idx)
        x, prev = rollout.latents[idx, k], rollout.next_latents[idx, k]
        teacher_means = {t.name: self.teacher_mean(j, x, cond, s, s_next, prev)
                         for j, t in enumerate(self.teacher_specs)}
        v_u = None if rollout.v_uncond is None else rollout.v_uncond[idx, k]
        v = self.policy.velocity(x, s, cond, self.guidance_scale, uncond_velocity=v_u)
        out = self.dynamics.step(x, v, s, s_next, prev_sample=prev)
        weights = {t.name: float(t.weight) for t in self.teacher_specs}
        return opd_loss(out.mean, teacher_means, weights, out.std if self.add_kl_coefficient else None,
                        self.pathwise_coef)
