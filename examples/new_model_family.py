"""How to add a model family: Lumina-Image 2.0 (diffusers' ``Lumina2Pipeline``) in one adapter class.

flowrl's algorithms see a family only through a ``ModelAdapter``: how prompts are encoded, what a latent looks
like, how the denoiser is called (it must return the velocity ``v = eps - x0`` at noise level sigma), the
sampler's sigmas and the VAE. Write one subclass, decorate it with ``@register_adapter("<PipelineClassName>")``
and import it before building the policy (in flowrl itself: one file in ``flowrl/policy/``). Everything else
(LoRA, guidance, SDE sampling, the losses) is shared.

The rule is to reproduce the stock pipeline's ``__call__`` exactly; tests/families/test_example_model_family.py shows
that ODE sampling through flowrl gives the stock pipeline's latents. What Lumina-Image 2.0 does differently:

* its prompts are wrapped in a system prompt (``"<system prompt> <Prompt Start> <prompt>"``) but its negative
  prompt "" is not: the Gemma2 encoder reads the bare "". So ``encode_prompt`` wraps every prompt except the
  negative one (a user prompt that is exactly "" would be wrapped by the stock pipeline; here it is the negative);
* its text is Gemma2's second-to-last hidden states padded to ``max_sequence_length`` (256, at most 512) with an
  attention mask, which the transformer takes beside the embeddings;
* it predicts ``x0 - eps``, the negative of the velocity (the stock pipeline does ``noise_pred = -noise_pred``),
  and its timestep input is ``1 - t / 1000`` with ``t = sigma * 1000``, i.e. ``1 - sigma``;
* its CFG (``u + s * (c - u)``, flowrl's scale as it is) is followed by ``cfg_normalization`` (on by default): the
  guided prediction rescaled to the conditional one's norm along the latent's last axis, row by row of the width.
  The stock ``cfg_trunc_ratio`` (1.0 by default, which never truncates) is not reproduced. The stock pipeline runs
  the two branches as two passes; flowrl batches them by default (one pass, whose rows of different text lengths
  the transformer masks), which agrees to float rounding, and runs them as two passes, bit for bit, with the
  policy's ``uncond_gradient: false``;
* its sigmas are ``linspace(1, 1/N, N)``, and the shift ``mu`` (used by a scheduler with dynamic shifting) is computed
  from ``latents.shape[1]``: the latent *channels*, not the image token count as FLUX does. The tiny pipeline's
  scheduler shifts dynamically, so the test pins this down;
* its ``vae_scale_factor`` is a constant 8, whatever the VAE: sizes are multiples of 16 px (8 x 2x2 patches), and
  the tiny VAE downsamples 8x for real.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
)
from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift
from tokenizers import trainers
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from flowrl.errors import ConfigError
from flowrl.policy.adapter import (
    Conditioning,
    ModelAdapter,
    register_adapter,
    vae_decode_scaled,
    vae_encode_scaled,
)
from flowrl.policy.tiny.text import DEFAULT_WORDS

#: ``Lumina2Pipeline.__call__``'s text length, and the most its ``check_inputs`` accepts
DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH = 256, 512


@register_adapter("Lumina2Pipeline")
class Lumina2Adapter(ModelAdapter):
    # The attention projections of every block (context refiner, noise refiner and the main layers alike).
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    # Kept by the policy (moved with it, frozen); the transformer is the trained denoiser.
    frozen_components = ("vae", "text_encoder")
    guidance_mode = "cfg"  # true CFG: two branches, the unconditional one on the negative prompt
    negative_prompt = ""  # __call__'s default negative prompt

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        super().__init__(pipeline, max_sequence_length)
        if self.max_sequence_length is None:
            self.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
        elif self.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"policy.max_sequence_length={max_sequence_length}: Lumina2Pipeline takes at most "
                              f"{MAX_SEQUENCE_LENGTH} text tokens; set it to {MAX_SEQUENCE_LENGTH} or less "
                              f"(null = {DEFAULT_MAX_SEQUENCE_LENGTH})")

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one transformer token: the pipeline's (fixed) VAE factor x the patch size."""
        return self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size

    def check_resolution(self, height: int, width: int) -> None:
        m = self.token_pixels
        if height < m or width < m or height % m or width % m:
            raise ConfigError(f"resolution {height}x{width}: Lumina2 needs multiples of {m} px (VAE factor x 2x2 "
                              f"patch); set resolution to e.g. [{max(m, height // m * m)}, {max(m, width // m * m)}]")

    # ---------------------------------------------------------------- conditioning
    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        # __call__ wraps the prompts in the system prompt and encodes the negative prompt bare; both go through the
        # same Gemma2 helper (padding to max_sequence_length, second-to-last hidden states, the attention mask)
        system = self.pipeline.system_prompt
        texts = [p if p == self.negative_prompt else f"{system} <Prompt Start> {p}" for p in prompts]
        embeds, mask = self.pipeline._get_gemma_prompt_embeds(texts, device=device,
                                                               max_sequence_length=self.max_sequence_length)
        return Conditioning({"prompt_embeds": embeds, "prompt_attention_mask": mask})

    # ---------------------------------------------------------------- latents and the denoiser
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, height // f, width // f)

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        steps = self.pipeline.scheduler.config.num_train_timesteps
        t = sigma.float() * steps  # __call__: t = scheduler.timesteps[i], passed as 1 - t / num_train_timesteps
        out = denoiser(hidden_states=latents.to(dtype), timestep=1 - t / steps,
                       encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                       encoder_attention_mask=cond["prompt_attention_mask"], return_dict=False)[0]
        return -out  # the model predicts x0 - eps; flowrl's velocity is eps - x0

    def combine_guidance(self, v_uncond, v_cond, scale):
        # __call__'s CFG then its cfg_normalization, on the raw predictions; negating both branches commutes with
        # it exactly (the norms do not change sign)
        guided = v_uncond + scale * (v_cond - v_uncond)
        return guided * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        # __call__: np.linspace(1, 1/N, N) and mu of latents.shape[1] (the channel count), then the scheduler
        # applies its shift and appends 0
        scheduler, n = self.pipeline.scheduler, num_inference_steps
        mu = calculate_shift(self.pipeline.transformer.config.in_channels,
                             scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ---------------------------------------------------------------- VAE (FLUX's: scaling and shift factors)
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode_scaled(self.pipeline.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_scaled(self.pipeline.vae, images)


# -------------------------------------------------------------------- a tiny Lumina-Image 2.0 for tests
def build_gemma_tokenizer(text: str) -> GemmaTokenizer:
    """A real ``GemmaTokenizer`` (BPE, spaces as "▁", ``<bos>`` first, ``<pad>`` 0) trained in memory on ``text`` and
    flowrl's tiny word list, so nothing is downloaded; characters it never saw become ``<unk>``."""
    backend = GemmaTokenizer().backend_tokenizer  # Gemma's normaliser and pre-tokeniser, an empty BPE
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
                                  show_progress=False)
    words = sorted(set(DEFAULT_WORDS) | set(text.split()))
    backend.train_from_iterator([" " + w for w in words] * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)


def build_tiny_lumina2_pipeline(seed: int = 0) -> Lumina2Pipeline:
    """A stock ``Lumina2Pipeline`` with random weights built from config objects, nothing downloaded: a 32-wide
    transformer with one block of each kind, a 2-layer Gemma2, a VAE that downsamples 8x (the pipeline's fixed
    factor), so 32 px is a 4x4 latent and 2x2 tokens. The scheduler shifts dynamically, so the channel-count ``mu``
    of ``__call__`` matters."""
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, cap_feat_dim=32,
        axes_dim_rope=(8, 4, 4),  # RoPE over (text position, height, width): sums to the head dim 16
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159,  # Lumina-Image 2.0's VAE is FLUX's
    )
    system_prompt = Lumina2Pipeline(None, None, None, None, None).system_prompt  # set by __init__
    tokenizer = build_gemma_tokenizer(system_prompt + " <Prompt Start>")
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    return Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer)
