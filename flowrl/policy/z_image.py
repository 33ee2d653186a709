"""Z-Image (``ZImagePipeline``: Tongyi-MAI's 6B single-stream DiT, the Qwen3-4B text encoder, FLUX's VAE), as the
stock diffusers pipeline runs it. Z-Image-Turbo (few-step, distilled: no CFG) and the undistilled base (true CFG)
share the pipeline and this adapter.

* Prompts: ``ZImagePipeline.encode_prompt`` (the Qwen3 chat template with thinking on, the second-to-last hidden
  states, the tokenizer's padding dropped), which gives one ``(L_i, D)`` tensor per prompt. Kept here zero-padded
  to ``max_sequence_length`` with the real lengths per sample (``prompt_lengths``), so a conditioning is plain
  tensors that select, concatenate, cache and move like every other family's; ``forward`` cuts each row back to
  its length, which is the list the stock pipeline passes.
* Latents: the VAE's ``(B, C, H/f, W/f)``; the transformer takes a *list* of per-sample ``(C, 1, H/f, W/f)``
  tensors (a frame axis of 1) and patchifies 2x2 itself, so sizes are multiples of ``2f`` px.
* Timestep: the stock ``(1000 - t) / 1000`` with ``t = sigma * num_train_timesteps`` (float32), i.e. ``1 - sigma``.
* Prediction: the transformer predicts ``x0 - eps``; the stock pipeline negates it before the Euler step, so flowrl's
  velocity ``eps - x0`` is the negated output.
* Guidance: the stock CFG is ``pos + w * (pos - neg)`` against the negative prompt "" and is on for ``w > 0``:
  flowrl's ``guidance_scale`` (``u + s * (c - u)``, on for ``s > 1``) is ``w + 1``. So Z-Image-Turbo's stock
  ``guidance_scale=0`` is flowrl's 1 (one pass per step), and a stock 4 is flowrl's 5. The stock
  ``cfg_normalization`` (off by default) and ``cfg_truncation`` (1.0 by default, which never truncates) are not
  reproduced.
* Sigmas: ``linspace(1, 1/N, N)`` (``get_default_z_image_sigmas``) through the scheduler with the shift ``mu`` of the
  image token count (used only by a scheduler with dynamic shifting; Turbo's has a fixed shift of 3), then 0.
* VAE: FLUX's normalisation (``scaling_factor`` and ``shift_factor``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    Conditioning,
    ModelAdapter,
    register_adapter,
    vae_decode_scaled,
    vae_encode_scaled,
)

#: ``ZImagePipeline.__call__``'s text length
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the transformer pads the text to a multiple of this many tokens (diffusers' ``SEQ_MULTI_OF``)
TEXT_PAD_MULTIPLE = 32


@register_adapter("ZImagePipeline")
class ZImageAdapter(ModelAdapter):
    # Flow-Factory's Z-Image LoRA targets: the attention projections and the SwiGLU feed-forward of every block
    # (noise refiner, context refiner and the main layers alike)
    default_lora_targets = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    frozen_components = ("vae", "text_encoder")
    guidance_mode = "cfg"
    negative_prompt = ""  # __call__'s default negative prompt

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        if self.max_sequence_length is None:
            self.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
        longest = self.longest_text()
        if not 1 <= self.max_sequence_length <= longest:
            raise ConfigError(
                f"policy.max_sequence_length={max_sequence_length}: this Z-Image transformer's text positions "
                f"(RoPE axes_lens[0] = {self.axes_lens[0]}, text padded to multiples of {TEXT_PAD_MULTIPLE}, then "
                f"the image) allow 1 to {longest} tokens; set it in that range (null = {DEFAULT_MAX_SEQUENCE_LENGTH})"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def axes_lens(self) -> list[int]:
        """The transformer's RoPE table lengths of (text position / frame, height, width) in tokens."""
        return list(self.pipeline.transformer.config.axes_lens)

    def longest_text(self) -> int:
        """The most text tokens the RoPE table takes: the text is padded to a multiple of 32 at positions 1..L and
        the image comes after it, at position L + 1, which must be in the table."""
        return (self.axes_lens[0] - 2) // TEXT_PAD_MULTIPLE * TEXT_PAD_MULTIPLE

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one transformer token: the VAE's factor x the 2x2 patch."""
        return self.pipeline.vae_scale_factor * 2

    def check_resolution(self, height: int, width: int) -> None:
        m = self.token_pixels
        if height < m or width < m or height % m or width % m:
            raise ConfigError(
                f"resolution {height}x{width}: Z-Image needs height and width that are positive multiples of {m} "
                f"(VAE factor {m // 2} x 2x2 patches); set resolution (and eval.resolution) to e.g. "
                f"[{max(m, height // m * m)}, {max(m, width // m * m)}]"
            )
        rows, cols = self.axes_lens[1], self.axes_lens[2]
        if height // m > rows or width // m > cols:
            raise ConfigError(
                f"resolution {height}x{width}: this Z-Image transformer's RoPE covers at most {rows}x{cols} tokens "
                f"({rows * m}x{cols * m} px); set resolution (and eval.resolution) to at most "
                f"[{rows * m}, {cols * m}]"
            )

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // f, width // f)

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        length = self.max_sequence_length
        # (a new list: the stock encoder overwrites the prompts it is given with their chat-template text)
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=length)
        lengths = [len(e) for e in embeds]
        padded = torch.stack([F.pad(e, (0, 0, 0, length - len(e))) for e in embeds])
        return Conditioning({"prompt_embeds": padded}, {"prompt_lengths": lengths})

    def text_inputs(self, cond: Conditioning, dtype: torch.dtype) -> list[torch.Tensor]:
        """The stock pipeline's text input of ``cond``: one ``(L_i, D)`` tensor per sample, padding dropped."""
        embeds = cond["prompt_embeds"].to(dtype)
        return [e[:n] for e, n in zip(embeds, cond["prompt_lengths"])]

    # ------------------------------------------------------------------ denoiser
    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        # __call__: t = scheduler.timesteps[i] (sigma * num_train_timesteps in float32), passed as (1000 - t) / 1000
        t = sigma.float() * self.pipeline.scheduler.config.num_train_timesteps
        x = list(latents.to(dtype).unsqueeze(2).unbind(0))  # one (C, 1, H, W) per sample
        out = denoiser(x, (1000 - t) / 1000, self.text_inputs(cond, dtype), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - eps; flowrl's velocity is eps - x0

    def combine_guidance(self, v_uncond, v_cond, scale):
        """The stock arithmetic ``c + w * (c - u)`` with ``w = scale - 1``: the value of ``u + s * (c - u)`` and the
        stock pipeline's bits (negating both branches commutes exactly with it)."""
        return v_cond + (scale - 1) * (v_cond - v_uncond)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler, f = self.pipeline.scheduler, self.token_pixels
        mu = calculate_shift((height // f) * (width // f),
                             scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode_scaled(self.pipeline.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_scaled(self.pipeline.vae, images)
