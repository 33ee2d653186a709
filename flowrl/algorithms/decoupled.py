"""What the decoupled algorithms (DiffusionNFT, AWM) share: training on the forward process.

A decoupled rollout keeps only the final clean latents ``x0``; any sampler (``dynamics_type``
ODE included) may produce them. Each iteration then draws, per sample, ``num_train_timesteps``
training noise levels ``t`` (``time_sampling_strategy``, ``time_shift``, ``timestep_fraction``,
see :func:`flowrl.dynamics.timesampling.sample_train_times`) and one fresh Gaussian ``eps`` per
training time, and trains on ``x_t = (1 - t) x0 + t eps``. Each training time is one training unit.

Everything on the frozen side of the loss is computed once per iteration, before any update
(:meth:`DecoupledModule.training_units`), without gradient, in exactly the micro-batches the
first inner epoch trains on:

* ``v_old``: the velocity of the policy that sampled the rollout. Inside the trainer callbacks'
  sampling contexts, so with ``callbacks.OffPolicySampling`` it is the EMA policy; on-policy it
  is the live weights as they were when the rollout was drawn (before this iteration's updates).
* ``v_ref``: the KL reference's velocity, when the trainer has an enabled
  ``callbacks.ReferenceModel`` (which holds ``kl_beta``; only ``kl_type: v-based`` applies here).
* ``v_ema``: the EMA policy's velocity (AWM's ``ema_kl_beta``).

The training velocity uses ``train_guidance_scale`` (default 1: no classifier-free guidance, as in
DiffusionNFT, which is CFG-free); ``guidance_scale`` remains the sampling guidance of rollouts.
"""

from __future__ import annotations

import contextlib
import math

import torch

from callbacks import EMA, OffPolicySampling, enter_sampling_contexts
from flowrl.algorithms.base import FlowRLModule
from flowrl.dynamics import ODE, Dynamics
from flowrl.dynamics.timesampling import TIME_SAMPLING_STRATEGIES, sample_train_times
from flowrl.errors import ConfigError
from flowrl.policy import Conditioning, PolicyConfig
from flowrl.rollout import ForwardProcess, Rollout
from flowrl.validation import check_number

__all__ = ["DecoupledModule"]

_TIMES_SALT = 271828  # separates the training-time / noise draws from the rollout's


