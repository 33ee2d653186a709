"""Training-time (noise level) sampling for the decoupled algorithms (DiffusionNFT, AWM).

:func:`sample_train_times` returns, per sample, ``K = num_train_timesteps`` noise levels
``sigma in (0, 1]`` at which the clean rollout latent is re-noised and the loss is taken.
The ``K`` values of a row are stratified (one per stratum of the allowed range) and ordered
from the noisiest stratum to the cleanest.

``timestep_fraction = f`` keeps training on the high-noise part of the trajectory: noise levels
``sigma >= 1 - f``, one meaning for every strategy (the meaning of the guide users migrate from):

* discrete strategies: the sampler steps whose own (already shifted) ``sigmas[i] >= 1 - f``; on
  SD3's shifted (shift 3) 10-step schedule ``f = 0.3`` keeps steps 0-5 (sigma 1 .. 0.75), not the
  first 30% of the steps;
* continuous strategies: ``u`` is drawn in (0, 1) from the strategy's law, warped by ``time_shift``
  (SD3 direction, towards high noise), then mapped into the range: ``sigma = 1 - f + f * shift(u)``.
  With ``f = 0.3`` and ``time_shift = 3`` the training sigmas span [0.7, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.errors import ConfigError

__all__ = ["TIME_SAMPLING_STRATEGIES", "sample_train_times", "shift_sigma"]

TIME_SAMPLING_STRATEGIES: tuple[str, ...] = (
    "uniform",
    "logit_normal",
    "discrete",
    "discrete_with_init",
    "discrete_wo_init",
)
_CONTINUOUS = ("uniform", "logit_normal")
_MIN_SIGMA = 1e-6
_U_EPS = 1e-6
_SIGMA_TOL = 1e-6


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """SD3 time shift towards HIGH noise: ``shift * s / (1 + (shift - 1) * s)``.

    ``shift > 1`` moves every ``s`` in (0, 1) up; ``shift = 1`` is the identity; 0 and 1 are fixed.
    """
    if shift <= 0:
        raise ConfigError(f"time_shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def _strata_u(batch_size: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``(B, K)`` stratified uniforms in (0, 1): column ``j`` lies in ``[j / K, (j + 1) / K)``."""
    u = torch.rand(batch_size, k, generator=generator, dtype=torch.float64)
    u = (torch.arange(k, dtype=torch.float64) + u) / k
    return u.clamp(_U_EPS, 1.0 - _U_EPS)


def _continuous_times(
    strategy: str,
    batch_size: int,
    k: int,
    time_shift: float,
    fraction: float,
    generator: torch.Generator | None,
) -> Tensor:
    # stratified in the CDF of the base law; column 0 = the noisiest stratum
    u = 1.0 - _strata_u(batch_size, k, generator)
    if strategy == "logit_normal":
        u = torch.sigmoid(torch.special.ndtri(u))  # inverse CDF of sigmoid(N(0, 1))
    sigma = 1.0 - fraction + fraction * shift_sigma(u, time_shift)  # warp first, then map into [1 - f, 1]
    return sigma.clamp(_MIN_SIGMA, 1.0).to(torch.float32)


