"""Tiny Z-Image: a stock ``ZImagePipeline`` whose components are random and a few kilobytes each, built from config
objects (``ZImageTransformer2DModel``, ``AutoencoderKL``, ``Qwen3Model``) with a Qwen2 tokenizer trained in memory,
so nothing is downloaded.

* Tokenizer: flowrl's in-memory Qwen2 byte-level BPE (the tiny Qwen-Image one) trained on the Qwen3 chat prompt,
  with a Qwen3 chat template for one user turn: the stock encoder applies it (``enable_thinking=True``), so the
  prompt the text encoder reads is the real model's, only the ids differ.
* Text encoder: a 2-layer, 32-wide ``Qwen3Model``; the stock encoder reads its second-to-last hidden states, so it
  needs at least 2 layers for the last one to be skipped as in Qwen3-4B.
* Transformer: Z-Image's single-stream DiT with one noise-refiner, one context-refiner and one main block (the
  real model: 2, 2 and 30), 32 wide; RoPE over (text position, height, width) with ``axes_dims`` summing to the
  head dim. Most of its ~350k parameters are Z-Image's fixed 1024-wide timestep MLP.
* VAE: FLUX's ``AutoencoderKL`` kind with its scaling and shift factors, halving the resolution once
  (``vae_scale_factor`` 2, the real one's is 8): with the transformer's 2x2 patches, sizes are multiples of 4 px;
  16 px gives an 8x8 latent and 16 image tokens.
* Scheduler: Tongyi-MAI/Z-Image-Turbo's (a fixed shift of 3, no dynamic shifting).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from flowrl.policy.tiny.flux import FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR
from flowrl.policy.tiny.qwen_image import build_qwen2_tokenizer
from flowrl.policy.tiny.text import DEFAULT_WORDS, small_qwen3_config

#: Tongyi-MAI/Z-Image-Turbo's scheduler configuration (scheduler/scheduler_config.json)
Z_IMAGE_TURBO_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

#: Qwen3's chat template for one user turn and the generation prompt (the stock encoder asks for thinking, so no
#: empty think block is added), as the real tokenizer renders such a conversation
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

#: the text the chat template makes of one prompt (``{}``), which the tokenizer's BPE is trained on
CHAT_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def build(
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    dim: int = 32,
    num_layers: int = 1,
    num_refiner_layers: int = 1,
    num_heads: int = 2,
    axes_dims: tuple[int, int, int] = (8, 4, 4),
    axes_lens: tuple[int, int, int] = (1024, 32, 32),
    latent_channels: int = 4,
    vae_channels: int = 8,
    text_hidden_size: int = 32,
    text_layers: int = 2,
) -> ZImagePipeline:
    """A randomly initialised ``ZImagePipeline`` (Z-Image's architecture) small enough for a CPU test.

    ``axes_lens``: the RoPE table lengths of (text position, height, width); the image's first position comes
    after the (padded) text, so the first must exceed the text length rounded up to 32, plus 1 (512 tokens: 545)."""
    if sum(axes_dims) != dim // num_heads:
        raise ValueError(f"axes_dims {axes_dims} must sum to the head dim {dim // num_heads} (dim / num_heads)")
    if text_layers < 2:
        raise ValueError("text_layers must be at least 2: the stock encoder reads the second-to-last hidden states")
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=latent_channels,
        dim=dim,
        n_layers=num_layers,
        n_refiner_layers=num_refiner_layers,
        n_heads=num_heads,
        n_kv_heads=num_heads,
        cap_feat_dim=text_hidden_size,
        axes_dims=list(axes_dims),
        axes_lens=list(axes_lens),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(vae_channels,) * 2,  # one downsampling stage: vae_scale_factor 2
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=vae_channels,
        sample_size=32,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,  # Z-Image's VAE is FLUX's
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
    )
    tokenizer = build_qwen2_tokenizer(words, template=CHAT_PROMPT)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = Qwen3Model(small_qwen3_config(tokenizer, text_hidden_size, text_layers))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_TURBO_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
