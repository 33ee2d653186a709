"""An editing reward that needs no weights beyond a CLIP: how far the edit moved the image in the direction the text
asks for, and how much of the original it kept.

* **direction** (CLIP directional similarity, as InstructPix2Pix and StyleGAN-NADA evaluate edits): the cosine between
  the image change ``E_i(edited) - E_i(source)`` and the text change ``E_t(prompt) - E_t(caption)``, where
  ``caption`` describes the condition image (a row's ``source_prompt``; ``source_text`` where a row has none) and
  the prompt describes the wanted result (or is the instruction). 1: the image moved exactly as the text did.
* **preservation**: the cosine between ``E_i(edited)`` and ``E_i(source)``, the CLIP image similarity of the edit to
  the condition image. Without an edit mask the whole image counts: an edit that changes everything scores low.

The score is ``direction_weight * direction + preservation_weight * preservation`` (embeddings L2-normalised, in
float32); the first condition image of a sample is its source. Each embedding is computed on the 8-bit picture the
sample would be saved as, through the CLIP processor, as the other CLIP rewards do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowrl.errors import ConfigError
from flowrl.rewards.clip import _Clip
from flowrl.rewards.registry import register_reward

__all__ = ["ClipEdit"]


@register_reward("clip_edit")
class ClipEdit(_Clip):
    """CLIP directional similarity plus preservation of the condition image (see the module docstring).

    Args:
        model_name_or_path: the CLIP (hub id or folder).
        direction_weight: weight of the directional similarity.
        preservation_weight: weight of the image similarity to the condition image (0: direction only).
        source_text: the caption of a condition image whose row has no ``source_prompt``.
    """

    uses_condition_images = True

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", direction_weight: float = 1.0,
                 preservation_weight: float = 0.5, source_text: str = "a photo", **kwargs):
        if direction_weight < 0 or preservation_weight < 0 or direction_weight + preservation_weight == 0:
            raise ConfigError(f"clip_edit: direction_weight={direction_weight}, preservation_weight="
                              f"{preservation_weight}; both must be >= 0 and at least one > 0")
        super().__init__(model_name_or_path, **kwargs)
        self.direction_weight, self.preservation_weight = float(direction_weight), float(preservation_weight)
        self.source_text = source_text

    def terms(self, images: torch.Tensor, prompts: Sequence[str], condition_images) -> dict[str, torch.Tensor]:
        """``direction`` and ``preservation``, each ``(B,)`` float32."""
        if condition_images is None or any(c is None or len(c) == 0 for c in condition_images):
            raise ValueError("clip_edit scores edits: every sample needs a condition image (prompt rows with "
                             '"images"); use clip_score for text-to-image')
        if images.ndim == 5:
            raise ValueError("clip_edit scores images, not videos")
        sources = [c[0] for c in condition_images]
        if len({tuple(im.shape) for im in sources}) == 1:
            sources = torch.stack(sources)
        edited, source = self._embed_all(images), self._embed_all(sources)
        captions = [c.caption if getattr(c, "caption", None) else self.source_text for c in condition_images]
        text_change = self.text_embeds(list(prompts)) - self.text_embeds(captions)
        direction = nn.functional.cosine_similarity(edited - source, text_change, dim=-1, eps=1e-8)
        preservation = (edited * source).sum(-1)
        return {"direction": direction.cpu().float(), "preservation": preservation.cpu().float()}

    def _embed_all(self, images) -> torch.Tensor:
        """Images of any sizes (a list, or a batch) as normalised CLIP embeddings (the processor resizes each)."""
        if isinstance(images, torch.Tensor):
            return self.image_embeds(images)
        return torch.cat([self.image_embeds(im[None]) for im in images])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], condition_images=None) -> torch.Tensor:
        t = self.terms(images, prompts, condition_images)
        return self.direction_weight * t["direction"] + self.preservation_weight * t["preservation"]
