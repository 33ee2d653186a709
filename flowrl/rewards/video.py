"""Image rewards on videos: score every k-th frame and average."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flowrl.errors import ConfigError
from flowrl.rewards.base import RewardSpec
from flowrl.rewards.registry import register_reward


@register_reward("frames")
class FrameReward:
    """A video's score: the mean of an image reward over frames ``0, every, 2 * every, ...``.

    ``reward`` is a reward entry (``{name: pickscore}``, ``{class_path: ..., init_args: ...}``) or a callable.
    Images ``(B, C, H, W)`` pass straight to the image reward, so one config serves both.

        rewards:
          - name: frames
            args: {reward: {name: jpeg_compressibility}, every: 4}
    """

    def __init__(self, reward: Mapping[str, Any] | Callable, every: int = 1):
        if int(every) < 1:
            raise ConfigError(f"frames reward: every must be >= 1 (1 scores every frame); got {every}")
        self.every = int(every)
        self.reward = reward if callable(reward) else RewardSpec.from_mapping(reward).build()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim == 4:
            return torch.as_tensor(self.reward(images, prompts)).float()
        if images.ndim != 5:
            raise ValueError(f"frames reward: expected videos (B, T, C, H, W), got {tuple(images.shape)}")
        frames = images[:, :: self.every]
        b, t = frames.shape[:2]
        flat_prompts = [p for p in prompts for _ in range(t)]
        scores = torch.as_tensor(self.reward(frames.flatten(0, 1), flat_prompts)).float()
        return scores.view(b, t).mean(1)
