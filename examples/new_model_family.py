"""How to add a model family: Z-Image (diffusers' ``ZImagePipeline``) in one adapter class.

flowrl's algorithms see a family only through a ``ModelAdapter``: how prompts are encoded, what a latent looks
like, how the denoiser is called (it must return the velocity ``v = eps - x0`` at noise level sigma), the
sampler's sigmas and the VAE. Write one subclass, decorate it with ``@register_adapter("<PipelineClassName>")``
and import it before building the policy (in flowrl itself: one file in ``flowrl/policy/``). Everything else
(LoRA, guidance, SDE sampling, the losses) is shared.

The rule is to reproduce the stock pipeline's ``__call__`` exactly; tests/families/test_example_model_family.py shows
that ODE sampling through flowrl gives the stock pipeline's latents bit for bit. What Z-Image does differently:

* its transformer takes *lists* of per-sample tensors: latents ``(C, 1, H, W)`` and prompt embeddings of each
  prompt's own length (the text encoder's padding is dropped);
* it predicts ``x0 - eps``, the negative of the velocity: the stock pipeline does ``noise_pred = -noise_pred``;
* its timestep input is ``(1000 - t) / 1000`` with ``t = sigma * 1000``, i.e. ``1 - sigma``;
* its CFG is ``pos + w * (pos - neg)``: flowrl's ``guidance_scale`` (``u + s * (c - u)``) is ``w + 1``, so the
  stock ``guidance_scale=3`` is flowrl's 4, and flowrl's 1 (no guidance) is the stock 0 (Z-Image-Turbo).
  The stock ``cfg_normalization`` (off by default) and ``cfg_truncation`` (1.0, no effect) are not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from transformers import Qwen3Config, Qwen3Model

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    Conditioning,
    ModelAdapter,
    register_adapter,
    vae_decode_scaled,
    vae_encode_scaled,
)
from flowrl.policy.tiny.qwen_image import ENDOFTEXT, IM_END, build_qwen2_tokenizer


@register_adapter("ZImagePipeline")
class ZImageAdapter(ModelAdapter):
    # The attention projections of every block (context refiner, noise refiner and the main layers alike).
    default_lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    # Kept by the policy (moved with it, frozen); the transformer is the trained denoiser.
    frozen_components = ("vae", "text_encoder")
    guidance_mode = "cfg"  # true CFG: two branches, the unconditional one on the negative prompt
    negative_prompt = ""  # __call__'s default negative prompt

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        if self.max_sequence_length is None:
            self.max_sequence_length = 512  # __call__'s default

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one transformer token: the VAE's factor x the 2x2 patch."""
        return self.pipeline.vae_scale_factor * 2

    def check_resolution(self, height: int, width: int) -> None:
        m = self.token_pixels
        if height < m or width < m or height % m or width % m:
            raise ConfigError(f"resolution {height}x{width}: Z-Image needs multiples of {m} px (VAE factor x 2x2 "
                              f"patch); set resolution to e.g. [{max(m, height // m * m)}, {max(m, width // m * m)}]")

    # ---------------------------------------------------------------- conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        # The stock encoder: chat template, Qwen3's second-to-last hidden states, padding dropped -> one
        # (L_i, D) tensor per prompt. Variable lengths go in ``per_sample`` (select / cat / expand handle lists);
        # the lengths as a tensor give the conditioning its device (the policy caches the negative prompt by it).
        # (a new list: the stock encoder overwrites the prompts it is given with their chat-template text)
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        lengths = torch.tensor([len(e) for e in embeds], device=device)
        return Conditioning({"prompt_lengths": lengths}, {"prompt_embeds": embeds})

    # ---------------------------------------------------------------- latents and the denoiser
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // f, width // f)

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        # __call__: t = scheduler.timesteps[i] (= sigma * num_train_timesteps, float32), passed as (1000 - t) / 1000
        t = sigma.float() * self.pipeline.scheduler.config.num_train_timesteps
        x = list(latents.to(dtype).unsqueeze(2).unbind(0))  # one (C, 1, H, W) per sample
        text = [e.to(latents.device, dtype) for e in cond["prompt_embeds"]]
        out = denoiser(x, (1000 - t) / 1000, text, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - eps; flowrl's velocity is eps - x0

    def combine_guidance(self, v_uncond, v_cond, scale):
        # The stock arithmetic, c + w * (c - u) with w = scale - 1 (same value as u + s * (c - u), same bits as
        # the stock pipeline: negating both branches commutes exactly with it)
        return v_cond + (scale - 1) * (v_cond - v_uncond)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        # __call__: linspace(1, 1/N, N) and the shift mu of the image token count (used by the scheduler only
        # when its config has use_dynamic_shifting), then the scheduler appends 0
        scheduler, f = self.pipeline.scheduler, self.token_pixels
        mu = calculate_shift((height // f) * (width // f),
                             scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(num_inference_steps), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ---------------------------------------------------------------- VAE (FLUX's: scaling and shift factors)
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode_scaled(self.pipeline.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_scaled(self.pipeline.vae, images)


# -------------------------------------------------------------------- a tiny Z-Image for tests
#: Qwen3's chat template for one user turn with the generation prompt (thinking on, as the stock encoder asks)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def build_tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """A stock ``ZImagePipeline`` with random weights built from config objects, nothing downloaded: ~350k
    transformer parameters (most in Z-Image's fixed 1024-wide timestep MLP). The VAE halves the resolution once,
    so sizes are multiples of 4 px (16 px: an 8x8 latent, 4x4 tokens)."""
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[8, 4, 4],  # RoPE over (text position / frame, height, width): sums to the head dim 16
        axes_lens=[1024, 32, 32],  # the image's first position is after the (padded) text: > 512 + 1
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159,  # Z-Image's VAE is FLUX's
    )
    # A real Qwen2 byte-level BPE tokenizer trained in memory on the chat prompt (flowrl's tiny Qwen-Image one)
    tokenizer = build_qwen2_tokenizer(template="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        bos_token_id=pad, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=pad,
    ))
    # Tongyi-MAI/Z-Image-Turbo's scheduler config (a fixed shift of 3, no dynamic shifting)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
