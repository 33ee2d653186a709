"""Per-step sampling dynamics of a flow-matching model: Flow-SDE, Dance-SDE, CPS and the Euler ODE.

Conventions (shared by every dynamics here):

* noise level ``s = sigma`` in [0, 1]; sampling runs from ``s = 1`` to ``s = 0``;
  ``x_s = (1 - s) * x0 + s * eps`` and the model predicts the velocity ``v = eps - x0``;
* ``dt = s' - s`` is negative (``s' = sigma_next``); the Euler (ODE) step is ``x + v * dt``;
* a step returns ``prev_sample``, the Gaussian ``mean`` and ``std`` it was drawn from and the
  log-probability of ``prev_sample``; log-probabilities are the MEAN over all non-batch dims;
* all math runs in float32 whatever the input dtype, and float32 tensors are returned.

Degenerate steps. Where a step's ``std`` is 0 (the ODE, ``noise_level = 0``, or CPS at
``sigma_next = 0``) the step is deterministic: ``prev_sample = mean`` and the Gaussian log-prob is
*defined* as 0 for that sample (a point mass has no finite density). GRPO never trains on such a
step (see :class:`flowrl.dynamics.selection.StepSelector`, which by default leaves the last step
out). Note that Flow-SDE and Dance-SDE still have ``std > 0`` on the last step (``sigma_next = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowrl.dynamics.base import SDESchedulerMixin, SigmaLike, _mean_over_dims
from flowrl.errors import ConfigError

__all__ = ["CPS", "DYNAMICS", "ODE", "DanceSDE", "FlowSDE", "build_dynamics"]


def _check_noise_level(noise_level: float, dynamics: str = "", high: float = math.inf, why: str = "") -> float:
    """``noise_level`` in ``[0, high)`` (``[0, 1]`` for CPS, ``high`` inclusive when ``why`` says so)."""
    noise_level = float(noise_level)
    owner = f"noise_level of {dynamics}" if dynamics else "noise_level"
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ConfigError(f"{owner} must be a finite number >= 0, got {noise_level}")
    if noise_level >= high:
        raise ConfigError(f"{owner} must be below {high:.4g}{why}, got {noise_level}")
    return noise_level


#: below sqrt(2): at the first step from sigma 1 (Flow-SDE) or the last (Dance-SDE) the mean scales x by 1 - a**2 / 2
_SQRT2 = math.sqrt(2.0)


class FlowSDE(SDESchedulerMixin):
    """Flow-GRPO's SDE (reverse-time SDE with the same marginals as the flow ODE).

    With ``a = noise_level``, ``dt = s' - s``::

        std_dev_t = a * sqrt(s / (1 - s_den))        s_den = s, except where s == 1 (below)
        mean      = x * (1 + std_dev_t**2 / (2 s) * dt) + v * (1 + std_dev_t**2 (1 - s) / (2 s)) * dt
        std       = std_dev_t * sqrt(-dt)

    computed as ``std_dev_t**2 / (2 s) = a**2 / (2 (1 - s_den))`` (exact algebra; finite at
    ``s = 0`` and ``s = 1``).

    The ``s == 1`` rule: ``1 - s`` vanishes, so the reference puts ``sigma_max = sigmas[1]`` (the
    next-largest sigma of the schedule) in the denominator. If ``sigma_max`` is given here it is
    used exactly like that. Otherwise ``s_den = sigma_next`` at ``s == 1``, which is the same
    number on the first step of any schedule starting at 1 (there ``sigma_next = sigmas[1]``).
    In both cases ``s_den`` is finally clamped to at most ``1 - 1e-3`` so a degenerate step
    (``sigma = sigma_next = 1``) stays finite.

    ``noise_level = 0`` gives exactly ``x + v * dt``.
    """

    name = "Flow-SDE"
    is_stochastic = True
    _MAX_S_DEN = 1.0 - 1e-3

    def __init__(self, noise_level: float = 0.7, sigma_max: float | None = None) -> None:
        """
        Args:
            noise_level: ``a``, below sqrt(2) (above it the first step's mean flips the sign of x).
            sigma_max: the denominator's sigma where sigma is 1 (the schedule's sigmas[1]); None = sigma_next there.
        """
        self.noise_level = _check_noise_level(noise_level, self.name, _SQRT2,
                                              " (above sqrt(2) the first step's mean flips the sign of x)")
        if sigma_max is not None and not 0.0 < float(sigma_max) < 1.0:
            raise ConfigError(
                f"sigma_max must lie in (0, 1) (it is sigmas[1] of the schedule), got {sigma_max}"
            )
        self.sigma_max = None if sigma_max is None else float(sigma_max)

    def _denominator_sigma(self, s: Tensor, s_next: Tensor) -> Tensor:
        """``s_den``: ``s``, with ``sigma_max`` (or ``sigma_next``) where ``s == 1``, clamped below 1."""
        at_one = s >= 1.0
        replacement = torch.full_like(s, self.sigma_max) if self.sigma_max is not None else s_next
        s_den = torch.where(at_one, replacement, s)
        return s_den.clamp(max=self._MAX_S_DEN)

    def _coefficient_sq_over_2s(self, s: Tensor, s_next: Tensor) -> Tensor:
        """``std_dev_t**2 / (2 s) = a**2 / (2 (1 - s_den))``."""
        return self.noise_level**2 / (2.0 * (1.0 - self._denominator_sigma(s, s_next)))

    def std_dev_t(self, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
        """``a * sqrt(s / (1 - s_den))`` (float32, shape of the broadcast sigmas)."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
        s, s_next = torch.broadcast_tensors(s, s_next)
        return self.noise_level * torch.sqrt(s / (1.0 - self._denominator_sigma(s, s_next)))

    def _mean_std(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        dt = s_next - s
        c = self._coefficient_sq_over_2s(s, s_next)  # std_dev_t**2 / (2 s)
        mean = x * (1.0 + c * dt) + v * ((1.0 + c * (1.0 - s)) * dt)
        std = self.std_dev_t(s, s_next) * torch.sqrt((-dt).clamp(min=0.0))
        return mean, std


class DanceSDE(SDESchedulerMixin):
    """DanceGRPO's SDE: constant diffusion coefficient ``eta = noise_level``.

    ::

        x0    = x - s * v
        score = -(x - (1 - s) * x0) / s**2          (= -(x + (1 - s) v) / s, used here: finite as s -> 0)
        mean  = x + v * dt - 0.5 * eta**2 * score * dt
        std   = eta * sqrt(-dt)

    Gaussian log-prob as Flow-SDE. ``noise_level = 0`` gives exactly ``x + v * dt``.
    """

    name = "Dance-SDE"
    is_stochastic = True
    _MIN_S = 1e-6

    def __init__(self, noise_level: float = 0.3) -> None:
        """
        Args:
            noise_level: ``eta``, below sqrt(2) (above it the last step's mean flips the sign of x).
        """
        self.noise_level = _check_noise_level(noise_level, self.name, _SQRT2,
                                              " (above sqrt(2) the last step's mean flips the sign of x)")

    @property
    def eta(self) -> float:
        return self.noise_level

    def std_dev_t(self, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
        """``eta`` (constant), broadcast to the sigmas' shape."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
        s, _ = torch.broadcast_tensors(s, s_next)
        return torch.full_like(s, self.noise_level)

    def _mean_std(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        dt = s_next - s
        score = -(x + (1.0 - s) * v) / s.clamp(min=self._MIN_S)
        mean = x + v * dt - (0.5 * self.noise_level**2) * score * dt
        std = self.noise_level * torch.sqrt((-dt).clamp(min=0.0))
        return mean, std


class CPS(SDESchedulerMixin):
    """Coefficients-preserving sampling (FlowCPS), DDIM-like.

    With ``a = noise_level``::

        std  = s' * sin(a pi / 2)
        x0   = x - s * v ;  x1 = x + (1 - s) * v
        mean = (1 - s') * x0 + sqrt(s'**2 - std**2) * x1      (sqrt(...) = s' cos(a pi / 2), used here)
        log_prob = -mean_over_dims((prev - mean)**2)           (no normaliser, as the reference)

    If ``x0``/``x1`` are exact, ``prev = (1 - s') x0 + s' * (unit-variance noise)``: the noise
    coefficient is preserved. ``std = 0`` at ``s' = 0`` (and for ``a = 0``, which gives the Euler
    step). The un-normalised log-prob needs much smaller clip ranges (about 1e-5).
    """

    name = "CPS"
    is_stochastic = True

    def __init__(self, noise_level: float = 0.7) -> None:
        """
        Args:
            noise_level: ``a`` in [0, 1] (std = sigma_next * sin(a pi / 2)).
        """
        noise_level = _check_noise_level(noise_level, self.name)
        if noise_level > 1.0:
            raise ConfigError(
                f"CPS noise_level must lie in [0, 1] (std = sigma_next * sin(a pi/2)), got {noise_level}"
            )
        self.noise_level = noise_level

    def std_dev_t(self, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
        """``s' * sin(a pi / 2)``: the step std itself (as the reference returns it)."""
        s_next = torch.as_tensor(sigma_next, dtype=torch.float32)
        s = torch.as_tensor(sigma, dtype=torch.float32, device=s_next.device)
        _, s_next = torch.broadcast_tensors(s, s_next)
        return s_next * math.sin(self.noise_level * math.pi / 2.0)

    def _mean_std(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        angle = self.noise_level * math.pi / 2.0
        std = s_next * math.sin(angle)
        x0 = x - s * v
        x1 = x + (1.0 - s) * v
        mean = (1.0 - s_next) * x0 + (s_next * math.cos(angle)) * x1
        return mean, std

    def _log_prob(self, prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return _mean_over_dims(-((prev - mean) ** 2))


class ODE(SDESchedulerMixin):
    """Deterministic Euler step ``prev = mean = x + v * dt``, ``std = 0``, no log-prob.

    Only decoupled algorithms (NFT, AWM) may sample with it.
    """

    name = "ODE"
    is_stochastic = False

    noise_level = 0.0  # no noise, and no option: a noise level set for the ODE is a configuration error

    def std_dev_t(self, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
        """Always 0."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
        s, _ = torch.broadcast_tensors(s, s_next)
        return torch.zeros_like(s)

    def _mean_std(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
        return x + v * (s_next - s), torch.zeros_like(s)

    def _log_prob(self, prev: Tensor, mean: Tensor, std: Tensor) -> None:
        return None


DYNAMICS: dict[str, type[SDESchedulerMixin]] = {
    "Flow-SDE": FlowSDE,
    "Dance-SDE": DanceSDE,
    "CPS": CPS,
    "ODE": ODE,
}


def build_dynamics(dynamics_type: str, noise_level: float | None = None) -> SDESchedulerMixin:
    """Build a dynamics by its config name (``dynamics_type``); ``noise_level`` None = its default."""
    try:
        cls = DYNAMICS[dynamics_type]
    except KeyError:
        raise ConfigError(
            f"unknown dynamics_type {dynamics_type!r}; choose one of {', '.join(map(repr, DYNAMICS))}"
        ) from None
    if noise_level is None:
        return cls()
    if cls is ODE:
        raise ConfigError("noise_level does nothing for dynamics_type ODE (every step is deterministic); remove it, "
                          "or choose Flow-SDE, Dance-SDE or CPS")
    return cls(noise_level=noise_level)

