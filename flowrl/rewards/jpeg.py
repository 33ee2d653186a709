"""The classic DDPO rewards: JPEG (in)compressibility of the generated image."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from flowrl.rewards.base import to_pil
from flowrl.rewards.registry import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kilobytes of each image saved as JPEG. Videos ``(B, T, C, H, W)`` use their mean frame size."""
    if images.ndim == 5:
        b, t = images.shape[:2]
        return jpeg_size_kb(images.flatten(0, 1), quality).view(b, t).mean(1)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    sizes = []
    for image in to_pil(images):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    """Negative JPEG file size in kB: rewards images that compress well (simple, flat images)."""

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility:
    """JPEG file size in kB: rewards detailed, high-frequency images."""

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)
