"""Tiny Qwen-Image-Edit: a stock ``QwenImageEditPipeline`` (Qwen-Image-Edit, one condition image) or
``QwenImageEditPlusPipeline`` (``plus=True``: Qwen-Image-Edit-2509 / -2511, several condition images) with random
components of a few kilobytes, built from config objects as :mod:`flowrl.policy.tiny.qwen_image` builds Qwen-Image
(its transformer, VAE and scheduler, and its in-memory ``Qwen2Tokenizer``), plus what editing adds:

* Tokenizer: trained on the edit pipelines' prompt template, so the template's system part is 64 tokens, the
  stock ``prompt_template_encode_start_idx`` (as with the real Qwen2.5-VL tokenizer, one token per pre-tokenizer
  piece); ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>`` and ``<|video_pad|>`` are special tokens.
* Processor: Qwen2-VL's (the tokenizer and Qwen2-VL's image processor: 14 px patches merged 2x2, so 28 px per
  vision token) with ``max_pixels`` 56 x 56: each condition image reaches the VL encoder as at most 4 vision tokens
  (the real processor allows 12.8 M pixels). It is :class:`flowrl.policy.qwen_image_edit.ImageQwen2VLProcessor`,
  the stock ``Qwen2VLProcessor`` without the video part that transformers builds only with torchvision (not installed
  here), which flowrl also loads a real checkpoint's processor as where torchvision is missing.
* Text encoder: Qwen2.5-VL with a 1-layer, 32-wide language model and a 1-block, 16-wide vision tower that the
  condition images go through, its image token ids those of the tokenizer.
* Transformer: Qwen-Image's tiny one; ``zero_cond_t`` (Qwen-Image-Edit-2511: the condition image tokens are
  modulated at timestep 0) is on by default for ``plus=True``, as the 2511 checkpoint sets it.

The stock pipelines resize condition images to about 1024 x 1024 pixels for the VAE: a tiny test sets
``policy.condition_image_area`` (and patches the stock constant to the same value, :func:`stock_area_patches`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from transformers import ProcessorMixin, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flowrl.policy.qwen_image_edit import ImageQwen2VLProcessor
from flowrl.policy.tiny import qwen_image
from flowrl.policy.tiny.text import DEFAULT_WORDS

#: diffusers' pipeline loader finds a component's loading method through the base classes it looks up by name in the
#: component's module (the tiny pipelines saved before ImageQwen2VLProcessor moved to flowrl.policy.qwen_image_edit
#: name this module for it)
__all__ = ["ImageQwen2VLProcessor", "ProcessorMixin", "build", "build_edit_tokenizer", "stock_area_patches"]

#: the VL encoder's image (and, unused, video) tokens, as Qwen2.5-VL's tokenizer spells them
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
#: words of editing prompts (beside the shared tiny vocabulary) and of the Plus template's "Picture 1: " prefixes
EDIT_WORDS = ("make it add remove replace turn into hat background Picture").split()
#: the most pixels the tiny processor passes to the vision tower: 56 x 56, at most 4 vision tokens per image
MAX_VL_PIXELS = 56 * 56


def _templates() -> tuple[str, str]:
    """The Edit and Plus prompt templates (instance attributes set in ``__init__``; read without components)."""
    none = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    edit, plus = QwenImageEditPipeline(**none), QwenImageEditPlusPipeline(**none)
    return edit.prompt_template_encode, plus.prompt_template_encode


def build_edit_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """The tiny ``Qwen2Tokenizer`` trained on both edit templates (vision tokens removed from the training text)
    and ``words``, with the vision tokens added as special tokens."""
    edit, plus = _templates()
    text = edit + plus.replace("{}", " Picture 1: 2: 3: 4: ")
    for token in (VISION_START, IMAGE_PAD, VISION_END):
        text = text.replace(token, "")
    tokenizer = qwen_image.build_qwen2_tokenizer([*words, *EDIT_WORDS], template=text)
    tokenizer.add_tokens([VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD], special_tokens=True)
    return tokenizer


def build_processor(tokenizer, max_pixels: int = MAX_VL_PIXELS) -> ImageQwen2VLProcessor:
    """Qwen2-VL's processor over ``tokenizer``: 14 px patches merged 2x2, 28 x 28 to ``max_pixels`` pixels."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return ImageQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build(seed: int = 0, plus: bool = False, zero_cond_t: bool | None = None, words: Iterable[str] = DEFAULT_WORDS,
          max_vl_pixels: int = MAX_VL_PIXELS, **qwen_image_kwargs):
    """A randomly initialised ``QwenImageEditPipeline`` (``plus=True``: ``QwenImageEditPlusPipeline``) small enough
    for a CPU test; ``qwen_image_kwargs`` size the transformer and VAE as :func:`flowrl.policy.tiny.qwen_image.build`.
    ``zero_cond_t``: None = on for Plus (2511), off for Edit."""
    base = qwen_image.build(seed=seed, words=words, **qwen_image_kwargs)
    zero_cond_t = plus if zero_cond_t is None else zero_cond_t
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel.from_config(base.transformer.config, zero_cond_t=zero_cond_t)
    tokenizer = build_edit_tokenizer(words)
    config = copy.deepcopy(base.text_encoder.config)
    config.text_config.vocab_size = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config.image_token_id, config.vision_start_token_id = ids(IMAGE_PAD), ids(VISION_START)
    config.vision_end_token_id = ids(VISION_END)
    config.video_token_id = ids(VIDEO_PAD)  # never in a prompt: the edit pipelines give no video
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return pipeline_class(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=build_processor(tokenizer, max_vl_pixels),
        transformer=transformer,
    )


def stock_area_patches(area: int) -> list[tuple[object, str, object]]:
    """``(object, attribute, value)`` triples that make the stock edit pipelines resize condition images for the VAE
    to ``area`` pixels instead of 1024 x 1024 (what ``policy.condition_image_area=area`` does in flowrl), for a
    test's ``monkeypatch.setattr``: ``QwenImageEditPipeline.__call__`` passes the literal ``1024 * 1024`` to its
    module's ``calculate_dimensions`` (wrapped to use ``area``), ``QwenImageEditPlusPipeline`` reads its module's
    ``VAE_IMAGE_SIZE``. The Plus VL size (``CONDITION_IMAGE_SIZE``, 384 x 384) stays."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions

    def calculate_dimensions(target_area, ratio):
        return original(area if target_area == 1024 * 1024 else target_area, ratio)

    return [(edit, "calculate_dimensions", calculate_dimensions), (plus, "VAE_IMAGE_SIZE", area)]
