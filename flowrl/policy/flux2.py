"""FLUX.2, text-to-image: FLUX.2-dev (``Flux2Pipeline``: a Mistral Small 3.1 text encoder, a guidance-distilled 32B
transformer) and FLUX.2-klein (``Flux2KleinPipeline``: a Qwen3 text encoder; the base models take true CFG, the
step-distilled ones no guidance), as diffusers 0.42's ``__call__`` runs them. Reference images (both pipelines'
``image=``) are not supported yet.

* Latents: flowrl keeps the transformer's latent grid ``(B, C, H/2f, W/2f)``: the VAE's ``(B, C/4, H/f, W/f)``
  latent patchified 2x2 (``C`` = ``transformer.config.in_channels``, 128 for the real models) and normalised by the
  VAE's batch-norm statistics, which is what the stock pipeline draws its noise in. ``forward`` flattens it into the
  transformer's ``(B, H/2f * W/2f, C)`` token sequence with the stock ``_pack_latents`` (a permutation) and back.
* Prompts: the stock ``encode_prompt`` (dev: the system message and the prompt in Mistral's chat format; klein:
  Qwen3's chat format without thinking), padded to ``max_sequence_length`` tokens (default 512 as ``__call__``, or
  the tokenizer's ``model_max_length`` where smaller; the stock pipeline passes no attention mask to the
  transformer), three intermediate hidden states stacked. The text position ids are the same for every prompt of
  that length and kept once (``txt_ids``, shared). A length the chat template alone fills is refused.
* Timestep: ``timesteps[i] / 1000`` with ``timesteps = sigmas * num_train_timesteps``, as ``__call__`` passes it.
* Guidance, as ``__call__`` does it: dev embeds ``guidance_scale`` (the transformer's guidance input, one pass:
  ``guidance_mode`` "distilled"); klein base runs true CFG against the empty prompt when the scale is above 1
  (``guidance_mode`` "cfg"); a step-distilled klein (``is_distilled`` in its pipeline config) ignores the scale, so
  flowrl refuses any but 1 there instead of training with a guidance that does nothing (:meth:`check_guidance`).
* Sigmas: ``linspace(1, 1/N, N)`` shifted by FLUX.2's empirical ``mu`` of the image token count *and* the step count
  (``compute_empirical_mu``, the stock function), then 0.
* ``decode`` undoes the batch norm and the patchification as the stock pipeline does before its VAE decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    JOINT_ATTENTION_LORA_TARGETS,
    Conditioning,
    PackedLatentsAdapter,
    register_adapter,
)

#: ``__call__``'s text length: prompts are padded (and truncated) to this many tokens
DEFAULT_MAX_SEQUENCE_LENGTH = 512


@register_adapter("Flux2Pipeline", "Flux2KleinPipeline")
class Flux2Adapter(PackedLatentsAdapter):
    # Flow-Factory's FLUX.2 targets: the double-stream blocks' attention (image and text projections) and both MLPs,
    # and the single-stream blocks' fused QKV + MLP input projection (their fused output projection, ``attn.to_out``,
    # shares its name with the double-stream blocks' ModuleList and cannot be targeted by that suffix).
    family_name = "FLUX.2"
    default_lora_targets = JOINT_ATTENTION_LORA_TARGETS + (
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    )
    frozen_components = ("vae", "text_encoder")
    negative_prompt = ""  # klein's unconditional branch: the empty prompt, as its __call__

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        #: FLUX.2-klein (Qwen3 text encoder, no guidance input) rather than FLUX.2-dev
        self.is_klein = type(pipeline).__name__ == "Flux2KleinPipeline"
        #: true CFG (klein base); otherwise the scale goes to ``forward``, one pass per step
        self.true_cfg = self.is_klein and not pipeline.config.get("is_distilled", False)
        self.guidance_mode = "cfg" if self.true_cfg else "distilled"
        #: the transformer embeds the guidance scale (FLUX.2-dev; klein's pipeline never passes one)
        self.embeds_guidance = not self.is_klein and bool(pipeline.transformer.config.guidance_embeds)
        if self.max_sequence_length is None:
            tokenizer = getattr(pipeline.tokenizer, "tokenizer", pipeline.tokenizer)  # dev's is a processor
            limit = getattr(tokenizer, "model_max_length", None) or DEFAULT_MAX_SEQUENCE_LENGTH
            self.max_sequence_length = min(DEFAULT_MAX_SEQUENCE_LENGTH, int(limit))
        template = self.template_length()
        if self.max_sequence_length <= template:
            raise ConfigError(
                f"policy.max_sequence_length={self.max_sequence_length}: FLUX.2's chat template alone takes {template} "
                "tokens, so every prompt would be cut away; set it to at least "
                f"{template + 32} (null = {DEFAULT_MAX_SEQUENCE_LENGTH}, the stock pipeline's default)"
            )
        self._img_ids: dict = {}

    # ------------------------------------------------------------------ family facts
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def template_length(self) -> int:
        """Tokens the chat template puts around an empty prompt (dev: with the system message), as the stock
        encoder tokenises it."""
        tokenizer = self.pipeline.tokenizer
        if self.is_klein:
            text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
            return len(tokenizer(text)["input_ids"])
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[""], system_message=self.pipeline.system_message)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
        return len(ids["input_ids"][0])

    def check_guidance(self, scale: float | None) -> None:
        """Raise ``ConfigError`` for a guidance scale this model would ignore: a step-distilled FLUX.2-klein (and a
        FLUX.2-dev-style transformer without guidance embedding) samples without guidance, so only 1 (or None) is
        accepted. ``forward`` checks it on every call; trainers call it once at construction."""
        if scale is None or self.true_cfg or self.embeds_guidance or float(scale) == 1.0:
            return
        raise ConfigError(
            f"guidance_scale={scale}: this FLUX.2 model takes no guidance (a step-distilled FLUX.2-klein, or a "
            "transformer without guidance embedding), and the stock pipeline ignores the scale; set guidance_scale: 1 "
            "(and eval.guidance_scale / train_guidance_scale to 1 or null), or use a base model such as "
            "black-forest-labs/FLUX.2-klein-base-9B (true CFG) or black-forest-labs/FLUX.2-dev"
        )

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, text_ids = self.pipeline.encode_prompt(prompt=list(prompts), device=device,
                                                       max_sequence_length=self.max_sequence_length)
        # every prompt is padded to max_sequence_length: one set of (integer) position ids serves them all
        return Conditioning({"prompt_embeds": embeds}, shared={"txt_ids": text_ids[0]})

    def image_ids(self, latent_height: int, latent_width: int, device: torch.device) -> torch.Tensor:
        """The position ids of the image tokens (``_prepare_latent_ids``), cached per resolution."""
        key = (latent_height, latent_width, str(device))
        if key not in self._img_ids:
            grid = torch.empty(1, 1, latent_height, latent_width)
            self._img_ids[key] = self.pipeline._prepare_latent_ids(grid)[0].to(device)
        return self._img_ids[key]

    # ------------------------------------------------------------------ latents
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2
        return (self.pipeline.transformer.config.in_channels // 4 * 4, height // f, width // f)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> the transformer's ``(B, h * w, C)`` (row-major tokens, as the position ids)."""
        return self.pipeline._pack_latents(latents)

    def unpack(self, packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """The inverse of :meth:`pack` (the stock ``_unpack_latents_with_ids`` scatters to the same places)."""
        b, _, c = packed.shape
        return packed.permute(0, 2, 1).reshape(b, c, latent_height, latent_width)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        scheduler, n = self.pipeline.scheduler, num_inference_steps
        _, h, w = self.latent_shape(height, width)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=n)
        if scheduler.config.get("use_flow_sigmas", False):  # __call__ lets such a scheduler choose its sigmas
            scheduler.set_timesteps(n, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ------------------------------------------------------------------ denoiser
    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        self.check_guidance(guidance)
        param = next(denoiser.parameters())
        b, _, h, w = latents.shape
        guidance_input = None
        if self.embeds_guidance:  # the stock pipeline passes the scale as float32, one per sample
            scale = 1.0 if guidance is None else float(guidance)
            guidance_input = torch.full((b,), scale, dtype=torch.float32, device=latents.device)
        # __call__: timestep = scheduler.timesteps[i] (= sigma * num_train_timesteps) in the latents' dtype, / 1000
        timesteps = sigma.float() * self.pipeline.scheduler.config.num_train_timesteps
        out = denoiser(
            hidden_states=self.pack(latents).to(param.dtype),
            timestep=timesteps.to(param.dtype) / 1000,
            guidance=guidance_input,
            encoder_hidden_states=cond["prompt_embeds"].to(param.dtype),
            txt_ids=cond["txt_ids"].to(latents.device),
            img_ids=self.image_ids(h, w, latents.device),
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    # ------------------------------------------------------------------ VAE
    def _bn_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent batch-norm mean and standard deviation, float32, shaped ``(1, C, 1, 1)``."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        mean, std = (t.to(latents.device) for t in self._bn_stats())
        z = self.pipeline._unpatchify_latents(latents.float() * std + mean)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to flowrl's latents, as the stock pipeline encodes reference images (the posterior's
        mode, patchified, normalised)."""
        vae = self.pipeline.vae
        z = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mode()
        mean, std = (t.to(z.device) for t in self._bn_stats())
        return (self.pipeline._patchify_latents(z.float()) - mean) / std
