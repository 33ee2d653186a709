"""What every sampling rule shares: the step's output, sigma broadcasting, the Gaussian log-prob (a mean over the
non-batch dimensions) and the :class:`SDESchedulerMixin` interface (``Dynamics``) a rule implements.

Conventions (every dynamics): noise level ``s = sigma`` in [0, 1], sampling from 1 to 0, ``x_s = (1 - s) x0 + s
eps``, velocity ``v = eps - x0``, ``dt = s' - s < 0``; float32 math whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.errors import ConfigError

__all__ = ["Dynamics", "GeneratorLike", "SDESchedulerMixin", "SigmaLike", "StepOutput", "gaussian_log_prob"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

SigmaLike = float | Tensor
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one sampling step.

    Attributes:
        prev_sample: the next (less noisy) sample, float32, same shape as the input sample.
        mean: mean of the step's Gaussian, float32, same shape as the sample.
        std: standard deviation of the step's Gaussian, float32, shape ``(B, 1, ..., 1)``.
        log_prob: ``(B,)`` float32 log-probability of ``prev_sample`` (mean over non-batch dims),
            or ``None`` for the ODE.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def _batch_sigma(sigma: SigmaLike, sample: Tensor) -> Tensor:
    """Return ``sigma`` as a float32 tensor of shape ``(B, 1, ..., 1)`` on ``sample``'s device.

    ``sigma`` may be a python float, a 0-dim tensor, a 1-element tensor or a per-sample ``(B,)``
    tensor (or already ``(B, 1, ..., 1)``).
    """
    batch = sample.shape[0]
    view = (batch,) + (1,) * (sample.ndim - 1)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    if s.numel() == 1:
        return s.reshape(1).expand(batch).reshape(view)
    if s.numel() != batch:
        raise ConfigError(
            f"sigma must be a scalar or have one value per sample ({batch}); got shape {tuple(s.shape)}"
        )
    return s.reshape(view)


def _draw_noise(sample: Tensor, generator: GeneratorLike) -> Tensor:
    """Draw standard normal float32 noise shaped like ``sample``.

    ``generator`` may be ``None``, one ``torch.Generator`` or a list with one generator per sample
    (each sample's noise then depends on its own generator only, so it is reproducible whatever
    the batch composition). Noise is drawn on the generator's device and moved to the sample's.
    """
    shape = tuple(sample.shape)
    if generator is None:
        return torch.randn(shape, dtype=torch.float32, device=sample.device)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(shape, dtype=torch.float32, generator=generator, device=generator.device)
        return noise.to(sample.device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ConfigError(
            f"got {len(generators)} generators for a batch of {shape[0]} samples; pass one per sample"
        )
    noise = [
        torch.randn(shape[1:], dtype=torch.float32, generator=g, device=g.device).to(sample.device)
        for g in generators
    ]
    return torch.stack(noise, dim=0)


def _mean_over_dims(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean-over-dims Gaussian log-density, float32, shape ``(B,)``.

    ``log_prob = mean_over_dims(-(x - mean)**2 / (2 std**2) - log(std) - log(sqrt(2 pi)))``.

    Samples whose ``std`` is 0 get log_prob 0 (deterministic step; see the module docstring).
    ``std`` must broadcast against ``x`` and be constant over the non-batch dims.
    """
    std = std.to(torch.float32)
    zero = std <= 0
    safe_std = torch.where(zero, torch.ones_like(std), std)
    diff = x.to(torch.float32) - mean.to(torch.float32)
    lp = -(diff**2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    lp = torch.where(zero, torch.zeros_like(lp), lp)
    return _mean_over_dims(lp)


class SDESchedulerMixin:
    """Interface of a per-step sampling rule.

    Subclasses implement :meth:`_mean_std` (the step's Gaussian) and :meth:`std_dev_t` and may
    override :meth:`_log_prob`. :meth:`step` handles dtype, sigma broadcasting, noise drawing
    and scoring of a given ``prev_sample``.
    """

    name: str = "base"
    is_stochastic: bool = True
    noise_level: float = 0.0

    # -- to implement ---------------------------------------------------------------------------
    def _mean_std(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mean, std)`` of the step for float32 ``x``, ``v`` and ``(B,1,..)`` sigmas."""
        raise NotImplementedError

    def std_dev_t(self, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
        """The step's diffusion coefficient (float32), as used by x-based KL and GRPO-Guard."""
        raise NotImplementedError

    def _log_prob(self, prev: Tensor, mean: Tensor, std: Tensor) -> Tensor | None:
        """Log-probability of ``prev`` under the step; Gaussian density by default."""
        return gaussian_log_prob(prev, mean, std)

    # -- shared ---------------------------------------------------------------------------------
    def step(
        self,
        sample: Tensor,
        velocity: Tensor,
        sigma: SigmaLike,
        sigma_next: SigmaLike,
        noise: Tensor | None = None,
        generator: GeneratorLike = None,
        prev_sample: Tensor | None = None,
    ) -> StepOutput:
        """One step from noise level ``sigma`` to ``sigma_next``.

        Args:
            sample: current sample ``x`` at ``sigma``, shape ``(B, ...)``, any float dtype.
            velocity: model velocity ``v`` at ``(x, sigma)``, same shape.
            sigma, sigma_next: python floats, 0-dim tensors or per-sample ``(B,)`` tensors.
            noise: standard normal noise to use instead of drawing it.
            generator: ``torch.Generator`` or a list of per-sample generators for the draw.
            prev_sample: if given, nothing is drawn: this sample is scored (its log-prob under
                the step's Gaussian) and returned as ``prev_sample`` (as float32).

        Returns:
            :class:`StepOutput` with float32 tensors, ``prev = mean + std * noise``.

        If the rollout stores ``prev_sample`` in a lower precision (bf16 latents), score the
        stored (cast) sample with ``prev_sample=`` so that the rollout's log-prob is the one the
        training pass recomputes, and the first on-policy ratio is exactly 1.
        """
        if sample.shape != velocity.shape:
            raise ConfigError(
                f"sample {tuple(sample.shape)} and velocity {tuple(velocity.shape)} differ in shape"
            )
        x = sample.to(torch.float32)
        v = velocity.to(torch.float32)
        s = _batch_sigma(sigma, x)
        s_next = _batch_sigma(sigma_next, x)
        mean, std = self._mean_std(x, v, s, s_next)
        if prev_sample is not None:
            prev = prev_sample.to(device=x.device, dtype=torch.float32)
        elif not self.is_stochastic:
            prev = mean
        else:
            eps = (
                _draw_noise(x, generator) if noise is None else noise.to(device=x.device, dtype=torch.float32)
            )
            # where std == 0 this is exactly the mean
            prev = mean + std * eps
        return StepOutput(prev_sample=prev, mean=mean, std=std, log_prob=self._log_prob(prev, mean, std))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_level={self.noise_level})"


#: the base class of every sampling rule, by the name a config's type reads best
Dynamics = SDESchedulerMixin
