"""Tiny Wan2.1 text-to-video: a stock ``WanPipeline`` whose components are random and a few kilobytes each, built
from config objects (``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``) with a T5 tokenizer made
in memory (a word-level Unigram), so nothing is downloaded.

The causal video VAE keeps Wan's temporal factor 4 (videos of ``1 + 4k`` frames; 5 frames -> 2 latent frames) but
downsamples space only 4x (two stages instead of Wan's three), so a 16 px video gives a 4x4 latent and, with the
transformer's 1x2x2 patches, 2x2 tokens per latent frame: sizes must be multiples of 8 px (VAE factor x patch).

Scheduler: the hub's Wan2.1 checkpoints ship a ``UniPCMultistepScheduler`` (``use_flow_sigmas``, ``flow_shift`` 3.0
for 480p), a multistep solver. flowrl's dynamics take one Euler (or SDE) step per sigma, so the tiny pipeline uses
``FlowMatchEulerDiscreteScheduler`` with Wan's 480p shift 3.0 instead: the stock ``WanPipeline.__call__`` then runs
exactly the ODE flowrl runs, which is what the tests compare. (With a hub model flowrl reads the sigmas and the
integer timesteps of its UniPC scheduler, see :class:`flowrl.policy.wan.WanAdapter`.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from flowrl.policy.tiny.text import DEFAULT_WORDS, build_t5_tokenizer

#: Wan2.1's flow shift at 480p (5.0 is its 720p value)
WAN_FLOW_SHIFT = 3.0


def build(
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    latent_channels: int = 4,
    vae_base_dim: int = 8,
    text_hidden_size: int = 32,
    shift: float = WAN_FLOW_SHIFT,
) -> WanPipeline:
    """A randomly initialised ``WanPipeline`` (Wan2.1 T2V architecture) small enough for a CPU test.

    ``attention_head_dim`` is split by the 3-D rotary embedding into frame/height/width parts (``2 * (d // 6)`` for
    height and width), so it should be a multiple of 6. The VAE's ``latents_mean`` / ``latents_std`` are not 0 / 1, so
    a missing normalisation shows in tests.
    """
    torch.manual_seed(seed)
    inner = num_attention_heads * attention_head_dim
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=text_hidden_size,
        freq_dim=16,
        ffn_dim=2 * inner,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=vae_base_dim,
        z_dim=latent_channels,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True, True],  # two temporal halvings: Wan's factor 4
        latents_mean=[0.3 * (-1) ** i + 0.05 * i for i in range(latent_channels)],
        latents_std=[1.5 + 0.25 * i for i in range(latent_channels)],
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    tokenizer = build_t5_tokenizer(words, model_max_length=64)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_hidden_size,
            d_kv=8,
            d_ff=2 * text_hidden_size,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
