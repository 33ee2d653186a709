"""Tiny Wan image-to-video: a stock ``WanImageToVideoPipeline`` with random weights a few kilobytes each, from config
objects, in the two layouts that pipeline class runs (nothing is downloaded):

* ``variant="wan21"`` (Wan2.1 I2V): the transformer reads the noisy latents concatenated channel-wise with the
  condition (a 4-channel first-frame mask and the VAE latents of the image followed by black frames), so its
  ``in_channels`` is ``2 * latent_channels + 4``, and cross-attends to the CLIP image encoder's penultimate hidden
  states (``image_dim``, ``added_kv_proj_dim``) besides the text; a tiny ``CLIPVisionModel`` and its
  ``CLIPImageProcessor`` (32 px, as the hub's 224 px one resizes, crops and normalises) come with it.
* ``variant="ti2v"`` (Wan2.2 TI2V-5B): ``expand_timesteps=True``; the first latent frame is the image's latents, its
  tokens get timestep 0; the transformer is a text-to-video one (``in_channels == out_channels``), no image encoder.

The text encoder, tokenizer, VAE (Wan's temporal factor 4, spatial factor 4: sizes must be multiples of 16, as
``WanImageToVideoPipeline.check_inputs`` requires) and the Euler scheduler are :func:`flowrl.policy.tiny.wan.build`'s.
The real TI2V-5B has Wan2.2's own VAE (48 channels, 16x spatial); the pipeline reads only its config's factors and
its latent statistics, so the tiny one keeps the Wan2.1-style VAE.
"""

from __future__ import annotations

import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from flowrl.policy.tiny import wan

VARIANTS = ("wan21", "ti2v")


def build_image_encoder(hidden_size: int = 16, image_size: int = 32, patch_size: int = 8):
    """A random ``CLIPVisionModel`` (two layers: the pipeline reads the penultimate hidden states) and the
    ``CLIPImageProcessor`` that feeds it ``image_size`` px crops."""
    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    ))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return encoder, processor


def build(seed: int = 0, variant: str = "wan21", num_layers: int = 1, num_attention_heads: int = 2,
          attention_head_dim: int = 12, latent_channels: int = 4, image_hidden_size: int = 16,
          **kw) -> WanImageToVideoPipeline:
    """A randomly initialised ``WanImageToVideoPipeline`` of ``variant`` (``wan21`` or ``ti2v``); ``kw`` go to
    :func:`flowrl.policy.tiny.wan.build` (text encoder, VAE, scheduler)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
    parts = wan.build(seed=seed, num_layers=num_layers, num_attention_heads=num_attention_heads,
                      attention_head_dim=attention_head_dim, latent_channels=latent_channels, **kw)
    image_encoder = image_processor = None
    transformer = parts.transformer  # TI2V-5B's transformer is a text-to-video one
    if variant == "wan21":
        torch.manual_seed(seed + 1)
        inner = num_attention_heads * attention_head_dim
        mask_channels = parts.vae.config.scale_factor_temporal
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=2 * latent_channels + mask_channels,
            out_channels=latent_channels,
            text_dim=parts.text_encoder.config.d_model,
            freq_dim=16,
            ffn_dim=2 * inner,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=image_hidden_size,
            added_kv_proj_dim=inner,
            rope_max_seq_len=32,
        )
        image_encoder, image_processor = build_image_encoder(image_hidden_size)
    return WanImageToVideoPipeline(
        tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae, scheduler=parts.scheduler,
        image_processor=image_processor, image_encoder=image_encoder, transformer=transformer,
        expand_timesteps=variant == "ti2v",
    )
