"""ImageReward (Xu et al. 2023, THUDM/ImageReward, "ImageReward-v1.0"): a human-preference reward for
text-to-image samples, on transformers' own BLIP classes.

ImageReward is BLIP (a ViT-L/16 image encoder at 224 px and a BERT text encoder whose layers cross-attend to the
image tokens) plus an MLP: the prompt is encoded with cross-attention over the image embeddings, the text encoder's
first ([CLS]) hidden state goes through the MLP, and the score is ``(mlp - 0.16717362830052426) /
1.0333394966054072`` (about -2 to 2; higher is better).

Why this is hand-written rather than the ``image-reward`` package: that package pins ``timm==0.6.13`` (which needs
torchvision) and ``fairscale==0.4.13``, imports torchvision and the OpenAI ``clip`` package at import time, and
its BLIP text encoder imports ``apply_chunking_to_forward`` from ``transformers.modeling_utils``, which
transformers 5 no longer has. transformers' ``BlipVisionModel`` and ``BlipTextModel`` are the same architecture
(they are adapted from the BLIP code ImageReward copies), so only the preprocessing, the head and a weight
converter are written here.

Two model formats load:

* an HF-format folder: ``BlipForImageTextRetrieval.save_pretrained`` (``config.json`` + weights; only its
  ``vision_model`` and ``text_encoder`` are used) plus the head as ``mlp.safetensors`` (keys ``layers.*``), and
  optionally the tokenizer;
* the original release: ``ImageReward.pt`` (a state dict with keys ``blip.visual_encoder.*``,
  ``blip.text_encoder.*``, ``mlp.*``) and its ``med_config.json``, converted strictly at load time: every
  checkpoint key is used or listed in ``UNUSED_CHECKPOINT_KEYS``, every parameter is filled, else ConfigError.
  A hub id (default ``THUDM/ImageReward``), a folder holding both files, or the ``.pt`` file itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from flowrl.errors import ConfigError
from flowrl.rewards.base import to_pil
from flowrl.rewards.clip import AestheticHead
from flowrl.rewards.registry import register_reward

__all__ = ["ImageReward", "ImageRewardModel", "blip_config", "convert_original_state_dict", "preprocess",
           "UNUSED_CHECKPOINT_KEYS"]

# ImageReward/ImageReward.py (image-reward 1.5): the score normalisation, the prompt length, the preprocessing
# (torchvision Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize with the CLIP mean and std).
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_PROMPT_TOKENS = 35
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_FILE = "mlp.safetensors"

# BLIP create_vit('large', 224): timm VisionTransformer, patch 16, width 1024, depth 24, 16 heads, mlp ratio 4,
# qkv bias, LayerNorm eps 1e-6 (transformers' BlipVisionConfig defaults to 1e-5).
VIT_LARGE_224 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}

# Original name (under ``blip.visual_encoder.``, BLIP models/vit.py) <-> transformers BlipVisionModel name (under
# ``vision_model.``). ``{n}`` is a block index, ``{p}`` weight or bias. BLIP's fused ``attn.qkv`` and transformers'
# ``self_attn.qkv`` are both Linear(d, 3d) read as (3, heads, head_dim): the tensors copy unchanged.
_VISION_KEYS = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{n}.norm1.{p}", "encoder.layers.{n}.layer_norm1.{p}"),
    ("blocks.{n}.attn.qkv.{p}", "encoder.layers.{n}.self_attn.qkv.{p}"),
    ("blocks.{n}.attn.proj.{p}", "encoder.layers.{n}.self_attn.projection.{p}"),
    ("blocks.{n}.norm2.{p}", "encoder.layers.{n}.layer_norm2.{p}"),
    ("blocks.{n}.mlp.fc1.{p}", "encoder.layers.{n}.mlp.fc1.{p}"),
    ("blocks.{n}.mlp.fc2.{p}", "encoder.layers.{n}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
# The text encoder (BLIP models/med.py BertModel, no pooler) has transformers BlipTextModel's names; the head is
# the ImageReward MLP. Prefixes: original -> ours.
_SAME_NAMES = (("blip.text_encoder.", "text_encoder."), ("mlp.", "mlp."))
_VISION_PREFIX = ("blip.visual_encoder.", "vision_model.")

# In ImageReward.pt but not used to score: BLIP's image-text contrastive projections (BLIP_Pretrain.vision_proj,
# text_proj) and med.py's persistent position-id buffer (transformers rebuilds it).
UNUSED_CHECKPOINT_KEYS = (
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{pattern}$")


_VISION_FORWARD = [(_template_regex(src), dst) for src, dst in _VISION_KEYS]
_VISION_BACKWARD = [(_template_regex(dst), src) for src, dst in _VISION_KEYS]


def _rename(key: str, table, prefixes: tuple[str, str]) -> str | None:
    src_prefix, dst_prefix = prefixes
    if not key.startswith(src_prefix):
        return None
    rest = key[len(src_prefix):]
    for regex, template in table:
        match = regex.match(rest)
        if match:
            return dst_prefix + template.format(**match.groupdict())
    return None


def _original_to_ours(key: str) -> str | None:
    new = _rename(key, _VISION_FORWARD, _VISION_PREFIX)
    if new is not None:
        return new
    for src, dst in _SAME_NAMES:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _ours_to_original(key: str) -> str:
    old = _rename(key, _VISION_BACKWARD, _VISION_PREFIX[::-1])
    if old is not None:
        return old
    for src, dst in _SAME_NAMES:
        if key.startswith(dst):
            return src + key[len(dst):]
    return key


def convert_original_state_dict(state: Mapping[str, torch.Tensor],
                                expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys -> :class:`ImageRewardModel` keys, strictly: a checkpoint key that is neither mapped nor
    in ``UNUSED_CHECKPOINT_KEYS``, a parameter of ``expected`` (the model's state dict) that no key fills, or a
    shape that differs raises ConfigError naming the keys."""
    converted, unknown, shapes, filled = {}, [], [], set()
    for key, value in state.items():
        if key in UNUSED_CHECKPOINT_KEYS:
            continue
        new = _original_to_ours(key)
        if new is None or new not in expected:
            unknown.append(key)
            continue
        filled.add(new)
        if tuple(value.shape) != tuple(expected[new].shape):
            shapes.append(f"{key} {tuple(value.shape)} (the model has {tuple(expected[new].shape)})")
        else:
            converted[new] = value
    missing = [_ours_to_original(k) for k in expected if k not in filled]
    problems = []
    if unknown:
        problems.append(f"unexpected keys {sorted(unknown)}")
    if missing:
        problems.append(f"missing keys {sorted(missing)}")
    if shapes:
        problems.append(f"shapes that differ from the model config: {sorted(shapes)}")
    if problems:
        raise ConfigError("ImageReward checkpoint does not match the ImageReward model (BLIP ViT + BERT with "
                          "cross-attention + MLP): " + "; ".join(problems) + ". Is it an ImageReward.pt, and does "
                          "med_config / vision_config describe it?")
    return converted


def blip_config(med_config: Mapping, vision_config: Mapping | None = None):
    """The transformers BlipConfig of an ImageReward model: the text encoder from BLIP's ``med_config.json``, the
    image encoder ViT-L/16 at 224 px (``vision_config`` overrides entries, e.g. for a small model)."""
    from transformers import BlipConfig

    med = dict(med_config)
    if not med.get("add_cross_attention", False):
        raise ConfigError("med_config: ImageReward's text encoder cross-attends to the image; add_cross_attention "
                          f"must be true, got {med.get('add_cross_attention')!r}")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"med_config: position_embedding_type {med['position_embedding_type']!r} is not "
                          "supported (transformers' BLIP text encoder has absolute positions only)")
    text = {k: med[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                                "pad_token_id") if k in med}
    # is_decoder builds the cross-attention layers; the forward is bidirectional (BlipTextModel's is_decoder=False).
    text.update(is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = {**VIT_LARGE_224, **dict(vision_config or {})}
    return BlipConfig(text_config=text, vision_config=vision)


class ImageRewardModel(nn.Module):
    """BLIP's image encoder and cross-attending text encoder, and the ImageReward MLP; ``forward`` gives the
    normalised score of each (image, prompt) pair."""

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module, mlp: AestheticHead):
        super().__init__()
        self.vision_model, self.text_encoder, self.mlp = vision_model, text_encoder, mlp

    @classmethod
    def from_config(cls, config) -> ImageRewardModel:
        from transformers import BlipTextModel, BlipVisionModel

        return cls(BlipVisionModel(config.vision_config), BlipTextModel(config.text_config, add_pooling_layer=False),
                   AestheticHead(config.text_config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        features = text.last_hidden_state[:, 0, :].float()
        return ((self.mlp(features) - SCORE_MEAN) / SCORE_STD).squeeze(-1)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, RGB, ``ToTensor``, ``Normalize`` (CLIP mean
    and std), as ImageReward's ``_transform``. Written out because transformers' image processors round the crop
    offset down where torchvision rounds it to nearest (a one-pixel shift for some sizes)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (pixels - mean) / std


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path}: expected a state dict (ImageReward.pt), got {type(state).__name__}")
    return dict(state)


def _is_tokenizer_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt"))


@register_reward("image_reward")
class ImageReward:
    """ImageReward score of each (image, prompt) pair (about -2 to 2), times ``scale``.

    ``model_name_or_path``: a hub id holding ``ImageReward.pt`` and ``med_config.json`` (default
    ``THUDM/ImageReward``), a local folder with those two files, the ``.pt`` file itself (``med_config``: its
    config, default the ``med_config.json`` beside it), or an HF-format folder (``config.json`` of a
    ``BlipForImageTextRetrieval``, its weights and ``mlp.safetensors``). ``vision_config`` overrides the ViT-L/16
    settings of an original checkpoint. ``tokenizer_name_or_path``: a BERT tokenizer (default: the model folder's
    own if it has one, else ``bert-base-uncased``; a local path works offline); ImageReward's ``[DEC]`` and
    ``[ENC]`` special tokens are added to it as BLIP's ``init_tokenizer`` does.
    """

    def __init__(self, model_name_or_path: str = "THUDM/ImageReward", tokenizer_name_or_path: str | None = None,
                 med_config: str | None = None, vision_config: Mapping | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, scale: float = 1.0):
        from transformers import BertTokenizer

        self.device, self.batch_size, self.scale = torch.device(device), int(batch_size), float(scale)
        path = Path(model_name_or_path)
        if path.is_dir() and (path / "config.json").is_file():
            model = self._load_hf(path)
        else:
            model = self._load_original(model_name_or_path, med_config, vision_config)
        self.model = model.eval()
        self.model.vision_model.to(getattr(torch, dtype))
        self.model.text_encoder.to(getattr(torch, dtype))
        self.model.to(self.device)
        self.dtype = getattr(torch, dtype)
        self.image_size = int(self.model.vision_model.config.image_size)

        if tokenizer_name_or_path is None:
            tokenizer_name_or_path = str(path) if path.is_dir() and _is_tokenizer_dir(path) else "bert-base-uncased"
        tokenizer = BertTokenizer.from_pretrained(tokenizer_name_or_path)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab_size = self.model.text_encoder.config.vocab_size
        if len(tokenizer) > vocab_size:
            raise ConfigError(f"tokenizer {tokenizer_name_or_path!r} has {len(tokenizer)} tokens with [DEC] and [ENC], "
                              f"more than the text encoder's vocab_size {vocab_size}; ImageReward uses "
                              "bert-base-uncased (30522 + 2 = 30524)")
        self.tokenizer = tokenizer

    @staticmethod
    def _load_hf(path: Path) -> ImageRewardModel:
        from transformers import BlipForImageTextRetrieval

        head_path = path / HEAD_FILE
        if not head_path.is_file():
            raise ConfigError(f"{path} is an HF-format ImageReward folder without its head {HEAD_FILE} "
                              "(the MLP state dict, keys layers.*)")
        blip, info = BlipForImageTextRetrieval.from_pretrained(str(path), output_loading_info=True)
        missing = sorted(k for k in info["missing_keys"] if k.startswith(("vision_model.", "text_encoder.")))
        if missing or info["mismatched_keys"]:
            raise ConfigError(f"{path}: the weights do not fill the BLIP image and text encoders: missing {missing}, "
                              f"mismatched {sorted(map(str, info['mismatched_keys']))}")
        mlp = AestheticHead(blip.config.text_config.hidden_size)
        state = _load_state(head_path)
        want, got = set(mlp.state_dict()), set(state)
        if want != got:
            raise ConfigError(f"{head_path}: missing keys {sorted(want - got)}, unexpected keys {sorted(got - want)}")
        mlp.load_state_dict(state)
        return ImageRewardModel(blip.vision_model, blip.text_encoder, mlp)

    @staticmethod
    def _load_original(name: str, med_config: str | None, vision_config: Mapping | None) -> ImageRewardModel:
        path = Path(name)
        if path.is_dir():
            checkpoint, med_path = path / "ImageReward.pt", Path(med_config) if med_config else path / "med_config.json"
            if not checkpoint.is_file():
                raise ConfigError(f"{path} holds neither an HF-format model (config.json) nor ImageReward.pt")
        elif path.is_file():
            checkpoint, med_path = path, Path(med_config) if med_config else path.parent / "med_config.json"
        elif os.path.exists(name) or name.startswith((".", "/")) or name.count("/") != 1:
            raise ConfigError(f"ImageReward model {name!r} is neither a local file or folder nor a hub id (owner/name)")
        else:
            from huggingface_hub import hf_hub_download

            checkpoint = Path(hf_hub_download(name, "ImageReward.pt"))
            med_path = Path(med_config) if med_config else Path(hf_hub_download(name, "med_config.json"))
        if not med_path.is_file():
            raise ConfigError(f"ImageReward checkpoint {checkpoint} needs its med_config.json (BLIP's text encoder "
                              f"config): {med_path} is not a file; pass med_config=PATH")
        with open(med_path) as f:
            config = blip_config(json.load(f), vision_config)
        model = ImageRewardModel.from_config(config)
        state = convert_original_state_dict(_load_state(checkpoint), model.state_dict())
        model.load_state_dict(state, strict=True)
        return model

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """As ImageReward: padded to 35 tokens, ``[CLS] prompt [SEP]`` (the first token is left as [CLS])."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"ImageReward scores images (B, C, H, W); got shape {tuple(images.shape)}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess(im, self.image_size) for im in to_pil(images[i:i + self.batch_size])])
            tok = self.tokenize(prompts[i:i + self.batch_size])
            out.append(self.model(pixels.to(self.device, self.dtype), tok["input_ids"].to(self.device),
                                  tok["attention_mask"].to(self.device)).float().cpu())
        return self.scale * torch.cat(out)
