"""How different the samples of one prompt are: the figures that show a collapse the reward does not.

A policy that hacks its reward often does so by drawing every prompt's samples alike (the toy's main job once drew
"a photo of a square" as the same large yellow square every time while its accuracy rose). Two figures, both over the
samples of one prompt (images in [0, 1], ``(N, C, H, W)`` or video ``(N, F, C, H, W)``), computed in float32:

- :func:`pairwise_distance`: the mean over pairs of samples of the root-mean-square pixel difference (0 when all
  samples are equal; about 0.4 for independent uniform noise).
- :func:`colour_entropy`: the Shannon entropy (bits) of the histogram of colours over all pixels of the samples,
  each channel quantised to ``levels`` values (0 for one flat colour; at most ``3 log2(levels)``).

:func:`diversity_by_prompt` groups a batch by prompt text and gives both figures for every prompt with two or more
samples. torchmetrics has no sample-diversity metric of this kind (its LPIPS/FID need networks and weights), hence
these few lines.
"""

from __future__ import annotations

import torch

__all__ = ["pairwise_distance", "colour_entropy", "diversity_by_prompt"]


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().reshape(len(images), -1)


def pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    """Mean RMS pixel difference over the ``N (N - 1) / 2`` pairs of ``images`` (N >= 2)."""
    if len(images) < 2:
        raise ValueError(f"pairwise_distance needs at least 2 samples, got {len(images)}")
    x = _flat(images)
    distances = torch.cdist(x[None], x[None])[0] / x.shape[1] ** 0.5
    upper = torch.triu_indices(len(x), len(x), offset=1)
    return distances[upper[0], upper[1]].mean()


def colour_entropy(images: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """Entropy (bits) of the quantised colour histogram of all pixels of ``images`` (channels at dim -3)."""
    x = images.detach().float().clamp(0, 1)
    channels = x.shape[-3]
    q = (x * levels).long().clamp(max=levels - 1).movedim(-3, -1).reshape(-1, channels)
    codes = (q * torch.tensor([levels ** i for i in range(channels)], device=q.device)).sum(-1)
    counts = torch.bincount(codes, minlength=levels ** channels).float()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log2()).sum()


def diversity_by_prompt(images: torch.Tensor, prompts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prompt: (pairwise_distance, colour_entropy)}`` for every prompt with at least two samples in the batch."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(str(prompt), []).append(i)
    return {prompt: (pairwise_distance(images[idx]), colour_entropy(images[idx]))
            for prompt, idx in groups.items() if len(idx) >= 2}
