"""Tiny-module factories shared by the algorithm tests (a tiny random SD3 from ``tiny_sd3_path``)."""

import torch

from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec


def make_module(cls, path, *, finetune_type="lora", lora_rank=4, **overrides):
    """An algorithm ``cls`` on the tiny pipeline at ``path``: 16 px, 4 steps, groups of 2, micro-batches of 2."""
    args = dict(
        policy=PolicyConfig(path, finetune_type=finetune_type, lora_rank=lora_rank),
        rewards=[RewardSpec("jpeg_incompressibility")],
        group_size=2,
        resolution=16,
        num_inference_steps=4,
        guidance_scale=3.0,
        train_batch_size=2,
    )
    args.update(overrides)
    return cls(**args)


def randomize_lora(module, std=0.05):
    """A non-zero LoRA, so that the live model differs from the base model."""
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.normal_(0, std)
