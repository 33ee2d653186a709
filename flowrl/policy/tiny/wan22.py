"""Tiny Wan2.2 A14B text-to-video: a stock ``WanPipeline`` with two experts, the high-noise ``transformer`` and the
low-noise ``transformer_2``, switched at ``boundary_ratio * num_train_timesteps`` as ``WanPipeline.__call__`` does,
built from :mod:`flowrl.policy.tiny.wan`'s pieces (the same tiny VAE, UMT5, tokenizer and Euler scheduler with
shift 3.0). The two transformers share one architecture and differ in their random weights, so a sample sent to the
wrong expert shows in the tests.

``boundary_ratio`` is 0.7 rather than Wan2.2 T2V A14B's 0.875: with the tiny scheduler's 4 steps (sigmas 1, 0.857,
0.6, 0.003 at shift 3), 0.7 puts the switch inside the trained steps (steps 0 and 1 high-noise, 2 and 3 low-noise),
so one rollout and one GRPO update use both experts. (The hub model's 0.875 with its shift and 40 steps gives the
high-noise expert about the first 40% of the steps.)
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline, WanTransformer3DModel

from flowrl.policy.tiny import wan

#: where the tiny pipeline switches experts (timestep 700 of 1000)
BOUNDARY_RATIO = 0.7


def build(seed: int = 0, boundary_ratio: float = BOUNDARY_RATIO, **kwargs) -> WanPipeline:
    """A randomly initialised two-expert ``WanPipeline`` (Wan2.2 A14B layout). ``kwargs`` go to
    :func:`flowrl.policy.tiny.wan.build` (the size of the transformers, VAE and text encoder); the low-noise
    expert ``transformer_2`` has the high-noise one's config and weights drawn from seed ``seed + 1``."""
    single = wan.build(seed=seed, **kwargs)
    torch.manual_seed(seed + 1)
    transformer_2 = WanTransformer3DModel.from_config(single.transformer.config)
    return WanPipeline(
        tokenizer=single.tokenizer,
        text_encoder=single.text_encoder,
        vae=single.vae,
        scheduler=single.scheduler,
        transformer=single.transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )
