"""FLUX.1-Kontext (``FluxKontextPipeline``): FLUX.1 that edits an image. The condition image's VAE latents,
packed like the generated ones, are appended to the transformer's token sequence with position ids whose first
coordinate is 1 (the generated tokens' is 0); the prediction keeps the generated tokens only. Without an image it
generates from the prompt alone, as FLUX.1-dev.

* The condition image is resized as ``FluxKontextPipeline.__call__`` resizes it: to the Kontext resolution of the
  nearest aspect ratio (``PREFERRED_KONTEXT_RESOLUTIONS``, about 1024x1024 pixels), or, with
  ``policy.condition_image_area``, to that many pixels at its own aspect ratio (the stock ``_auto_resize=False`` on an
  image of that size), each side rounded down to a multiple of 16; then encoded with the VAE's posterior mode
  (``sample_mode="argmax"``, deterministic) and normalised by the VAE's shift and scale.
* The output size is ``resolution`` (the stock ``max_area`` reshapes it to about 1024x1024 pixels: pass
  ``max_area=height * width`` to compare); the sigmas' shift follows the generated tokens only, as the stock.
* Guidance is FLUX.1-dev's distilled guidance (``guidance_scale``, one pass); the stock ``true_cfg_scale`` with a
  negative prompt is not reproduced.
* Samples whose condition images have different sizes run through the transformer in groups of equal size (the
  token counts differ), in batch order, the same way when sampling and training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowrl.conditions import to_pil_image
from flowrl.policy.adapter import Conditioning, register_adapter
from flowrl.policy.flux import FluxAdapter


@register_adapter("FluxKontextPipeline")
class FluxKontextAdapter(FluxAdapter):
    family_name = "FLUX.1-Kontext"
    #: one image to edit, or none (text-to-image)
    condition_images = (0, 1)

    def condition_size(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` the condition image of ``width`` x ``height`` pixels is resized to."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        f = self.vae_scale_factor
        multiple = f * 2
        width, height = width // f * f, height // f * f  # the image processor's get_default_height_width
        aspect = width / height
        if self.condition_image_area is None:
            _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        else:
            width = round(math.sqrt(self.condition_image_area * aspect))
            height = round(math.sqrt(self.condition_image_area / aspect))
        return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)

    def encode_condition(self, prompts: Sequence[str], conditions: Sequence, height: int, width: int,
                         device: torch.device) -> Conditioning:
        cond = self.encode_prompt(prompts, device)
        latents = []
        for condition in conditions:
            if len(condition) == 0:
                latents.append(None)
                continue
            pil = to_pil_image(condition[0])
            h, w = self.condition_size(pil.width, pil.height)
            processor, vae = self.pipeline.image_processor, self.pipeline.vae
            image = processor.preprocess(processor.resize(pil, h, w), h, w).to(device, vae.dtype)
            latents.append(self.pipeline._encode_vae_image(image, generator=None)[0].float())
        cond.per_sample["image_latents"] = latents
        return cond

    def stock_condition_kwargs(self, condition, height: int, width: int) -> dict:
        """The image already at :meth:`condition_size` and ``_auto_resize=False`` (the stock call then keeps it), and
        ``max_area`` of the output size (the stock call would reshape the output to about 1024x1024 pixels)."""
        if len(condition) == 0:
            return {"max_area": height * width}
        pil = to_pil_image(condition[0])
        h, w = self.condition_size(pil.width, pil.height)
        return {"image": self.pipeline.image_processor.resize(pil, h, w), "_auto_resize": False,
                "max_area": height * width}

    def condition_ids(self, latent_height: int, latent_width: int, device: torch.device) -> torch.Tensor:
        """Position ids of the condition image's packed tokens: the generated tokens' with first coordinate 1."""
        ids = self.pipeline._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, torch.float32)
        ids[..., 0] = 1
        return ids

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        images = cond["image_latents"] if "image_latents" in cond else [None] * latents.shape[0]
        shapes = [None if z is None else tuple(z.shape) for z in images]
        if len(set(shapes)) == 1:
            return self._forward_same_size(denoiser, latents, sigma, cond, guidance, images)
        out = torch.empty_like(latents, dtype=torch.float32)
        for shape in dict.fromkeys(shapes):  # in order of first appearance
            idx = [i for i, s in enumerate(shapes) if s == shape]
            part = self._forward_same_size(denoiser, latents[idx], sigma[idx], cond.select(idx), guidance,
                                           [images[i] for i in idx])
            out[idx] = part.float()
        return out

    def _forward_same_size(self, denoiser, latents, sigma, cond, guidance, images):
        _, _, h, w = latents.shape
        hidden, ids = self.pack(latents), self.image_ids(h, w, latents.device)
        if images[0] is not None:
            image_latents = torch.stack(images).to(latents.device)
            hidden = torch.cat([hidden, self.pack(image_latents).to(hidden.dtype)], dim=1)
            ids = torch.cat([ids, self.condition_ids(*image_latents.shape[-2:], latents.device)], dim=0)
        n = latents.shape[-2] * latents.shape[-1] // 4
        out = self.transformer_call(denoiser, hidden, sigma, cond, guidance, ids)[:, :n]
        return self.unpack(out, h, w)
