"""What a rollout keeps, as typed fields (no string-keyed extras)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.policy import Conditioning

__all__ = ["ForwardProcess", "Rollout"]


@dataclass
class ForwardProcess:
    """The decoupled algorithms' training data of one iteration (drawn after the rollout, before any update).

    Attributes:
        times: ``(B, K)`` training noise levels, K per sample.
        noise: ``(K, B, ...)`` the fresh Gaussian ``eps`` of each training time.
        v_old: ``(K, B, ...)`` velocities of the policy that sampled the rollout, at ``x_t``, no gradient.
        v_ref: the KL reference's velocities (an enabled ``callbacks.ReferenceModel``), else None.
        v_ema: the EMA policy's velocities (AWM's ``ema_kl_beta``), else None.
    """

    times: torch.Tensor
    noise: torch.Tensor
    v_old: torch.Tensor | None = None
    v_ref: torch.Tensor | None = None
    v_ema: torch.Tensor | None = None

    @property
    def num_units(self) -> int:
        return int(self.times.shape[1])


@dataclass
class Rollout:
    """What sampling stored for one batch. Step tensors are indexed ``[:, k]`` for trained step k.

    With ``latent_storage_dtype`` or ``offload_rollout`` set (:mod:`flowrl.rollout.storage`) the stored fields
    (every one below but ``prompts``, ``cond``, ``sigmas``, ``images`` and ``forward``) are
    :class:`~flowrl.rollout.storage.StoredTensor` objects: indexing one gives float32 rows on the compute device,
    as indexing the tensor would.

    Attributes:
        prompts: the batch's prompts.
        cond: their conditioning (the policy's encoding).
        sigmas: ``(N + 1,)`` float32 noise levels, descending to 0.
        train_steps: indices i into ``sigmas`` of the trained (stochastic) steps: step i goes sigmas[i] -> sigmas[i + 1].
        latents: ``(B, K, ...)`` the input x of each trained step (``store="trajectory"``), else None.
        next_latents: ``(B, K, ...)`` the sample drawn at each trained step.
        log_probs: ``(B, K)`` float32 log-probabilities of those samples (None for an ODE trajectory).
        means: ``(B, K, ...)`` the trained steps' means (GRPO-Guard, x-based KL), else None.
        final: ``(B, ...)`` clean latents.
        images: ``(B, C, H, W)`` decoded images in [0, 1].
        v_uncond: ``(B, K, ...)`` the unconditional CFG branch at the trained steps, kept for training to reuse
            where that is exact (:meth:`RolloutSampler.sample`'s ``store_uncond``), else None.
        forward: the decoupled algorithms' per-iteration training data, set after sampling, else None.
    """

    prompts: list[str]
    cond: Conditioning
    sigmas: torch.Tensor
    train_steps: list[int]
    latents: torch.Tensor | None
    next_latents: torch.Tensor | None
    log_probs: torch.Tensor | None
    means: torch.Tensor | None
    final: torch.Tensor
    images: torch.Tensor
    v_uncond: torch.Tensor | None = None
    forward: ForwardProcess | None = None
