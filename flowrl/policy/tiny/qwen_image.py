"""Tiny Qwen-Image: a stock ``QwenImagePipeline`` whose components are random and a few kilobytes each, built from
config objects (``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration``)
with a Qwen2 tokenizer trained in memory, so nothing is downloaded.

* Tokenizer: a real ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer regex, ``<|im_start|>`` /
  ``<|im_end|>`` / ``<|endoftext|>`` special tokens) whose BPE is trained on the pipeline's prompt template and a
  small word list until every word of them is one token. Any text still tokenizes (the 256 byte symbols are in the
  vocabulary). The stock pipeline drops the first ``prompt_template_encode_start_idx`` = 34 hidden states of every
  prompt: the template's system part, which is 34 tokens for the real Qwen2.5-VL tokenizer because each of its
  pre-tokenizer pieces is one token there. The same holds here, so the tiny pipeline keeps exactly the tokens the
  real one keeps (the user prompt and the ``<|im_end|>\\n<|im_start|>assistant\\n`` suffix); only the ids differ.
* Text encoder: Qwen2.5-VL with a 1-layer, 32-wide language model and a 1-block vision tower (unused: text only).
* VAE: the Wan-style 3-D causal VAE with one spatial downsampling (``vae_scale_factor`` 2, Qwen-Image's is 8) and
  ``latents_mean`` / ``latents_std`` that are not 0 / 1, so a missing normalisation shows in tests. With the 2x2
  latent packing, sizes must be multiples of 4 px; 16 px gives an 8x8 latent and 16 image tokens.
* Scheduler: Qwen-Image's own configuration (exponential dynamic shift, ``shift_terminal`` 0.02).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from flowrl.policy.tiny.text import DEFAULT_WORDS

#: Qwen/Qwen-Image's scheduler configuration (scheduler/scheduler_config.json)
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    invert_sigmas=False,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)

#: the Qwen2 chat special tokens the prompt template uses; ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def _template_text(template: str) -> str:
    return template.replace("{}", " ")


def build_qwen2_tokenizer(words: Iterable[str] = DEFAULT_WORDS, template: str | None = None,
                          model_max_length: int = 1024) -> Qwen2Tokenizer:
    """A real ``Qwen2Tokenizer`` (byte-level BPE) trained in memory on ``template`` (default: the stock
    ``QwenImagePipeline`` prompt template) and ``words``, every word of which becomes a single token. It saves and
    loads with ``save_pretrained`` / ``from_pretrained``."""
    if template is None:
        template = _stock_template()
    specials = [ENDOFTEXT, IM_START, IM_END]
    backend = Qwen2Tokenizer().backend_tokenizer  # Qwen2's normaliser, pre-tokeniser and decoder, an empty BPE
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = sorted(set(words))
    corpus = [_template_text(template), " " + " ".join(words), "\n".join(words)]
    backend.train_from_iterator(corpus * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        model_max_length=model_max_length,
    )


def _stock_template() -> str:
    """The stock pipeline's prompt template (an instance attribute set in ``__init__``; read without components)."""
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode


def build(
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    latent_channels: int = 4,
    vae_base_dim: int = 8,
    text_hidden_size: int = 32,
    text_layers: int = 1,
) -> QwenImagePipeline:
    """A randomly initialised ``QwenImagePipeline`` (Qwen-Image's architecture) small enough for a CPU test."""
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim {attention_head_dim}")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=latent_channels * 4,  # 2x2 packed latents
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        axes_dims_rope=tuple(axes_dims_rope),
    )
    g = torch.Generator().manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim,
        z_dim=latent_channels,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],  # one downsampling stage: vae_scale_factor 2
        latents_mean=(torch.randn(latent_channels, generator=g) * 0.5).tolist(),
        latents_std=(torch.rand(latent_channels, generator=g) + 0.5).tolist(),
    )
    tokenizer = build_qwen2_tokenizer(words)
    head_dim = text_hidden_size // 2
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=text_hidden_size,
                intermediate_size=2 * text_hidden_size,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
                bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
                eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=text_hidden_size,
                patch_size=14,
                fullatt_block_indexes=[0],
            ),
        )
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
