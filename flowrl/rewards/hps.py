"""HPSv2 / HPSv2.1 (Human Preference Score v2): an OpenCLIP ViT-H-14 (laion2B-s32B-b79K) fine-tuned on human
preferences; the score is the cosine of the image and prompt embeddings, without logit scale (about 0.2-0.3).

``model_name_or_path`` is either a transformers CLIP folder or hub id (an HPSv2 CLIP already converted), or the
authors' open_clip checkpoint file (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``; ``.pt``, ``.pth``,
``.bin`` or ``.safetensors``), loaded into a transformers ``CLIPModel`` built from ``config_name_or_path``.

Images are letterboxed as the authors' scorer does (``hpsv2.score``'s ``light_augmentation=True`` transform):
the longer side resized to the model's image size (bicubic), the shorter one padded with black, centred. With
``letterbox=False`` the processor's resize-and-centre-crop is used instead; both agree on square images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from flowrl.errors import ConfigError
from flowrl.rewards.clip import _Clip
from flowrl.rewards.registry import register_reward

__all__ = ["HPSv2", "load_openclip_state", "openclip_to_hf"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# Hand-written on purpose: open_clip imports torchvision, which cannot be installed beside this torch, and
# transformers 5 ships no open_clip -> CLIPModel converter. open_clip (OpenAI CLIP) names -> CLIPModel names:
_RENAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm": "visual.ln_pre",  # sic: transformers' spelling
    "vision_model.post_layernorm": "visual.ln_post",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _source(hf_key: str) -> tuple[str, int | None, bool]:
    """The open_clip key a CLIPModel parameter comes from, its q/k/v chunk of ``in_proj`` and whether transposed."""
    if hf_key in _TRANSPOSED:
        return _TRANSPOSED[hf_key], None, True
    if m := _LAYER.fullmatch(hf_key):
        tower, n, module, kind = m.groups()
        prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{n}."
        if module in _QKV:
            return f"{prefix}attn.in_proj_{kind}", _QKV[module], False
        return f"{prefix}{_BLOCK.get(module, module)}.{kind}", None, False
    stem, _, kind = hf_key.rpartition(".")
    if hf_key not in _RENAMES and stem in _RENAMES:
        return f"{_RENAMES[stem]}.{kind}", None, False
    return _RENAMES.get(hf_key, hf_key), None, False


def openclip_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (possibly ``module.``-prefixed) -> a ``CLIPModel(config)`` state dict.

    Strict: every checkpoint key is used and every CLIPModel parameter filled with the right shape, else a
    :class:`ConfigError` names the missing, unexpected or mis-shaped keys (``position_ids`` buffers aside)."""
    from transformers import CLIPModel

    state = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items() if not k.endswith("position_ids")}
    out, used, missing, misshaped = {}, set(), [], []
    for hf_key, shape in expected.items():
        key, chunk, transpose = _source(hf_key)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        tensor = state[key]
        if chunk is not None and tensor.shape[0] % 3 == 0:
            tensor = tensor.chunk(3, dim=0)[chunk]
        tensor = tensor.t() if transpose and tensor.ndim == 2 else tensor
        if tensor.shape != shape:
            misshaped.append(f"{key} {tuple(state[key].shape)} (for {hf_key} {tuple(shape)})")
        out[hf_key] = tensor.contiguous()
    problems = {"missing": sorted(set(missing)), "unexpected": sorted(set(state) - used), "mis-shaped": misshaped}
    if any(problems.values()):
        raise ConfigError("the open_clip checkpoint does not fit the CLIP config: "
                          + "; ".join(f"{what} keys {keys}" for what, keys in problems.items() if keys)
                          + " (is config_name_or_path the architecture it was trained with, e.g. "
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K for HPSv2?)")
    return out


def load_openclip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint file, unwrapped from a ``state_dict`` entry if there is one."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state


@register_reward("hpsv2")
class HPSv2(_Clip):
    """HPSv2 score ``cos(image, prompt)`` times ``scale`` (see the module docstring for the model forms)."""

    def __init__(self, model_name_or_path: str, config_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 processor_name_or_path: str | None = None, scale: float = 1.0, letterbox: bool = True,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32):
        self.scale, self.letterbox = float(scale), bool(letterbox)
        if not str(model_name_or_path).endswith(CHECKPOINT_SUFFIXES):
            super().__init__(model_name_or_path, processor_name_or_path, device, dtype, batch_size)
            return
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        if not Path(model_name_or_path).is_file():
            raise ConfigError(f"hpsv2: checkpoint {model_name_or_path!r} is not a file")
        config = CLIPConfig.from_pretrained(config_name_or_path)
        torch_dtype = getattr(torch, dtype)
        state = {k: v.to(torch_dtype) for k, v in
                 openclip_to_hf(load_openclip_state(model_name_or_path), config).items()}
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.model = CLIPModel.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype)
        self.model = self.model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_name_or_path or config_name_or_path)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        if self.letterbox:
            images = letterbox(images, self.model.config.vision_config.image_size)
        return super().image_embeds(images)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scale * self.cosine(images, prompts)


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` in [0, 1] -> ``(B, C, size, size)``: the 8-bit pictures' longer side resized to ``size``
    (bicubic, antialiased), centred on black, as open_clip's ``ResizeMaxSize`` does."""
    images = (images.detach().float().clamp(0, 1) * 255).round() / 255
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    if (nh, nw) != (h, w):
        images = torch.nn.functional.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True,
                                                 align_corners=False).clamp(0, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    return torch.nn.functional.pad(images, (left, size - nw - left, top, size - nh - top))
