"""Stable Diffusion 3 / 3.5 (MMDiT transformer, CLIP-L + CLIP-G + optional T5, 16-channel VAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    JOINT_ATTENTION_LORA_TARGETS,
    Conditioning,
    ModelAdapter,
    register_adapter,
    scheduler_sigmas,
    vae_decode_scaled,
    vae_encode_scaled,
)


@register_adapter("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
class SD3Adapter(ModelAdapter):
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    frozen_components = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        # With no T5 encoder loaded the T5 slot is left empty (0 tokens) instead of diffusers' 256 zero
        # tokens; set max_sequence_length to reproduce the padding of a model trained that way.
        if max_sequence_length is None:
            self.max_sequence_length = 256 if pipeline.text_encoder_3 is not None else 0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": embeds, "pooled_projections": pooled})

    def check_resolution(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * self.pipeline.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ConfigError(f"resolution {height}x{width} is not a multiple of {multiple} (VAE factor x patch size)")
        limit = self.pipeline.transformer.config.pos_embed_max_size * multiple
        if height > limit or width > limit:
            raise ConfigError(f"resolution {height}x{width} exceeds this transformer's positional table ({limit} px)")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // f, width // f)

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        param = next(denoiser.parameters())
        return denoiser(
            hidden_states=latents.to(param.dtype),
            timestep=(sigma * 1000).to(param.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode_scaled(self.pipeline.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_scaled(self.pipeline.vae, images)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        f = self.vae_scale_factor * self.pipeline.transformer.config.patch_size
        return scheduler_sigmas(self.pipeline.scheduler, num_inference_steps, (height // f) * (width // f))
