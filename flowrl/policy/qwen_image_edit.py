"""Qwen-Image-Edit (``QwenImageEditPipeline``: one condition image) and Qwen-Image-Edit-2509 / -2511
(``QwenImageEditPlusPipeline``: one to three condition images): Qwen-Image (:mod:`flowrl.policy.qwen_image`) that
edits. Sampling, latents, sigmas, decoding and the norm-rescaled true CFG are Qwen-Image's; what editing adds is
done as the stock ``__call__`` does it:

* Condition image sizes. Each image is taken as the stock pipelines take it, an 8-bit RGB PIL image (exact for
  images read from files: their values are k / 255), and resized with the pipeline's ``image_processor`` (PIL,
  Lanczos) to the VAE size: its own aspect ratio at 1024 x 1024 pixels, each side rounded to a multiple of 32
  (``calculate_dimensions``); ``policy.condition_image_area`` replaces the 1024 x 1024 (the stock constant, which a
  test patches to the same value). The VL encoder sees, for Edit, that same resized image, and for Plus each image
  resized to 384 x 384 pixels at its aspect ratio (the stock ``CONDITION_IMAGE_SIZE``, kept whatever the VAE
  area); the VL processor then resizes to its own patch grid.
* Prompt: the stock ``encode_prompt`` with the images: the edit template with the images' vision tokens (Plus:
  ``Picture i: <image>`` for each), through Qwen2.5-VL, its first 64 hidden states (the system part) dropped. The
  stock edit pipelines never truncate it (their ``max_sequence_length`` is unused), so flowrl keeps the whole
  sequence, image tokens included, and refuses ``policy.max_sequence_length``.
* Image latents: the VAE's posterior mode (``sample_mode="argmax"``: deterministic) of each resized image,
  normalised by ``latents_mean`` / ``latents_std``, packed 2x2 and appended to the generated tokens in image order;
  ``img_shapes`` gives the transformer's RoPE each image's grid after the generated one's, and the prediction keeps
  the generated tokens only. Qwen-Image-Edit-2511's ``zero_cond_t`` (the condition tokens modulated at timestep 0)
  happens inside the stock transformer from the same ``img_shapes``.
* Guidance: true CFG against the negative prompt ``" "`` encoded with the same condition images (the stock
  pipelines encode the negative prompt with the images; their model cards use ``" "``), norm-rescaled over the
  generated tokens as Qwen-Image. The sigmas' dynamic shift counts the generated tokens only, as the stock.
* Batches: prompt lengths and image grids differ from sample to sample, so each sample's prompt embeddings and
  packed image latents are kept per sample (``cond["prompt_embeds"]``, ``cond["image_latents"]``) with their grids
  (``cond["image_shapes"]``); ``forward`` runs the samples whose grids agree together (the transformer's RoPE takes
  one grid per batch), their prompts zero-padded to the longest with a mask, as the stock pipeline pads a batch.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import ProcessorMixin, Qwen2VLProcessor

from flowrl.conditions import to_pil_image
from flowrl.errors import ConfigError
from flowrl.policy.adapter import Conditioning, register_adapter, register_component_loader
from flowrl.policy.qwen_image import QwenImageAdapter

#: diffusers' pipeline loader looks a component's base classes up by name in the module model_index.json names
#: (this one, for :class:`ImageQwen2VLProcessor`), hence ``ProcessorMixin`` here
__all__ = ["ImageQwen2VLProcessor", "ProcessorMixin", "QwenImageEditAdapter", "QwenImageEditPlusAdapter"]

#: the stock pipelines' VAE size of a condition image, in pixels (``calculate_dimensions(1024 * 1024, ...)``)
STOCK_VAE_IMAGE_AREA = 1024 * 1024
#: ``QwenImageEditPlusPipeline``'s VL-encoder size of a condition image (``CONDITION_IMAGE_SIZE``)
STOCK_VL_IMAGE_AREA = 384 * 384
#: condition image sides are rounded to multiples of this (``calculate_dimensions``)
SIDE_MULTIPLE = 32


def fit_area(width: int, height: int, area: int) -> tuple[int, int]:
    """``(width, height)`` of ``area`` pixels at the aspect ratio of ``width`` x ``height``, each side rounded to a
    multiple of 32, as the stock ``calculate_dimensions``."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return round(new_width / SIDE_MULTIPLE) * SIDE_MULTIPLE, round(new_height / SIDE_MULTIPLE) * SIDE_MULTIPLE


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor: transformers builds Qwen2-VL's video processor only with
    torchvision installed, and the edit pipelines give the VL encoder images only. Text and images are processed
    by the stock class's code (the image placeholder expanded to the image's vision tokens, Qwen2-VL's image
    processor). It saves and loads with ``save_pretrained`` / ``from_pretrained`` like the stock class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the stock __init__ hands (image_processor, tokenizer, video_processor) on to ProcessorMixin, which pairs
        # them with this signature's processor attributes: the absent video processor drops out there
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@register_component_loader("transformers", "Qwen2VLProcessor")
def _image_processor_without_torchvision(path: str, subfolder: str, revision: str | None):
    """The Qwen-Image-Edit checkpoints' ``processor`` (a stock ``Qwen2VLProcessor``, which transformers refuses to
    build without torchvision for its video part) as :class:`ImageQwen2VLProcessor` where torchvision is missing;
    None (the stock loader) where it is installed. flowrl does not require torchvision (a CPU torch has none
    matching it on every index), and the edit pipelines never give the processor a video."""
    if importlib.util.find_spec("torchvision") is not None:
        return None
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"[flowrl] torchvision is not installed: {subfolder} loads as {ImageQwen2VLProcessor.__name__} "
                   "(Qwen2VLProcessor without its video processor; the edit pipelines give it images only)")
    return ImageQwen2VLProcessor.from_pretrained(path, subfolder=subfolder, revision=revision)


