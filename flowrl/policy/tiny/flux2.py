"""Tiny FLUX.2: a stock ``Flux2KleinPipeline`` (klein, the default: a Qwen3 text encoder) or ``Flux2Pipeline`` (dev:
a Mistral3 text encoder, guidance-distilled) whose components are random and a few kilobytes each, built from config
objects with tokenizers trained in memory, so nothing is downloaded.

* Transformer: ``Flux2Transformer2DModel`` with one double- and one single-stream block; ``guidance_embeds`` as the
  real models have it (dev: true, klein: false). Its context width is three text-encoder hidden states stacked, as
  the pipelines build prompt embeddings from three intermediate layers.
* Text encoders: as many layers as the stock pipelines read hidden states from (dev: layers 10, 20 and 30 of a
  30-layer Mistral; klein: 9, 18 and 27 of a 27-layer Qwen3), 16 wide, so ``__call__``'s defaults run unchanged.
* Tokenizers: byte-level BPE trained on the chat text and a word list until every word is one token. Klein's is a
  ``Qwen2Tokenizer`` with a Qwen3-style chat template (``enable_thinking=False`` gives the empty think block).
  Dev's real tokenizer is a ``PixtralProcessor``, which needs torchvision (not installed here); the stock pipeline
  only calls its ``apply_chat_template``, so the tiny one is the bare tokenizer with a Mistral-style template
  (``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``). Dev's system message is 31 tokens here, so its
  ``model_max_length`` (the text length flowrl uses by default) is 48.
* VAE: ``AutoencoderKLFlux2`` with one spatial downsampling (``vae_scale_factor`` 2; the real one is 8) and batch
  norm statistics that are not 0 / 1, so a missing latent normalisation shows in tests. Latents are the VAE's 2x2
  patchified ``(B, 4 * latent_channels, H/4, W/4)``: images must be multiples of 4 px; 16 px gives 16 image tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen3ForCausalLM,
)

from flowrl.policy.tiny.qwen_image import build_qwen2_tokenizer
from flowrl.policy.tiny.text import DEFAULT_WORDS, small_qwen3_config, two_stage_vae_kwargs

VARIANTS = ("klein", "dev")

#: FLUX.2's scheduler configuration: the pipelines compute ``mu`` themselves (``compute_empirical_mu``) and shift
#: the sigmas exponentially (the base/max shift line is unused)
FLUX2_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

#: the hidden states the stock pipelines stack into prompt embeddings (their ``text_encoder_out_layers`` defaults)
DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS = 30, 27

#: Qwen3's chat format for a user turn and the generation prompt, with the empty think block of
#: ``enable_thinking=False`` (what ``Flux2KleinPipeline`` asks for)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

#: Mistral Small 3.1's chat format for a system and a user turn; a turn's content is a string or a list of text parts
#: (``Flux2Pipeline``'s ``format_input`` gives lists)
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)

#: what that template renders for one prompt (``{}``), the text the tiny Qwen2 tokenizer is trained on
QWEN3_CHAT_TEXT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def build_mistral_tokenizer(words: Iterable[str] = DEFAULT_WORDS,
                            model_max_length: int = 48) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Mistral's special tokens and chat format, trained in memory on FLUX.2-dev's
    system message and ``words`` (each of which becomes one token); it saves and loads with ``save_pretrained`` /
    ``from_pretrained``. Right padding with ``<pad>``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=MISTRAL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = sorted(set(words))
    backend.train_from_iterator([SYSTEM_MESSAGE, " " + " ".join(words), "\n".join(words)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=model_max_length,
                                   chat_template=MISTRAL_CHAT_TEMPLATE)


def _vae(latent_channels: int, vae_channels: int, seed: int) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(**two_stage_vae_kwargs(latent_channels, vae_channels))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the patchified latents' normalisation statistics, away from the identity
        vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=g) + 0.5)
    return vae


def _qwen3(tokenizer, hidden: int, layers: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(small_qwen3_config(tokenizer, hidden, layers))


def _mistral3(tokenizer, hidden: int, layers: int) -> Mistral3ForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "[IMG]")}
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=hidden // 2,
            max_position_embeddings=1024,
            sliding_window=None,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        ),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=24, patch_size=6, num_channels=3),
        image_token_index=ids["[IMG]"],
        spatial_merge_size=1,
    ))


def build(
    seed: int = 0,
    variant: str = "klein",
    is_distilled: bool = False,
    words: Iterable[str] = DEFAULT_WORDS,
    num_layers: int = 1,
    num_single_layers: int = 1,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    axes_dims_rope: tuple[int, int, int, int] = (4, 4, 4, 4),
    latent_channels: int = 4,
    vae_channels: int = 8,
    text_hidden_size: int = 16,
    max_text_length: int | None = None,
) -> Flux2KleinPipeline | Flux2Pipeline:
    """A randomly initialised FLUX.2 pipeline: ``variant="klein"`` (the default, the cheaper to build) is
    FLUX.2-klein's ``Flux2KleinPipeline`` (true CFG; ``is_distilled=True``: the step-distilled klein, no guidance),
    ``variant="dev"`` FLUX.2-dev's ``Flux2Pipeline`` (guidance embedding). ``max_text_length`` is the tokenizer's
    ``model_max_length`` (flowrl's default text length); null: 24 (klein) or 48 (dev, whose system message alone is
    31 tokens)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
    if is_distilled and variant != "klein":
        raise ValueError("is_distilled is a FLUX.2-klein option (Flux2KleinPipeline); FLUX.2-dev is guidance-distilled")
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim {attention_head_dim}")
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # the VAE's 2x2 patchified latents
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=3 * text_hidden_size,  # three hidden states stacked
        timestep_guidance_channels=32,
        axes_dims_rope=tuple(axes_dims_rope),
        guidance_embeds=variant == "dev",
    )
    vae = _vae(latent_channels, vae_channels, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG)
    if variant == "dev":
        tokenizer = build_mistral_tokenizer(words, model_max_length=max_text_length or 48)
        text_encoder = _mistral3(tokenizer, text_hidden_size, DEV_TEXT_LAYERS)
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    tokenizer = build_qwen2_tokenizer(words, template=QWEN3_CHAT_TEXT, model_max_length=max_text_length or 24)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = _qwen3(tokenizer, text_hidden_size, KLEIN_TEXT_LAYERS)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
