"""Tiny FLUX.1 (dev with ``guidance_embeds=True``, schnell with ``False``): a stock ``FluxPipeline`` whose
components are random and a few kilobytes each, built from config objects with tokenizers made in memory
(CLIP: the toy world's word-level BPE; T5: a word-level Unigram), so nothing is downloaded.

The VAE halves the resolution once (``vae_scale_factor`` 2), so images must be multiples of 4 pixels (VAE factor
x FLUX's 2x2 packing); 16 px gives an 8x8 latent of ``latent_channels`` channels and 16 image tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flowrl.policy.tiny.text import (
    BOS,
    DEFAULT_WORDS,
    EOS,
    build_t5_tokenizer,
    build_word_tokenizer,
    two_stage_vae_kwargs,
)

#: FLUX.1's scheduler configuration (resolution-dependent shift between 256 and 4096 image tokens)
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

#: FLUX.1's VAE normalisation (``z = (latent - shift) * scale``)
FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR = 0.3611, 0.1159


def build(
    seed: int = 0,
    guidance_embeds: bool = True,
    words: Iterable[str] = DEFAULT_WORDS,
    num_layers: int = 1,
    num_single_layers: int = 1,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    latent_channels: int = 4,
    vae_channels: int = 8,
    text_hidden_size: int = 32,
    max_text_length: int = 16,
) -> FluxPipeline:
    """A randomly initialised ``FluxPipeline``: FLUX.1-dev's architecture (guidance embedding) by default,
    FLUX.1-schnell's with ``guidance_embeds=False``. ``max_text_length`` is both tokenizers' ``model_max_length``
    (the T5 length flowrl uses when ``policy.max_sequence_length`` is null)."""
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim {attention_head_dim}")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2x2 packed latents
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        pooled_projection_dim=text_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    )
    vae = AutoencoderKL(**two_stage_vae_kwargs(latent_channels, vae_channels), scaling_factor=FLUX_VAE_SCALING_FACTOR,
                        shift_factor=FLUX_VAE_SHIFT_FACTOR)
    tokenizer = build_word_tokenizer(words, model_max_length=max_text_length)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=2 * text_hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_text_length,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            hidden_act="gelu",
        )
    )
    tokenizer_2 = build_t5_tokenizer(words, model_max_length=max_text_length)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=text_hidden_size,
            d_kv=text_hidden_size // 2,
            d_ff=2 * text_hidden_size,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
