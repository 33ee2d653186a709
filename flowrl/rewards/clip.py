"""CLIP-family rewards: CLIP score, PickScore (and its group-rank form), the LAION aesthetic predictor.

Each loads its model with ``from_pretrained`` from a hub id or a local folder (``model_name_or_path``), the
processor likewise (``processor_name_or_path``, default: the model's), so the same code serves the hub models
and a tiny model saved to disk. Images reach the processor as the 8-bit pictures they would be saved as.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowrl.rewards.base import to_pil
from flowrl.rewards.registry import register_reward

__all__ = ["AestheticScore", "ClipScore", "PickScore", "PickScoreRank", "AestheticHead"]


def _unit(features) -> torch.Tensor:
    """L2-normalised float32 embeddings (transformers 5 returns them as ``pooler_output`` of an output object)."""
    emb = features.pooler_output if hasattr(features, "pooler_output") else features
    return nn.functional.normalize(emb.float(), dim=-1)


class _Clip:
    """A CLIP model and processor; ``embed`` gives L2-normalised image and text embeddings."""

    def __init__(self, model_name_or_path: str, processor_name_or_path: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.model = CLIPModel.from_pretrained(model_name_or_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_name_or_path or model_name_or_path)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=to_pil(images[i:i + self.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(_unit(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.processor(text=list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt")
            out.append(_unit(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                          attention_mask=tok["attention_mask"].to(self.device))))
        return torch.cat(out)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).cpu()


@register_reward("clip_score")
class ClipScore(_Clip):
    """Cosine similarity of CLIP image and prompt embeddings, times ``scale``."""

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", scale: float = 1.0, **kwargs):
        super().__init__(model_name_or_path, **kwargs)
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scale * self.cosine(images, prompts)


@register_reward("pickscore")
class PickScore(_Clip):
    """PickScore as its authors compute it: ``logit_scale.exp() * cos(image, prompt)`` of the PickScore CLIP
    (about 20-23 for good images); ``scale`` multiplies it (Flow-GRPO trains on ``scale: 1/26``)."""

    def __init__(self, model_name_or_path: str = "yuvalkirstain/PickScore_v1",
                 processor_name_or_path: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", scale: float = 1.0,
                 **kwargs):
        super().__init__(model_name_or_path, processor_name_or_path, **kwargs)
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scale * self.model.logit_scale.exp().float().cpu() * self.cosine(images, prompts)


@register_reward("pickscore_rank")
class PickScoreRank(PickScore):
    """Groupwise: a sample's PickScore rank within its group, ``rank / group_size`` (0 for the worst)."""

    groupwise = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = super().__call__(images, prompts)
        return scores.argsort().argsort().float() / len(scores)


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (its state-dict keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_reward("aesthetic")
class AestheticScore(_Clip):
    """LAION-style aesthetic score: the MLP ``head_path`` (a ``.pth`` or ``.safetensors`` state dict, e.g.
    ``sac+logos+ava1-l14-linearMSE.pth``) on the L2-normalised CLIP image embedding (about 1-10)."""

    def __init__(self, head_path: str, model_name_or_path: str = "openai/clip-vit-large-patch14", **kwargs):
        super().__init__(model_name_or_path, **kwargs)
        if str(head_path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(head_path)
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.head = AestheticHead(self.model.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.image_embeds(images)).squeeze(-1).float()