@register_adapter("QwenImageEditPipeline")
class QwenImageEditAdapter(QwenImageAdapter):
    family_name = "Qwen-Image-Edit"
    #: the image to edit
    condition_images = (1, 1)
    #: the VL encoder's condition image area of the Plus pipeline (None: the VAE-size image, as Edit)
    vl_image_area: int | None = None

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        if max_sequence_length is not None:
            raise ConfigError(
                f"policy.max_sequence_length={max_sequence_length}: the Qwen-Image-Edit pipelines give the "
                "transformer the whole prompt with its image tokens (they never truncate it); remove it (null)"
            )
        super().__init__(pipeline)
        self.max_sequence_length = None  # nothing to pass to the stock call (export, sampling)

    # ------------------------------------------------------------------ condition images
    def vae_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` a condition image of ``width`` x ``height`` pixels is resized to for the VAE."""
        area = self.condition_image_area or STOCK_VAE_IMAGE_AREA
        return self._fitted(width, height, area, "crop it closer to square, or raise policy.condition_image_area")

    def vl_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of the image the VL encoder is given (before its processor's own resize)."""
        if self.vl_image_area is None:
            return self.vae_size(width, height)
        return self._fitted(width, height, self.vl_image_area, "crop it closer to square")

    @staticmethod
    def _fitted(width: int, height: int, area: int, fix: str) -> tuple[int, int]:
        size = fit_area(width, height, area)
        if min(size) == 0:
            raise ConfigError(f"a {width}x{height} condition image resized to {area} pixels at its aspect ratio has "
                              f"a side below {SIDE_MULTIPLE // 2} px, which rounds to 0; {fix}")
        return size

    def _prompt_images(self, images: list) -> list:
        """The PIL images of one sample as the VL encoder is given them."""
        processor = self.pipeline.image_processor
        return [processor.resize(im, *reversed(self.vl_size(*im.size))) for im in images]

    def _encode_text(self, prompt: str, prompt_images: list, device: torch.device) -> torch.Tensor:
        """The prompt's hidden states with its images, ``(L, D)``, as the stock ``encode_prompt``."""
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], image=prompt_images[0], device=device)
        return embeds[0]

    def _image_latents(self, images: list, device: torch.device) -> tuple[torch.Tensor, tuple]:
        """The packed, normalised VAE latents of one sample's images one after the other, ``(N, 4C)`` float32, and
        each image's token grid ``(1, h, w)``."""
        processor, vae = self.pipeline.image_processor, self.pipeline.vae
        tokens, grids = [], []
        for image in images:
            width, height = self.vae_size(*image.size)
            pixels = processor.preprocess(image, height, width).unsqueeze(2).to(device, vae.dtype)
            z = self.pipeline._encode_vae_image(pixels, generator=None)[:, :, 0].float()  # (1, C, h, w)
            tokens.append(self.pack(z)[0])
            grids.append((1, z.shape[-2] // 2, z.shape[-1] // 2))
        return torch.cat(tokens), tuple(grids)

    def encode_condition(self, prompts: Sequence[str], conditions: Sequence, height: int, width: int,
                         device: torch.device) -> Conditioning:
        embeds, latents, shapes = [], [], []
        for prompt, condition in zip(prompts, conditions):
            images = [to_pil_image(im) for im in condition]
            embeds.append(self._encode_text(prompt, self._prompt_images(images), device))
            tokens, grids = self._image_latents(images, device)
            latents.append(tokens)
            shapes.append(grids)
        return Conditioning({}, {"prompt_embeds": embeds, "image_latents": latents, "image_shapes": shapes})

    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        raise ConfigError(f"{self.family_name} edits condition images and was given none; give a prompt file whose "
                          'rows name them ({"prompt": ..., "images": ["a.png"]})')

    # ------------------------------------------------------------------ denoiser
    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        shapes = cond["image_shapes"]
        if len(set(shapes)) == 1:
            return self._forward_same_grids(denoiser, latents, sigma, cond)
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for grids in dict.fromkeys(shapes):  # in order of first appearance
            idx = [i for i, s in enumerate(shapes) if s == grids]
            out[idx] = self._forward_same_grids(denoiser, latents[idx], sigma[idx], cond.select(idx)).float()
        return out

    def _forward_same_grids(self, denoiser, latents, sigma, cond):
        param = next(denoiser.parameters())
        b, _, h, w = latents.shape
        embeds, mask = self._text_batch(cond["prompt_embeds"], latents.device)
        images = torch.stack(list(cond["image_latents"])).to(latents.device, param.dtype)
        generated = self.pack(latents).to(param.dtype)
        timesteps = sigma.float() * self.pipeline.scheduler.config.num_train_timesteps
        out = denoiser(
            hidden_states=torch.cat([generated, images], dim=1),
            timestep=timesteps.to(param.dtype) / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds.to(param.dtype),
            img_shapes=[[(1, h // 2, w // 2), *cond["image_shapes"][0]]] * b,
            return_dict=False,
        )[0]
        return self.unpack(out[:, : generated.shape[1]], h, w)

    @staticmethod
    def _text_batch(embeds: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample prompt embeddings as one batch, as the stock pipeline pads a batch: zeros after the shorter
        prompts and a mask of the real tokens, or no mask when all are as long."""
        lengths = [e.shape[0] for e in embeds]
        longest = max(lengths)
        batch = torch.stack([F.pad(e.to(device), (0, 0, 0, longest - e.shape[0])) for e in embeds])
        if min(lengths) == longest:
            return batch, None
        mask = (torch.arange(longest, device=device) < torch.tensor(lengths, device=device)[:, None]).long()
        return batch, mask


@register_adapter("QwenImageEditPlusPipeline")
class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    family_name = "Qwen-Image-Edit-Plus"
    #: one to three images: Qwen-Image-Edit-2509's multi-image editing takes up to three (the stock pipeline itself
    #: sets no limit)
    condition_images = (1, 3)
    vl_image_area = STOCK_VL_IMAGE_AREA

    def _encode_text(self, prompt: str, prompt_images: list, device: torch.device) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], image=prompt_images, device=device)
        return embeds[0]