def _strata_bounds(lo: int, hi: int, k: int) -> list[tuple[int, int]]:
    """Split indices ``lo .. hi - 1`` into ``k`` contiguous, near-equal, non-empty strata."""
    n = hi - lo
    edges = [lo + (j * n) // k for j in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _discrete_indices(lo: int, hi: int, k: int, batch_size: int, generator: torch.Generator | None) -> Tensor:
    """``(B, K)`` step indices, one drawn uniformly inside each stratum of ``lo .. hi - 1``."""
    bounds = _strata_bounds(lo, hi, k)
    start = torch.tensor([a for a, _ in bounds], dtype=torch.long)
    size = torch.tensor([b - a for a, b in bounds], dtype=torch.long)
    u = torch.rand(batch_size, k, generator=generator, dtype=torch.float64)
    offset = torch.minimum((u * size).floor().long(), size - 1)
    return start + offset


def sample_train_times(
    strategy: str,
    batch_size: int,
    num_train_timesteps: int | None,
    sigmas: Tensor | None = None,
    time_shift: float = 1.0,
    timestep_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``(batch_size, K)`` float32 training noise levels in (0, 1].

    Args:
        strategy: one of :data:`TIME_SAMPLING_STRATEGIES`:

            * ``uniform``: ``u`` stratified uniform in (0, 1), ``sigma = 1 - f + f * shift(u)``;
            * ``logit_normal``: ``u = sigmoid(z)``, ``z ~ N(0, 1)`` stratified in its CDF, then shifted and
              mapped into ``[1 - f, 1]`` as ``uniform``;
            * ``discrete``: stratified draw among the sampler's steps ``0 .. M - 1``, the ``M`` steps
              with ``sigmas[i] >= 1 - f``, returning ``sigmas[index]``;
            * ``discrete_with_init``: column 0 is always step 0 (sigma = ``sigmas[0]``), the other
              ``K - 1`` are stratified over steps ``1 .. M - 1``;
            * ``discrete_wo_init``: stratified over steps ``1 .. M - 1`` (never step 0).
        batch_size: rows ``B``.
        num_train_timesteps: ``K``. None = every available step (discrete strategies only).
        sigmas: the sampler's schedule, descending, ``N + 1`` values ending in 0 (discrete only).
        time_shift: SD3 shift for the continuous strategies (ignored by the discrete ones, whose
            ``sigmas`` are already shifted by the sampler).
        timestep_fraction: ``f`` in (0, 1]: train at noise levels ``sigma >= 1 - f`` (module docstring).
        generator: optional ``torch.Generator`` (CPU) for reproducible draws.

    Returns:
        ``(batch_size, K)`` float32 CPU tensor (move it to the model's device).
    """
    if strategy not in TIME_SAMPLING_STRATEGIES:
        raise ConfigError(
            f"unknown time_sampling_strategy {strategy!r}; choose one of "
            f"{', '.join(map(repr, TIME_SAMPLING_STRATEGIES))}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    f = float(timestep_fraction)
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"timestep_fraction must lie in (0, 1], got {timestep_fraction}")
    if num_train_timesteps is not None and num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be >= 1 (or null), got {num_train_timesteps}")

    if strategy in _CONTINUOUS:
        if num_train_timesteps is None:
            raise ConfigError(
                f"time_sampling_strategy {strategy!r} needs num_train_timesteps (a positive integer); "
                "null ('all steps') only applies to the discrete strategies"
            )
        if time_shift <= 0:
            raise ConfigError(f"time_shift must be > 0, got {time_shift}")
        return _continuous_times(
            strategy, batch_size, int(num_train_timesteps), float(time_shift), f, generator
        )

    if sigmas is None:
        raise ConfigError(
            f"time_sampling_strategy {strategy!r} needs the sampler's sigmas (N + 1 values ending in 0)"
        )
    sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
    if sig.ndim != 1 or sig.numel() < 2:
        raise ConfigError(f"sigmas must be a 1-D schedule of N + 1 >= 2 values, got shape {tuple(sig.shape)}")
    if bool((sig[1:] > sig[:-1]).any()):
        raise ConfigError("sigmas must be in descending order (sampling goes from noise to data)")
    num_steps = sig.numel() - 1
    if bool((sig[:num_steps] <= 0).any()):
        raise ConfigError("sigmas of the sampling steps (all but the last value) must be > 0")
    # the steps at sigma >= 1 - f (descending sigmas: the first m); the tolerance absorbs float noise
    m = int((sig[:num_steps] >= 1.0 - f - _SIGMA_TOL).sum())
    lo = 0 if strategy == "discrete" else 1
    available = m - lo
    if available < 1:
        raise ConfigError(
            f"timestep_fraction={f} keeps the {m} of {num_steps} sampler steps at sigma >= {1 - f:.4g}, none left "
            f"for {strategy!r}; raise timestep_fraction (or use 'discrete' / 'discrete_with_init')"
        )
    if strategy == "discrete_with_init":
        available = m  # step 0 plus the m - 1 others
    k = available if num_train_timesteps is None else int(num_train_timesteps)
    if k > available:
        raise ConfigError(
            f"num_train_timesteps={k} exceeds the {available} steps available to {strategy!r} "
            f"(timestep_fraction={f} of {num_steps} sampler steps); lower it to at most {available} "
            "or raise timestep_fraction"
        )
    if strategy == "discrete_with_init":
        init = torch.zeros(batch_size, 1, dtype=torch.long)
        rest = _discrete_indices(1, m, k - 1, batch_size, generator) if k > 1 else init[:, :0]
        index = torch.cat([init, rest], dim=1)
    else:
        index = _discrete_indices(lo, m, k, batch_size, generator)
    return sig[index].to(torch.float32)
