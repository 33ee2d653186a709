"""Wan2.1 text-to-video (``WanPipeline``: a 3-D DiT with 1x2x2 patches, the UMT5 text encoder, the causal video
VAE ``AutoencoderKLWan``), as the stock diffusers pipeline runs it.

* Latents are 5-D ``(B, C, T', H', W')`` with ``T' = (num_frames - 1) // vae_scale_factor_temporal + 1``; the number
  of frames is ``policy.num_frames`` (default 81, Wan's), which must be ``1 + k * vae_scale_factor_temporal``.
* Prompts go through ``WanPipeline.encode_prompt`` (UMT5, padded to ``max_sequence_length`` tokens with zeroed
  padding; default 512, as ``WanPipeline.__call__``); guidance is true CFG against the negative prompt (the pipeline's default "").
* The denoiser's timestep is what the stock pipeline passes: the scheduler's ``timesteps`` entry of the sigma,
  ``sigma * num_train_timesteps``: float for a flow-matching Euler scheduler, the scheduler's integer values for
  the hub checkpoints' ``UniPCMultistepScheduler`` (a sigma of the sampled schedule maps to its exact timestep,
  any other sigma, e.g. a re-noising time of NFT/AWM, to ``floor(sigma * num_train_timesteps)`` as the scheduler
  rounds). Sigmas are the scheduler's own (``scheduler_sigmas``); flowrl steps them with its Euler/SDE dynamics,
  so with UniPC the schedule is UniPC's but the solver is flowrl's (as Flow-GRPO's Wan training does).
* ``decode`` undoes the VAE's ``latents_mean`` / ``latents_std`` normalisation exactly as ``WanPipeline`` does and
  returns videos ``(B, T, C, H, W)`` in [0, 1].

Wan2.2 A14B's two-expert pipelines (a ``transformer_2``) are :class:`flowrl.policy.wan22.Wan22Adapter`'s; a
``boundary_ratio`` without a ``transformer_2`` is refused (the stock pipeline would call a missing expert). Wan2.2
TI2V's per-token timesteps (``expand_timesteps``) are passed as the stock pipeline passes them for text-to-video.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    Conditioning,
    ModelAdapter,
    register_adapter,
    scheduler_sigmas,
    vae_latent_stats,
)

#: Wan's frame count (5 s at 16 fps) when ``policy.num_frames`` is null
DEFAULT_NUM_FRAMES = 81
#: ``WanPipeline.__call__``'s text length (Wan's ``text_len``; ``encode_prompt`` alone would default to 226)
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def _nearest_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    high = low + multiple if low < value else low
    return str(low) if low == high else f"{low} or {high}"


@register_adapter("WanPipeline")
class WanAdapter(ModelAdapter):
    # self-attention (attn1) and text cross-attention (attn2) projections of every block
    default_lora_targets = (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    )
    frozen_components = ("vae", "text_encoder")
    guidance_mode = "cfg"
    negative_prompt = ""
    is_video = True

    def __init__(self, pipeline, max_sequence_length: int | None = None, num_frames: int | None = None):
        super().__init__(pipeline, max_sequence_length, num_frames)
        if pipeline.config.get("boundary_ratio") is not None and getattr(pipeline, "transformer_2", None) is None:
            raise ConfigError(
                f"this WanPipeline has boundary_ratio={pipeline.config.boundary_ratio} but no transformer_2 (Wan2.2 "
                "A14B's low-noise expert); load the model with both experts, or set boundary_ratio to null for one"
            )
        if self.max_sequence_length is None:
            self.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
        if self.num_frames is None:
            self.num_frames = DEFAULT_NUM_FRAMES
        self.check_num_frames(self.num_frames)
        # sigma (as float32) -> the scheduler's timestep, for schedulers with integer timesteps (UniPC)
        self._timestep_of: dict[float, int] = {}
        scheduler_sigmas(pipeline.scheduler, 2, 1)
        self._integer_timesteps = not torch.is_floating_point(pipeline.scheduler.timesteps)

    # ------------------------------------------------------------------ sizes
    @property
    def temporal_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_temporal)

    @property
    def spatial_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.pipeline.transformer.config.patch_size)

    def num_latent_frames(self, num_frames: int | None = None) -> int:
        return (int(num_frames or self.num_frames) - 1) // self.temporal_factor + 1

    def check_num_frames(self, num_frames) -> None:
        """The causal VAE makes ``1 + k * vae_scale_factor_temporal`` frames (Wan: 1, 5, ..., 33, ..., 81)."""
        f = self.temporal_factor
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % f:
            n = num_frames if isinstance(num_frames, (int, float)) and not isinstance(num_frames, bool) else 1
            low = max(1, int(math.floor((n - 1) / f)) * f + 1)
            high = low + f
            raise ConfigError(
                f"policy.num_frames={num_frames!r}: this Wan VAE makes videos of 1 + {f} * k frames (temporal factor "
                f"{f}); use {low} or {high}"
            )
        t_patch = self.patch_size[0]
        latent_frames = self.num_latent_frames(num_frames)
        if latent_frames % t_patch:
            raise ConfigError(f"policy.num_frames={num_frames} gives {latent_frames} latent frames, not a multiple "
                              f"of the transformer's temporal patch size {t_patch}")
        limit = self.pipeline.transformer.config.rope_max_seq_len
        if latent_frames // t_patch > limit:
            raise ConfigError(f"policy.num_frames={num_frames} gives {latent_frames // t_patch} frame positions, more "
                              f"than this transformer's rotary table ({limit}); use fewer frames")

    def check_resolution(self, height: int, width: int) -> None:
        s, (_, p_h, p_w) = self.spatial_factor, self.patch_size
        mh, mw = s * p_h, s * p_w
        if height % mh or width % mw:
            raise ConfigError(
                f"resolution {height}x{width}: Wan needs the height a multiple of {mh} and the width a multiple of "
                f"{mw} (VAE factor {s} x patch size {p_h}x{p_w}); use height {_nearest_multiples(height, mh)} and "
                f"width {_nearest_multiples(width, mw)}"
            )
        limit = self.pipeline.transformer.config.rope_max_seq_len
        if height // mh > limit or width // mw > limit:
            raise ConfigError(f"resolution {height}x{width} exceeds this transformer's rotary table "
                              f"({limit} patches = {limit * mh}x{limit * mw} px)")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.spatial_factor
        return (self.pipeline.transformer.config.in_channels, self.num_latent_frames(), height // s, width // s)

    # ------------------------------------------------------------------ model calls
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=device,
        )
        return Conditioning({"prompt_embeds": embeds})

    def timestep(self, sigma: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's timestep input for noise levels ``sigma`` (B,), as ``WanPipeline`` passes it."""
        n = self.pipeline.scheduler.config.num_train_timesteps
        if self._integer_timesteps:
            values = [self._timestep_of.get(s, math.floor(s * n)) for s in sigma.float().tolist()]
            t = torch.tensor(values, dtype=torch.int64, device=sigma.device)
        else:
            t = sigma.float() * n  # float32, as FlowMatchEulerDiscreteScheduler computes its timesteps
        if self.pipeline.config.get("expand_timesteps", False) and latents is not None:
            # Wan2.2 TI2V: one timestep per token (all equal for text-to-video)
            p_t, p_h, p_w = self.patch_size
            tokens = (latents.shape[2] // p_t) * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
            t = t[:, None].expand(-1, tokens)
        return t

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        return denoiser(
            hidden_states=latents.to(dtype),
            timestep=self.timestep(sigma, latents),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_latent_stats(self.pipeline.vae.config, like)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        z = latents.to(vae.dtype)
        mean, inv_std = self._latent_stats(z)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, C, T, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, T, C, H, W)`` (or images ``(B, C, H, W)``, one frame) in [0, 1] to normalised latents: the
        posterior mode, normalised as ``WanVideoToVideoPipeline`` does."""
        vae = self.pipeline.vae
        video = images.unsqueeze(1) if images.ndim == 4 else images
        x = (video * 2 - 1).permute(0, 2, 1, 3, 4).to(vae.dtype)
        z = vae.encode(x).latent_dist.mode()
        mean, inv_std = self._latent_stats(z)
        return ((z - mean) * inv_std).float()

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        s, (p_t, p_h, p_w) = self.spatial_factor, self.patch_size
        seq_len = (self.num_latent_frames() // p_t) * (height // s // p_h) * (width // s // p_w)
        scheduler = self.pipeline.scheduler
        sigmas = scheduler_sigmas(scheduler, num_inference_steps, seq_len)
        if self._integer_timesteps:
            for sig, t in zip(sigmas[:-1].tolist(), scheduler.timesteps.tolist()):
                self._timestep_of[sig] = int(t)
        return sigmas
