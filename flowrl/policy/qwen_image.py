"""Qwen-Image (``QwenImagePipeline``: a 60-block MMDiT on 2x2-packed latents, the Qwen2.5-VL text encoder, the
Wan-style 3-D VAE), as the stock diffusers pipeline runs it.

* Latents: flowrl keeps the VAE's image latent ``(B, C, H/f, W/f)`` (the stock ``(B, C, 1, H/f, W/f)`` without its
  frame axis of 1); ``forward`` packs it into the transformer's ``(B, H/2f * W/2f, 4C)`` sequence with the stock
  ``QwenImagePipeline._pack_latents`` and unpacks the prediction. Packing is a permutation, so the stock pipeline
  started from ``pack(x)`` samples exactly what flowrl samples from ``x``.
* Prompts: ``QwenImagePipeline.encode_prompt`` (the chat prompt template, the first
  ``prompt_template_encode_start_idx`` template tokens dropped, truncated to ``max_sequence_length``, default 512 as
  ``__call__``). Its embeddings are as long as the longest prompt of the batch, so they are zero-padded here to
  ``max_sequence_length`` with the ``prompt_embeds_mask`` marking real tokens, and the real lengths are kept per
  sample (``txt_seq_lens``): any selection or concatenation of samples (the CFG batch ``[negative, prompt]``) stays
  one tensor. ``forward`` cuts the padding back to the longest prompt of its batch and passes the mask only when
  some prompt is shorter, as the stock pipeline does (text RoPE positions do not depend on the padding).
* ``img_shapes`` (the image RoPE grid, ``[(1, H/2f, W/2f)]`` per sample) follows from the latents' size, so
  ``forward`` builds it for each call (training and evaluation resolutions may differ) instead of storing it.
* Timestep: as ``__call__`` passes it, ``timesteps[i] / 1000`` with ``timesteps = sigmas * num_train_timesteps``.
* Guidance: true CFG against the negative prompt ``" "`` (the stock pipeline enables true CFG only with a negative
  prompt; ``" "`` is the one its documentation and Flow-GRPO use), combined with Qwen-Image's norm rescale: the
  guided velocity of every packed token is rescaled to the norm of the conditional one (:meth:`combine_guidance`).
* Sigmas: ``linspace(1, 1/N, N)`` with the dynamic shift of the packed image token count, exactly as ``__call__``
  (Qwen-Image's scheduler: exponential shift between 256 and 8192 tokens, ``shift_terminal`` 0.02), then 0.
* ``decode`` undoes the VAE's ``latents_mean`` / ``latents_std`` normalisation as the stock pipeline does and
  returns images ``(B, C, H, W)`` in [0, 1] (the frame axis of 1 dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    JOINT_ATTENTION_LORA_TARGETS,
    Conditioning,
    PackedLatentsAdapter,
    register_adapter,
    vae_latent_stats,
)

#: ``QwenImagePipeline.__call__``'s text length (``encode_prompt`` alone would keep 1024)
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the most text tokens the stock pipeline accepts (``check_inputs``)
MAX_SEQUENCE_LENGTH_LIMIT = 1024


@register_adapter("QwenImagePipeline")
class QwenImageAdapter(PackedLatentsAdapter):
    # Flow-GRPO's Qwen-Image LoRA targets: the joint attention's image and text projections and both MLPs
    family_name = "Qwen-Image"
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS + (
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )
    frozen_components = ("vae", "text_encoder")
    guidance_mode = "cfg"
    negative_prompt = " "

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        if self.max_sequence_length is None:
            self.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
        elif self.max_sequence_length > MAX_SEQUENCE_LENGTH_LIMIT:
            raise ConfigError(
                f"policy.max_sequence_length={max_sequence_length}: Qwen-Image takes at most "
                f"{MAX_SEQUENCE_LENGTH_LIMIT} text tokens; set it to {MAX_SEQUENCE_LENGTH_LIMIT} or less "
                f"(null = {DEFAULT_MAX_SEQUENCE_LENGTH}, the stock pipeline's default)"
            )
        if pipeline.transformer.config.get("guidance_embeds", False):
            raise ConfigError(
                "this QwenImageTransformer2DModel has guidance_embeds=true (a guidance-distilled variant), which "
                "flowrl does not support; use a true-CFG Qwen-Image model such as Qwen/Qwen-Image"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def vae_scale_factor(self) -> int:
        """The VAE's spatial factor, as the stock pipeline computes it (``2 ** len(temperal_downsample)``)."""
        return int(self.pipeline.vae_scale_factor)

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        length = self.max_sequence_length
        embeds, mask = self.pipeline.encode_prompt(prompt=list(prompts), device=device, max_sequence_length=length)
        b, n, _ = embeds.shape
        if mask is None:  # the stock pipeline drops an all-ones mask
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        lengths = [int(v) for v in mask.sum(dim=1).tolist()]
        embeds = F.pad(embeds, (0, 0, 0, length - n))  # zeros, as the stock pipeline pads within a batch
        mask = F.pad(mask, (0, length - n))
        return Conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, {"txt_seq_lens": lengths})

    def text_inputs(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt embeddings and mask of ``cond`` as the stock pipeline passes them for such a batch: padded to
        its longest prompt, the mask ``None`` when no prompt is shorter."""
        lengths = cond["txt_seq_lens"]
        longest = max(lengths)
        embeds = cond["prompt_embeds"][:, :longest]
        mask = None if min(lengths) == longest else cond["prompt_embeds_mask"][:, :longest]
        return embeds, mask

    # ------------------------------------------------------------------ packing
    def unpack(self, packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        return super().unpack(packed, latent_height, latent_width)[:, :, 0]  # its VAE's frame axis of 1

    # ------------------------------------------------------------------ denoiser
    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        param = next(denoiser.parameters())
        b, _, h, w = latents.shape
        embeds, mask = self.text_inputs(cond)
        # __call__: timestep = scheduler.timesteps[i] (= sigma * num_train_timesteps) in the latents' dtype, / 1000
        timesteps = sigma.float() * self.pipeline.scheduler.config.num_train_timesteps
        out = denoiser(
            hidden_states=self.pack(latents).to(param.dtype),
            timestep=timesteps.to(param.dtype) / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds.to(param.dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """True CFG with Qwen-Image's norm rescale, as ``QwenImagePipeline.__call__``: ``g = u + s (c - u)``, then
        every packed token (its ``4C`` values: C channels of a 2x2 latent patch) of ``g`` rescaled to the norm of
        the same token of ``c``."""
        h, w = v_cond.shape[-2:]
        u, c = self.pack(v_uncond), self.pack(v_cond)
        combined = u + scale * (c - u)
        cond_norm = torch.norm(c, dim=-1, keepdim=True)
        noise_norm = torch.norm(combined, dim=-1, keepdim=True)
        return self.unpack(combined * (cond_norm / noise_norm), h, w)

    # ------------------------------------------------------------------ VAE
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_latent_stats(self.pipeline.vae.config, like)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = latents.to(vae.dtype).unsqueeze(2)  # the frame axis of 1
        mean, inv_std = self._latent_stats(z)
        images = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = vae.encode((images * 2 - 1).to(vae.dtype).unsqueeze(2)).latent_dist.sample()
        mean, inv_std = self._latent_stats(z)
        return ((z - mean) * inv_std)[:, :, 0].float()
