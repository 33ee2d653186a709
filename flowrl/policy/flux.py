"""FLUX.1 (dev and schnell): a 2x2-packed latent sequence, CLIP-L pooled + T5 token conditioning, RoPE
position ids, a guidance-distilled (dev) or guidance-free (schnell) transformer, a 16-channel VAE with shift.

flowrl's latents are the VAE's unpacked ``(B, C, H/f, W/f)`` tensor (``f = vae_scale_factor``), normalised as the
stock pipeline normalises them; ``forward`` packs them into the transformer's ``(B, H/2f * W/2f, 4C)`` sequence
and unpacks the prediction, with diffusers' own ``FluxPipeline._pack_latents`` / ``_unpack_latents``. Packing is
a permutation, so i.i.d. Gaussian noise in either layout is the same distribution, and the stock pipeline
started from ``_pack_latents(x)`` samples exactly what flowrl samples from ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    JOINT_ATTENTION_LORA_TARGETS,
    Conditioning,
    PackedLatentsAdapter,
    register_adapter,
    vae_decode_scaled,
    vae_encode_scaled,
)

#: FLUX's T5 context when neither ``policy.max_sequence_length`` nor the tokenizer says less (the stock default)
FLUX_MAX_SEQUENCE_LENGTH = 512

#: the stock pipeline's fallbacks for a scheduler config without the dynamic-shift keys (``calculate_shift``)
@register_adapter("FluxPipeline")
class FluxAdapter(PackedLatentsAdapter):
    """FLUX.1-dev (``transformer.config.guidance_embeds``: the guidance scale is an input, one pass per step) and
    FLUX.1-schnell (no guidance input: only ``guidance_scale: 1`` is accepted, see :meth:`check_guidance`)."""

    # The joint (double-stream) blocks' image and text projections; the single-stream blocks' attention has
    # to_q / to_k / to_v as well (peft matches "attn.to_q" in both kinds of block).
    family_name = "FLUX"
    honours_use_flow_sigmas = True
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS
    frozen_components = ("vae", "text_encoder", "text_encoder_2")
    #: both variants route the scale to ``forward``: dev embeds it, schnell refuses anything but 1
    guidance_mode = "distilled"

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        if max_sequence_length is None:
            tokenizer_limit = getattr(pipeline.tokenizer_2, "model_max_length", None) or FLUX_MAX_SEQUENCE_LENGTH
            self.max_sequence_length = min(FLUX_MAX_SEQUENCE_LENGTH, int(tokenizer_limit))
        elif max_sequence_length > FLUX_MAX_SEQUENCE_LENGTH:
            raise ConfigError(
                f"policy.max_sequence_length={max_sequence_length}: FLUX's T5 context is at most "
                f"{FLUX_MAX_SEQUENCE_LENGTH} tokens; set it to {FLUX_MAX_SEQUENCE_LENGTH} or less (null = the default)"
            )
        self._img_ids: dict = {}

    # ------------------------------------------------------------------ family facts
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def has_guidance_embedding(self) -> bool:
        """FLUX.1-dev's transformer takes the guidance scale as an input; FLUX.1-schnell's has no such input."""
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def check_guidance(self, scale: float | None) -> None:
        """Raise ``ConfigError`` for a guidance scale this model cannot use: FLUX.1-schnell (no guidance embedding)
        samples without guidance, so only 1 (or None) is accepted. ``forward`` checks it on every call; a trainer
        can call this once at construction for each scale it will use, to fail before any work."""
        if scale is None or self.has_guidance_embedding or float(scale) == 1.0:
            return
        raise ConfigError(
            f"guidance_scale={scale}: this FLUX model has no guidance embedding (transformer.config.guidance_embeds "
            "is false, as FLUX.1-schnell) and no unconditional branch, so it samples without guidance; set "
            "guidance_scale: 1 (and eval.guidance_scale / train_guidance_scale to 1 or null), or use a "
            "guidance-distilled model such as black-forest-labs/FLUX.1-dev"
        )

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=device,
            max_sequence_length=self.max_sequence_length,
        )
        # Position ids are integers (exact in any float dtype); float32 keeps RoPE as precise as it can be.
        return Conditioning({"prompt_embeds": embeds, "pooled_projections": pooled},
                            shared={"txt_ids": text_ids.to(torch.float32)})

    def image_ids(self, latent_height: int, latent_width: int, device: torch.device) -> torch.Tensor:
        """The RoPE position ids of the packed image tokens (``FluxPipeline._prepare_latent_image_ids``), cached:
        they depend on the resolution, which is not known when the prompts are encoded."""
        key = (latent_height, latent_width, str(device))
        if key not in self._img_ids:
            self._img_ids[key] = self.pipeline._prepare_latent_image_ids(
                1, latent_height // 2, latent_width // 2, device, torch.float32
            )
        return self._img_ids[key]

    # ------------------------------------------------------------------ denoiser
    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        _, _, h, w = latents.shape
        out = self.transformer_call(denoiser, self.pack(latents), sigma, cond, guidance, self.image_ids(h, w, latents.device))
        return self.unpack(out, h, w)

    def transformer_call(self, denoiser, hidden: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                         guidance: float | None, img_ids: torch.Tensor) -> torch.Tensor:
        """The transformer on the packed token sequence ``hidden`` with position ids ``img_ids``, as the stock
        pipeline calls it (FLUX.1-Kontext appends its condition image's tokens to ``hidden``)."""
        self.check_guidance(guidance)
        param = next(denoiser.parameters())
        if self.has_guidance_embedding:  # the stock pipeline passes the scale as float32, one per sample
            scale = 1.0 if guidance is None else float(guidance)
            guidance_input = torch.full((hidden.shape[0],), scale, dtype=torch.float32, device=hidden.device)
        else:
            guidance_input = None
        return denoiser(
            hidden_states=hidden.to(param.dtype),
            timestep=sigma.to(param.dtype),  # the transformer multiplies by 1000 itself (stock: t / 1000)
            guidance=guidance_input,
            pooled_projections=cond["pooled_projections"].to(param.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(param.dtype),
            txt_ids=cond["txt_ids"].to(hidden.device),
            img_ids=img_ids,
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode_scaled(self.pipeline.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_scaled(self.pipeline.vae, images)
