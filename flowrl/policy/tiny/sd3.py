"""Tiny SD3 (MMDiT, two CLIP encoders, no T5) with random weights: the tests' SD3 and the toy world's architecture.

Every component is built from a config object, the tokenizers are trained in memory, nothing touches a hub.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from flowrl.policy.tiny.text import BOS, DEFAULT_WORDS, EOS, build_word_tokenizer

__all__ = ["build", "build_tiny_sd3_pipeline"]


def build(seed: int = 0, **kwargs):
    kwargs = {"sample_size": 16, "num_layers": 1, "vae_channels": 8, **kwargs}
    return build_tiny_sd3_pipeline(seed=seed, **kwargs)


def build_tiny_sd3_pipeline(
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    sample_size: int = 32,
    patch_size: int = 2,
    num_layers: int = 2,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    latent_channels: int = 4,
    vae_channels: int = 16,
    vae_downsample: int = 0,
    max_text_length: int = 16,
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """A randomly initialised ``StableDiffusion3Pipeline`` small enough for a laptop CPU.

    Two CLIP text encoders (each ``text_hidden_size`` wide, together they fill the joint attention
    width), no T5, and an ``AutoencoderKL`` that halves the resolution ``vae_downsample`` times
    (``vae_scale_factor`` ``2 ** vae_downsample``; 0: latents as large as the image). Images are
    ``sample_size`` pixels square; the transformer works on ``sample_size / 2 ** vae_downsample``.
    """
    if vae_downsample < 0 or sample_size % (2**vae_downsample * patch_size):
        raise ValueError(
            f"sample_size {sample_size} must be divisible by 2 ** vae_downsample * patch_size "
            f"= {2 ** max(vae_downsample, 0) * patch_size} (vae_downsample >= 0)"
        )
    torch.manual_seed(seed)
    joint_dim = 2 * text_hidden_size
    latent_size = sample_size // 2**vae_downsample
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_dim,
        caption_projection_dim=attention_head_dim * num_attention_heads,
        pooled_projection_dim=joint_dim,
        pos_embed_max_size=max(latent_size // patch_size, 8),
    )
    blocks = vae_downsample + 1  # every block but the last halves the resolution
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(vae_channels * 2**i for i in range(blocks)),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(8, vae_channels),
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    tokenizer = build_word_tokenizer(words, model_max_length=max_text_length)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)

    def text_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_hidden_size,
                intermediate_size=2 * text_hidden_size,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                max_position_embeddings=max_text_length,
                projection_dim=text_hidden_size,
                bos_token_id=bos_id,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
                hidden_act="gelu",
            )
        )

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(),
        tokenizer_2=build_word_tokenizer(words, model_max_length=max_text_length),
        text_encoder_3=None,
        tokenizer_3=None,
    )
