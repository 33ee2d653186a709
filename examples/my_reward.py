"""A reward of your own, named in a config by its import path (``class_path``), as Lightning names classes.

Any object ``reward(images, prompts) -> scores`` works: ``images`` a float tensor in [0, 1], ``(B, C, H, W)``
(videos ``(B, T, C, H, W)``), ``prompts`` a list of B strings, ``scores`` B numbers. Constructor arguments come from
``init_args``. ``examples/my_reward.yaml`` trains on it next to the toy verifier:

    PYTHONPATH=examples flowrl fit --config lightning_configs/toy/nft.yaml --config examples/my_reward.yaml
"""

import torch


class Brightness:
    """Mean brightness of the image, pushed towards ``target`` (1 at the target, lower either side)."""

    def __init__(self, target: float = 0.5):
        if not 0 <= target <= 1:
            raise ValueError(f"target must be in [0, 1], got {target}")  # a config error, before any work starts
        self.target = float(target)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return 1 - (images.float().mean(dim=tuple(range(1, images.ndim))) - self.target).abs()
