"""Tiny SD3 (MMDiT, two CLIP encoders, no T5), the toy world's architecture with random weights."""

from flowrl.toy.pipeline import build_tiny_sd3_pipeline


def build(seed: int = 0, **kwargs):
    kwargs = {"sample_size": 16, "num_layers": 1, "vae_channels": 8, **kwargs}
    return build_tiny_sd3_pipeline(seed=seed, **kwargs)