class DecoupledModule(FlowRLModule):
    """Base of the decoupled algorithms; use :class:`~flowrl.algorithms.NFT` or :class:`~flowrl.algorithms.AWM`.

    Takes :class:`FlowRLModule`'s options as well.

    Args:
        num_train_timesteps: training times per sample and iteration; None = every sampler step in
            range (discrete strategies only).
        time_sampling_strategy: uniform, logit_normal, discrete, discrete_with_init, discrete_wo_init.
        time_shift: SD3 shift (towards high noise) of the continuous strategies.
        timestep_fraction: f in (0, 1]: train at noise levels sigma >= 1 - f only (the same meaning for discrete and
            continuous strategies; on a 10-step schedule shifted by 3, f = 0.3 keeps steps 0-5).
        train_guidance_scale: classifier-free guidance of the *trained* velocity (1 = none).
    """

    needs_log_prob = False
    stores_trajectory = False

    def __init__(
        self,
        policy: PolicyConfig,
        num_train_timesteps: int | None = None,
        time_sampling_strategy: str = "discrete_with_init",
        time_shift: float = 3.0,
        timestep_fraction: float = 1.0,
        train_guidance_scale: float = 1.0,
        **kwargs,
    ):
        if time_sampling_strategy not in TIME_SAMPLING_STRATEGIES:
            raise ConfigError(
                f"unknown time_sampling_strategy {time_sampling_strategy!r}; choose one of "
                f"{', '.join(TIME_SAMPLING_STRATEGIES)}"
            )
        dynamics = kwargs.get("dynamics")
        if dynamics is None or not dynamics.is_stochastic:
            _refuse_sde_options_under_ode(kwargs)
        check_number("train_guidance_scale", train_guidance_scale, 1.0, hint=" (1 = no guidance)")
        check_number("time_shift", time_shift, 0, low_open=True, hint=" (1 = no shift)")
        # Bad time-sampling settings fail here, before the weights load: a dry draw on a schedule whose steps
        # all lie in range (how many of the real steps do is checked on the real schedule once it is known).
        steps = kwargs.get("num_inference_steps", 10)
        check_number("num_inference_steps", steps, 2, hint=" (the last step is never trained)")
        sample_train_times(time_sampling_strategy, 1, num_train_timesteps,
                           torch.cat([torch.ones(int(steps)), torch.zeros(1)]), time_shift, timestep_fraction)
        super().__init__(policy, **kwargs)
        sample_train_times(time_sampling_strategy, 1, num_train_timesteps,
                           self.policy.sigmas(self.num_inference_steps, self.height, self.width), time_shift,
                           timestep_fraction)
        self.num_train_timesteps = num_train_timesteps
        self.time_sampling_strategy = time_sampling_strategy
        self.time_shift = float(time_shift)
        self.timestep_fraction = float(timestep_fraction)
        self.train_guidance_scale = float(train_guidance_scale)
        self.check_guidance(self.train_guidance_scale)

    def default_dynamics(self) -> Dynamics:
        """Decoupled training accepts any sampler; ODE by default."""
        return ODE()

    # ------------------------------------------------------------------ callbacks
    def _ema_callback(self) -> EMA | None:
        emas = self.callbacks_of(EMA)
        return emas[0] if emas else None

    def _samples_with_ema(self) -> bool:
        """True when rollouts come from the EMA weights (an active OffPolicySampling and an EMA)."""
        off = self.callbacks_of(lambda cb: isinstance(cb, OffPolicySampling) and cb.off_policy)
        return bool(off) and self._ema_callback() is not None

    def on_fit_start(self):
        ref = self.kl_reference
        if ref is not None and ref.kl_type != "v-based":
            raise ConfigError(
                f"ReferenceModel(kl_type={ref.kl_type!r}) compares the means of SDE sampling steps, which the "
                f"decoupled trainer {self.trainer_type!r} does not train on; set kl_type: v-based"
            )
        super().on_fit_start()

    # ------------------------------------------------------------------ forward-process training data
    @staticmethod
    def _column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.reshape((t.shape[0],) + (1,) * (like.ndim - 1))

    def noised(self, rollout: Rollout, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, x0, eps, t)`` of samples ``idx`` at training unit ``k`` (after :meth:`training_units`)."""
        x0 = rollout.final[idx]
        eps = rollout.forward.noise[k, idx]
        t = rollout.forward.times[idx, k]
        tc = self._column(t, x0)
        return (1.0 - tc) * x0 + tc * eps, x0, eps, t

    def _cond(self, rollout: Rollout, idx: torch.Tensor) -> Conditioning:
        return rollout.cond.select(idx)

    def train_velocity(self, rollout: Rollout, idx: torch.Tensor, k: int) -> torch.Tensor:
        """The velocity at ``x_t`` of unit ``k``, with whatever weights are in the model now."""
        x_t, _, _, t = self.noised(rollout, idx, k)
        return self.policy.velocity(x_t, t, self._cond(rollout, idx), self.train_guidance_scale)

    def _frozen_velocities(self, rollout: Rollout, units: list[int]) -> torch.Tensor:
        """``(K, B, ...)`` velocities without gradient, in eval mode, batched as training epoch 0 is."""
        n = rollout.final.shape[0]
        order = torch.arange(n)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                per_unit = []
                for k in units:
                    per_unit.append(torch.cat([self.train_velocity(rollout, order[sl], k) for sl in self.sampler.chunks(n)]))
                return torch.stack(per_unit)
        finally:
            self.policy.train(was_training)

    def needs_ema_velocity(self) -> bool:
        return False

    def training_units(self, rollout: Rollout) -> list[int]:
        """Draw this iteration's training times and noise, and precompute the frozen velocities.

        Called once per iteration, after the rollout and before any update."""
        n = rollout.final.shape[0]
        times, noise = [], []
        for gen in self._sample_generators(n, self.iteration, _TIMES_SALT):  # per sample: as the rollout noise
            times.append(sample_train_times(self.time_sampling_strategy, 1, self.num_train_timesteps, rollout.sigmas,
                                            self.time_shift, self.timestep_fraction, gen))
            noise.append(torch.randn((times[-1].shape[1], 1, *rollout.final.shape[1:]), generator=gen,
                                     dtype=torch.float32))
        device = rollout.final.device
        rollout.forward = forward = ForwardProcess(torch.cat(times).to(device), torch.cat(noise, dim=1).to(device))
        units = list(range(forward.num_units))
        with enter_sampling_contexts(self._trainer, self):
            forward.v_old = self._frozen_velocities(rollout, units)
        if self.needs_ema_velocity():
            if self._samples_with_ema():
                forward.v_ema = forward.v_old  # the sampling policy is the EMA
            else:
                ema = self._ema_callback()
                with ema.swapped(self) if ema is not None else contextlib.nullcontext():
                    forward.v_ema = self._frozen_velocities(rollout, units)
        ref = self.kl_reference
        if ref is not None:
            with ref.reference(self):
                forward.v_ref = self._frozen_velocities(rollout, units)
        return units

    def _kl_beta(self) -> float:
        ref = self.kl_reference
        return ref.kl_beta if ref is not None else 0.0

    @staticmethod
    def _frozen(velocities: torch.Tensor | None, idx: torch.Tensor, k: int) -> torch.Tensor | None:
        """Unit ``k``'s frozen velocities of samples ``idx`` (``rollout.forward.v_old`` ...), None where not drawn."""
        return None if velocities is None else velocities[k, idx]


def _refuse_sde_options_under_ode(kwargs: dict) -> None:
    if kwargs.get("step_selection") is not None and not kwargs["step_selection"].is_default:
        raise ConfigError(
            "model.step_selection (train_steps, num_train_steps, a window) only shapes the stochastic steps of SDE "
            "sampling, and ODE dynamics sample every step deterministically, so it would do nothing; remove it, or "
            "set dynamics to flowrl.dynamics.FlowSDE, DanceSDE or CPS"
        )
    if kwargs.get("same_initial_noise"):
        raise ConfigError(
            "same_initial_noise: true with ODE dynamics makes every sample of a group the same image (zero "
            "advantages, nothing to learn); set same_initial_noise: false or use stochastic dynamics (e.g. CPS)"
        )


def _disabled(value: float | list[float] | None) -> bool:
    if isinstance(value, (list, tuple)):
        return False  # a [low, high] pair always clips
    return value is None or value <= 0 or math.isnan(value)
