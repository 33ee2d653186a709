"""Wan image-to-video (``WanImageToVideoPipeline``): Wan2.1 I2V and Wan2.2 TI2V-5B, as the stock diffusers pipeline
runs them; everything else (text encoding, sizes, sigmas and timesteps, decoding) is the text-to-video
:class:`flowrl.policy.wan.WanAdapter`'s.

Each sample has one condition image, resized to the video's size (``resolution``) as ``WanImageToVideoPipeline``
resizes it (its ``video_processor``, Lanczos, from the 8-bit image) and encoded with the VAE's posterior mode (the
stock ``sample_mode="argmax"``: deterministic), normalised by the VAE's ``latents_mean`` / ``latents_std``. Both
CFG branches see the same image, as in the stock pipeline (only the text differs). The two layouts:

* **Wan2.1 I2V** (``expand_timesteps`` false): the condition is the VAE latents of the image followed by
  ``num_frames - 1`` black frames, preceded channel-wise by a mask of ``vae_scale_factor_temporal`` channels (1 on the
  first latent frame, 0 after); the transformer reads ``cat([latents, condition], dim=1)`` and, where its config has an
  ``image_dim``, cross-attends to the CLIP image encoder's penultimate hidden states of the image
  (``encoder_hidden_states_image``). Every latent frame is generated: the policy's latents, noise, SDE steps and
  log-probs are the whole video's, as for text-to-video.
* **Wan2.2 TI2V-5B** (``expand_timesteps`` true; diffusers 0.42 runs its image-to-video in
  ``WanImageToVideoPipeline``, while the hub folder's ``model_index.json`` names ``WanPipeline``: load it with
  ``policy.pipeline_class: WanImageToVideoPipeline``): the first latent frame *is* the image's latents (the image
  alone, one frame, through the causal VAE) and its tokens get timestep 0; the others are noised and denoised. The
  stock pipeline keeps a noise tensor for the first frame too, but overwrites it with the image's latents before every
  transformer call and before decoding, so its values never reach the output.

  **The rule flowrl follows** (TI2V): the condition frame is conditioning, not an action. The policy's latents are the
  *generated* latent frames only, ``(C, T' - 1, H', W')`` (:meth:`latent_shape`); ``forward`` puts the condition
  latents in front (timestep 0 on their tokens) and returns the velocity of the generated frames. So the starting
  noise, every SDE step's noise, the log-probabilities (a mean over the generated frames' elements), the PPO ratios,
  the NFT/AWM re-noised targets and the KL terms cover exactly what the model generates; the given frame is never
  noised, never scored and cannot move a ratio. The stock pipeline started from ``cat([anything, x])`` samples what
  flowrl samples from ``x`` (its first frame is overwritten, the Euler update is elementwise). ``decode`` needs the
  samples' conditioning to put the frame back (:meth:`decode_conditioned`; the sampler passes it), and returns the
  whole video, first frame included, as the stock pipeline's output.

Text goes through UMT5 exactly as ``WanImageToVideoPipeline.encode_prompt`` (same tokenisation, padding and
cleaning), but with ``WanPipeline``'s copy of that code: the image-to-video copy calls ``ftfy`` without checking that
it is installed (``WanPipeline``'s checks; with ftfy installed the two are the same code).

Not supported: Wan2.2 I2V-A14B (two experts, refused by name), first-last-frame generation (``last_image``), and
``policy.condition_image_area`` (the image is always resized to the video's size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowrl.conditions import to_pil_image
from flowrl.errors import ConfigError
from flowrl.policy.adapter import Conditioning, register_adapter
from flowrl.policy.wan import WanAdapter

#: the image-to-video models this adapter trains, for messages
SUPPORTED = ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (or 720P) and Wan-AI/Wan2.2-TI2V-5B-Diffusers "
             "(with policy.pipeline_class: WanImageToVideoPipeline)")
#: ``WanImageToVideoPipeline.check_inputs``: the video's height and width
STOCK_MULTIPLE = 16


@register_adapter("WanImageToVideoPipeline")
class WanI2VAdapter(WanAdapter):
    frozen_components = ("vae", "text_encoder", "image_encoder")
    condition_images = (1, 1)

    def __init__(self, pipeline, max_sequence_length: int | None = None, num_frames: int | None = None):
        if (getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None
                or getattr(pipeline, "transformer", None) is None):
            raise ConfigError("this WanImageToVideoPipeline has two experts (transformer_2 / boundary_ratio: Wan2.2 "
                              f"I2V-A14B), which flowrl does not train for image-to-video; use {SUPPORTED}")
        #: Wan2.2 TI2V: the first latent frame is given (the image's latents), not generated
        self.first_frame_given = bool(pipeline.config.get("expand_timesteps", False))
        super().__init__(pipeline, max_sequence_length, num_frames)
        config, z_dim = pipeline.transformer.config, pipeline.vae.config.z_dim
        # TI2V: the latents alone; Wan2.1 I2V: noisy latents, first-frame mask and condition latents, channel-wise
        expected = z_dim if self.first_frame_given else 2 * z_dim + self.temporal_factor
        if config.image_dim is not None and (pipeline.image_encoder is None or pipeline.image_processor is None):
            raise ConfigError("this Wan I2V transformer reads CLIP image features (image_dim), but the pipeline has "
                              "no image_encoder / image_processor; load the whole model folder")
        if config.in_channels != expected or config.out_channels != z_dim:
            raise ConfigError(f"transformer in/out channels {config.in_channels}/{config.out_channels} are not an "
                              f"image-to-video layout for this {z_dim}-channel VAE (expected {expected}/{z_dim}); "
                              f"use {SUPPORTED}")

    # ------------------------------------------------------------------ options
    @property
    def condition_image_area(self) -> None:
        return None

    @condition_image_area.setter
    def condition_image_area(self, value) -> None:
        if value is not None:
            raise ConfigError(f"policy.condition_image_area={value}: Wan image-to-video resizes the image to the "
                              "video's size (resolution); remove condition_image_area (null)")

    # ------------------------------------------------------------------ sizes
    def check_num_frames(self, num_frames) -> None:
        super().check_num_frames(num_frames)
        if self.first_frame_given and self.num_latent_frames(num_frames) < 2:
            f = self.temporal_factor
            raise ConfigError(f"policy.num_frames={num_frames}: Wan2.2 TI2V takes the first latent frame from the "
                              f"image, so one frame leaves nothing to generate; use {1 + f} or more (1 + {f} * k)")

    def check_resolution(self, height: int, width: int) -> None:
        super().check_resolution(height, width)
        if height % STOCK_MULTIPLE or width % STOCK_MULTIPLE:
            low_h, low_w = (max(STOCK_MULTIPLE, v // STOCK_MULTIPLE * STOCK_MULTIPLE) for v in (height, width))
            raise ConfigError(f"resolution {height}x{width}: WanImageToVideoPipeline needs height and width that are "
                              f"multiples of {STOCK_MULTIPLE}; use e.g. [{low_h}, {low_w}]")

    def generated_latent_frames(self) -> int:
        """Latent frames the policy generates: all of them, or all but the given first one (TI2V)."""
        return self.num_latent_frames() - int(self.first_frame_given)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.spatial_factor
        return (self.pipeline.vae.config.z_dim, self.generated_latent_frames(), height // s, width // s)

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        """UMT5 embeddings as the stock call computes them (``WanPipeline``'s copy of the code, see the module doc)."""
        from diffusers import WanPipeline

        embeds = WanPipeline._get_t5_prompt_embeds(self.pipeline, prompt=list(prompts),
                                                   max_sequence_length=self.max_sequence_length, device=device)
        return Conditioning({"prompt_embeds": embeds})

    def encode_condition(self, prompts: Sequence[str], conditions: Sequence, height: int, width: int,
                         device: torch.device) -> Conditioning:
        """The prompts' text embeddings and their images' conditioning: ``first_latent`` (TI2V) or
        ``image_condition`` (mask + latents), and the CLIP ``image_embeds`` where the transformer reads them
        (Wan2.1 I2V)."""
        cond = self.encode_prompt(prompts, device)
        parts = [self._encode_image(c[0], height, width, device) for c in conditions]
        for key in parts[0]:
            cond.tensors[key] = torch.cat([p[key] for p in parts])
        return cond

    def _encode_image(self, image: torch.Tensor, height: int, width: int, device: torch.device) -> dict:
        """One image's conditioning tensors, as ``WanImageToVideoPipeline.__call__`` / ``prepare_latents`` make them."""
        pipe = self.pipeline
        pil = to_pil_image(image)  # what the stock pipeline is given (exact for 8-bit images)
        pixels = pipe.video_processor.preprocess(pil, height=height, width=width).to(device, torch.float32)
        video = pixels.unsqueeze(2)  # (1, 3, 1, H, W) in [-1, 1]
        if not self.first_frame_given:  # the image, then black frames to the video's length
            video = torch.cat([video, video.new_zeros(1, 3, self.num_frames - 1, height, width)], dim=2)
        z = pipe.vae.encode(video.to(pipe.vae.dtype)).latent_dist.mode().to(device, torch.float32)
        mean, inv_std = self._latent_stats(z)
        z = (z - mean) * inv_std
        if self.first_frame_given:
            out = {"first_latent": z}
        else:
            mask = torch.zeros(1, self.temporal_factor, *z.shape[2:], dtype=torch.float32, device=device)
            mask[:, :, 0] = 1  # the given (first) frame
            out = {"image_condition": torch.cat([mask, z], dim=1)}
        if pipe.transformer.config.image_dim is not None:  # as the stock call: wherever the transformer reads them
            out["image_embeds"] = pipe.encode_image(pil, device)
        return out

    # ------------------------------------------------------------------ model calls
    def token_timesteps(self, t: torch.Tensor, latent_frames: int, latent_height: int,
                        latent_width: int) -> torch.Tensor:
        """TI2V's per-token timesteps ``(B, tokens)``: 0 on the first frame's tokens, ``t`` on every other token, as the
        stock ``first_frame_mask * t`` (float32)."""
        p_t, p_h, p_w = self.patch_size
        per_frame = (latent_height // p_h) * (latent_width // p_w)
        mask = torch.ones(latent_frames // p_t * per_frame, dtype=torch.float32, device=t.device)
        mask[:per_frame] = 0
        return t.float()[:, None] * mask[None]

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        t = self.timestep(sigma)
        image_embeds = cond["image_embeds"].to(dtype) if "image_embeds" in cond else None
        if self.first_frame_given:
            hidden = torch.cat([cond["first_latent"].to(latents), latents], dim=2)
            t = self.token_timesteps(t, *hidden.shape[2:])
        else:
            hidden = torch.cat([latents, cond["image_condition"].to(latents)], dim=1)
        out = denoiser(
            hidden_states=hidden.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_image=image_embeds,
            return_dict=False,
        )[0]
        return out[:, :, 1:] if self.first_frame_given else out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.first_frame_given and latents.shape[2] == self.generated_latent_frames():
            raise ValueError("Wan2.2 TI2V latents leave out the given first frame; decode them with their "
                             "conditioning: policy.decode(latents, cond)")
        return super().decode(latents)

    def decode_conditioned(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Videos of the samples of ``cond``: with TI2V the condition frame goes back in front before decoding."""
        if self.first_frame_given:
            latents = torch.cat([cond["first_latent"].to(latents), latents], dim=2)
        return super().decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, T, C, H, W)`` in [0, 1] to the policy's latents: with TI2V, those of every frame but the
        first (whose latents are the condition)."""
        latents = super().encode_images(images)
        return latents[:, :, 1:] if self.first_frame_given else latents
