"""Pretrain the toy world's tiny text-to-image model by flow matching.

This script produces the checkpoint shipped in ``flowrl/toy/checkpoint`` (until 2026-12 it was the module
``flowrl.toy.pretrain``, the name the commands recorded in ``benchmarks/toy_pretrain*.json`` use)::

    python scripts/pretrain_toy.py --out flowrl/toy/checkpoint --seed 0 --eval

Two stages, both on images rendered on the fly from the *train* prompts of
:func:`flowrl.toy.shapes.split_prompts` (the held-out prompts are never seen):

1. the tiny ``AutoencoderKL`` (no downsampling unless ``--architecture`` asks for it) learns to
   reconstruct renders, then is frozen and its ``scaling_factor`` / ``shift_factor`` are set so that
   latents have zero mean and unit variance;
2. the ``SD3Transformer2DModel`` and both CLIP text encoders learn the velocity ``eps - x0`` of the
   rectified flow ``x_sigma = (1 - sigma) x0 + sigma eps`` with 10% prompt dropout to ``""`` (so
   classifier-free guidance works), AdamW with warmup, and an EMA of the weights, which is saved.
   Training noise levels are logit-normal, shifted toward 1 by ``time_shift`` = the sampler's shift (3):
   where an object goes and which colour it gets is decided at high noise, and a model that is weak
   there draws empty or tiny images for prompts that leave a choice open ("a circle"). This shift, with
   bf16 autocast (7500 instead of 6500 steps in about the same time), doubled held-out accuracy
   (0.121 -> 0.240 overall, see benchmarks/toy_pretrain.json).

``--object-sizes LO HI`` narrows the range of object sides (6..11 px at 32 px by default) in the training
images; ``--architecture`` changes the model (see ``benchmarks/toy_pretrain_variants.json`` for both).

The result is a plain diffusers ``save_pretrained`` directory that loads with
``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
The default step count fits in 30 minutes on 2 quiet CPU cores (29.5 measured, bf16 autocast). On cores shared with other
jobs, set ``OMP_WAIT_POLICY=PASSIVE`` before starting: OpenMP's default spin-waiting then makes each step
several times slower (it costs about 30% on quiet cores, so it is not forced). The model is deliberately undertrained on
the hard categories (counting, position), so that RL fine-tuning has headroom.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from transformers import CLIPTokenizer

from flowrl.toy import render, shapes
from flowrl.toy.pipeline import BOS, EOS, build_tiny_sd3_pipeline
from flowrl.toy.verifier import ShapesReward

TIME_SAMPLINGS = ("logit_normal", "uniform", "shifted_uniform")
DEFAULT_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_pretrain.json"


@dataclass
class PretrainConfig:
    """Everything that determines the pretrained model (saved next to it as ``pretrain_config.json``)."""

    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 400
    vae_batch_size: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6
    vae_latent_noise: float = 0.1
    # stage 2: flow matching
    steps: int = 7500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompt_dropout: float = 0.1
    time_sampling: str = "logit_normal"
    time_shift: float = 3.0  # the sampler's shift: layout and colour are decided at high noise
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ema_decay: float = 0.999
    # the data: object sides at 32 px (the verifier reads any of them; fewer, bigger sizes are easier to draw)
    object_sizes: tuple[int, int] = render.DEFAULT_OBJECT_SIZES
    bf16: bool = True  # bf16 autocast: about 1.2x more steps in the same time on a CPU
    # architecture (passed to build_tiny_sd3_pipeline)
    architecture: dict = field(
        default_factory=lambda: dict(
            sample_size=32,
            patch_size=2,
            num_layers=4,
            attention_head_dim=32,
            num_attention_heads=2,
            text_hidden_size=32,
            text_layers=2,
            latent_channels=4,
            vae_channels=16,
            vae_downsample=0,
            max_text_length=16,
            shift=3.0,
        )
    )

    def __post_init__(self):
        self.object_sizes = render.check_object_sizes(self.object_sizes)  # bad sizes fail before any work


# --------------------------------------------------------------------------------------------- data
class SceneSampler:
    """Renders (image, prompt) batches from a fixed prompt list: a uniform category, then a uniform prompt.

    ``object_sizes``: the range of object sides at 32 px (see :func:`flowrl.toy.render.object_size_range`).
    """

    def __init__(
        self, prompts: Sequence[str], seed: int, size: int = 32, object_sizes: Sequence[int] | None = None
    ):
        self.prompts = tuple(prompts)
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.object_sizes = render.check_object_sizes(object_sizes)

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        images, prompts = [], []
        for _ in range(batch_size):
            scene = shapes.sample_scene(self.rng, prompts=self.prompts)
            images.append(render.render(scene, size=self.size, rng=self.rng, object_sizes=self.object_sizes))
            prompts.append(shapes.prompt_of(scene))
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        return pixels, prompts


# ---------------------------------------------------------------------------------------- helpers
def canonical_word_tokenizer(tokenizer: CLIPTokenizer, words: Sequence[str]) -> CLIPTokenizer:
    """The same word-level tokenizer with token ids that do not depend on the run.

    ``build_word_tokenizer`` trains its BPE with the ``tokenizers`` library, whose ids for equally
    frequent tokens change from one build to the next (hash-map order), so the same seed would give a
    different model. Here the special tokens come first, then every word (sorted), then the rest.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in backend["merges"]]
    specials = [BOS, EOS]
    word_tokens = sorted({w + "</w>" for w in words})
    rest = sorted(set(backend["vocab"]) - set(specials) - set(word_tokens))
    vocab = {t: i for i, t in enumerate(specials + word_tokens + rest)}
    if len(vocab) != len(backend["vocab"]):
        raise RuntimeError("a word of the vocabulary is missing from the trained tokenizer")
    out = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=tokenizer.model_max_length)
    for w in words:  # every word must stay one token
        ids = out(w, add_special_tokens=False).input_ids
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"the tokenizer splits {w!r} into {ids}")
    return out


def _log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RL library's prompt encoding: both CLIP encoders, no T5 tokens at all."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    return prompt_embeds, pooled


def sample_sigmas(cfg: PretrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels in (0, 1)."""
    if cfg.time_sampling == "logit_normal":
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    elif cfg.time_sampling in ("uniform", "shifted_uniform"):
        sigma = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {cfg.time_sampling!r}")
    if cfg.time_shift != 1.0 or cfg.time_sampling == "shifted_uniform":
        shift = cfg.time_shift
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma.clamp(1e-4, 1 - 1e-4)


@torch.no_grad()
def encode_images(
    pipe: StableDiffusion3Pipeline, pixels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Pixels in [0, 1] -> normalised latents ``(z - shift_factor) * scaling_factor``."""
    dist = pipe.vae.encode(pixels * 2 - 1).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def image_size(pipe: StableDiffusion3Pipeline) -> int:
    """The pipeline's image side in pixels (the latent grid times the VAE's downsampling)."""
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def decode_latents(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> pixels in [0, 1]."""
    z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------- stage 1: VAE
@torch.no_grad()
def _init_vae_near_identity(vae) -> None:
    """Zero the last layer of every residual block / attention (each starts as the identity) and start
    the posterior nearly deterministic (log-variance -10): the VAE then learns sharp reconstructions in a
    few hundred steps instead of thousands."""
    for m in vae.modules():
        if isinstance(m, ResnetBlock2D):
            torch.nn.init.zeros_(m.conv2.weight)
            torch.nn.init.zeros_(m.conv2.bias)
        elif isinstance(m, Attention):
            torch.nn.init.zeros_(m.to_out[0].weight)
            torch.nn.init.zeros_(m.to_out[0].bias)
    vae.quant_conv.bias[vae.config.latent_channels :] = -10.0


def train_vae(
    pipe: StableDiffusion3Pipeline, cfg: PretrainConfig, sampler: SceneSampler, gen: torch.Generator
) -> float:
    """Stage 1; returns the seconds it took."""
    vae = pipe.vae
    _init_vae_near_identity(vae)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = time.time()
    for step in range(cfg.vae_steps):
        lr = (
            cfg.vae_lr
            * min(1.0, (step + 1) / 20)
            * (0.5 * (1 + math.cos(math.pi * step / max(cfg.vae_steps, 1))))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        pixels, _ = sampler(cfg.vae_batch_size)
        x = pixels * 2 - 1
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        if cfg.vae_latent_noise > 0:  # a decoder that tolerates slightly-off latents (imperfect samples)
            scale = dist.mean.detach().std(dim=(0, 2, 3), keepdim=True)
            z = z + cfg.vae_latent_noise * scale * torch.randn(z.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + cfg.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)

    # Zero mean / unit variance latents, per channel (the pipeline's scalar shift_factor / scaling_factor
    # cannot do that: the channel means differ a lot), folded into the VAE's 1x1 (post_)quant_conv.
    with torch.no_grad():
        z = torch.cat([vae.encode(sampler(64)[0] * 2 - 1).latent_dist.mean for _ in range(4)])
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-6)
    _normalize_latents(vae, mean, std)
    _log(f"vae done in {time.time() - start:.0f}s: latent channel means {mean.tolist()} stds {std.tolist()}")
    return time.time() - start


@torch.no_grad()
def _normalize_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Reparametrise the VAE so that its latents become ``(z - mean) / std`` (per channel); the
    encoder-decoder function is unchanged and ``scaling_factor`` / ``shift_factor`` become 1 / 0."""
    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * std.log()  # log-variance
    pq.bias += pq.weight[:, :, 0, 0] @ mean
    pq.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)


@torch.no_grad()
def vae_reconstruction_accuracy(pipe: StableDiffusion3Pipeline, sampler: SceneSampler, n: int = 256) -> dict:
    """Share of VAE reconstructions of true renders that the verifier accepts (should be ~1)."""
    reward = ShapesReward()
    gen = torch.Generator().manual_seed(1234)
    pixels, prompts = sampler(n)
    recon = decode_latents(pipe, encode_images(pipe, pixels, gen))
    truth = [v.correct for v in reward.evaluate(pixels, prompts)]
    rec = [v.correct for v in reward.evaluate(recon, prompts)]
    return {
        "renders_correct": float(np.mean(truth)),
        "reconstructions_correct": float(np.mean(rec)),
        "reconstruction_mse": float(F.mse_loss(recon, pixels)),
    }


# ------------------------------------------------------------------------------ stage 2: flow match
class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_flow(
    pipe: StableDiffusion3Pipeline, cfg: PretrainConfig, sampler: SceneSampler, gen: torch.Generator
) -> float:
    """Stage 2 (the EMA weights end up in the pipeline); returns the seconds it took."""
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(modules, cfg.ema_decay)
    start, running = time.time(), None
    for step in range(cfg.steps):
        # linear warmup, then cosine decay to 10% of the peak
        progress = step / max(cfg.steps, 1)
        lr = (
            cfg.lr
            * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
            * (0.55 + 0.45 * math.cos(math.pi * progress))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        pixels, prompts = sampler(cfg.batch_size)
        drop = torch.rand(len(prompts), generator=gen) < cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x0 = encode_images(pipe, pixels, gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg, len(prompts), gen)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            prompt_embeds, pooled = encode_prompts(pipe, prompts)
            pred = pipe.transformer(
                hidden_states=x_sigma,
                timestep=sigma * 1000,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
            ).sample
        loss = F.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == cfg.steps - 1:
            elapsed = time.time() - start
            _log(
                f"flow step {step} loss {running:.4f} lr {lr:.2e} ({elapsed:.0f}s, {elapsed / (step + 1):.3f} s/step)"
            )
    ema.copy_to_model()
    for m in modules:
        m.eval().requires_grad_(False)
    return time.time() - start


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    samples_per_prompt: int = 4,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 20,
    seed: int = 0,
    min_samples_per_category: int = 64,
    batch_images: int = 256,
) -> dict:
    """Per-category strict accuracy (and mean graded verifier score) of pipeline samples on ``prompts``.

    Each prompt gets ``samples_per_prompt`` samples, more in categories with few prompts so that every
    category has at least ``min_samples_per_category`` samples. The overall accuracy is the mean over
    categories (GenEval's convention).
    """
    reward = ShapesReward()
    by_category: dict[str, list[str]] = defaultdict(list)
    for p in prompts:
        by_category[shapes.parse_prompt(p).category].append(p)
    jobs: list[tuple[str, int]] = []  # (prompt, number of samples)
    for cat in sorted(by_category):
        ps = by_category[cat]
        n = max(samples_per_prompt, math.ceil(min_samples_per_category / len(ps)))
        jobs += [(p, n) for p in ps]
    flat = [p for p, n in jobs for _ in range(n)]

    correct: dict[str, list[float]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    gen = torch.Generator().manual_seed(seed)
    size = image_size(pipe)
    for i in range(0, len(flat), batch_images):
        chunk = flat[i : i + batch_images]
        images = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            max_sequence_length=0,
            generator=gen,
            output_type="pt",
        ).images
        for verdict in reward.evaluate(images.float().clamp(0, 1), chunk):
            correct[verdict.category].append(float(verdict.correct))
            scores[verdict.category].append(float(verdict.score))
    per_category = {c: float(np.mean(v)) for c, v in sorted(correct.items())}
    return {
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "num_prompts": {c: len(v) for c, v in sorted(by_category.items())},
        "num_samples": {c: len(v) for c, v in sorted(correct.items())},
        "accuracy": per_category,
        "overall": float(np.mean(list(per_category.values()))),
        "mean_score": {c: float(np.mean(v)) for c, v in sorted(scores.items())},
    }


# ------------------------------------------------------------------------------------------- driver
def pretrain(cfg: PretrainConfig, out: str | os.PathLike) -> tuple[StableDiffusion3Pipeline, dict]:
    """Build, train (VAE, then flow matching) and save the tiny pipeline to ``out``; also returns timings."""
    torch.manual_seed(cfg.seed)
    train_prompts, _ = shapes.split_prompts(seed=0)
    pipe = build_tiny_sd3_pipeline(seed=cfg.seed, words=shapes.VOCABULARY, **cfg.architecture)
    for name, encoder in (("tokenizer", pipe.text_encoder), ("tokenizer_2", pipe.text_encoder_2)):
        tokenizer = canonical_word_tokenizer(getattr(pipe, name), shapes.VOCABULARY)
        assert (
            len(tokenizer) == encoder.config.vocab_size
            and tokenizer.eos_token_id == encoder.config.eos_token_id
        )
        pipe.register_modules(**{name: tokenizer})
    gen = torch.Generator().manual_seed(cfg.seed)
    size = cfg.architecture["sample_size"]

    sizes = cfg.object_sizes
    vae_s = train_vae(pipe, cfg, SceneSampler(train_prompts, cfg.seed * 1000 + 1, size, sizes), gen)
    flow_s = train_flow(pipe, cfg, SceneSampler(train_prompts, cfg.seed * 1000 + 2, size, sizes), gen)
    timings = {
        "vae_s": round(vae_s, 1),
        "flow_s": round(flow_s, 1),
        "flow_s_per_step": round(flow_s / max(cfg.steps, 1), 4),
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return pipe, timings


def _architecture(text: str) -> dict:
    """``--architecture``: the default architecture with the JSON object's keys replaced."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); pass an object like '{{\"num_layers\": 6}}'") from None
    known = set(inspect.signature(build_tiny_sd3_pipeline).parameters) - {"seed", "words"}
    if not isinstance(value, dict) or set(value) - known:
        bad = sorted(set(value) - known) if isinstance(value, dict) else value
        raise argparse.ArgumentTypeError(f"unknown architecture keys {bad}; valid keys: {sorted(known)}")
    return {**PretrainConfig().architecture, **value}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="python scripts/pretrain_toy.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to write the pipeline to (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="flow-matching steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size)
    p.add_argument("--vae-latent-noise", type=float, default=d.vae_latent_noise)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--prompt-dropout", type=float, default=d.prompt_dropout)
    p.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default=d.time_sampling)
    p.add_argument("--time-shift", type=float, default=d.time_shift)
    p.add_argument(
        "--object-sizes",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        default=d.object_sizes,
        help="range of object sides at 32 px in the training images, 6 <= LO <= HI <= 12 (default %(default)s)",
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16, help="bf16 autocast")
    p.add_argument(
        "--architecture",
        type=_architecture,
        default=d.architecture,
        help="JSON object of build_tiny_sd3_pipeline arguments that replace the defaults, e.g. "
        '\'{"vae_downsample": 1, "latent_channels": 8, "num_layers": 6, "num_attention_heads": 3}\'',
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--eval", action="store_true", help="evaluate on the held-out prompts after training")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the pipeline in --out")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[5.0], help="CFG scales to evaluate")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument(
        "--eval-min-per-category", type=int, default=64, help="at least this many samples per category"
    )
    p.add_argument("--benchmark-json", default=str(DEFAULT_BENCHMARK), help="where --eval writes its numbers")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # every PretrainConfig field that has a command-line option takes its value from there
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig) if hasattr(args, f.name)})
    result: dict = {"command": " ".join(["python scripts/pretrain_toy.py", *argv])}
    if args.eval_only:
        pipe = StableDiffusion3Pipeline.from_pretrained(args.out, text_encoder_3=None, tokenizer_3=None)
        saved = Path(args.out) / "pretrain_config.json"
        if saved.exists():
            result["config"] = json.loads(saved.read_text())
    else:
        start = time.time()
        pipe, timings = pretrain(cfg, args.out)
        result["train_wall_time_s"] = round(time.time() - start, 1)
        result["timings"] = timings
        result["config"] = asdict(cfg)
        result["torch_threads"] = torch.get_num_threads()
        _log(f"saved to {args.out} after {result['train_wall_time_s']}s")
    pipe.set_progress_bar_config(disable=True)

    if args.eval or args.eval_only:
        train_prompts, heldout = shapes.split_prompts(seed=0)
        start = time.time()
        sizes = result.get("config", {}).get("object_sizes")  # the sizes it was trained on
        result["vae_reconstruction"] = vae_reconstruction_accuracy(
            pipe, SceneSampler(train_prompts + heldout, seed=99, size=image_size(pipe), object_sizes=sizes)
        )
        _log(f"vae reconstruction: {result['vae_reconstruction']}")
        result["heldout"] = []
        for g in args.guidance_scales:
            res = evaluate(
                pipe, heldout, args.eval_samples, g, args.eval_steps, args.seed, args.eval_min_per_category
            )
            result["heldout"].append(res)
            accs = " ".join(f"{c} {a:.2f}" for c, a in res["accuracy"].items())
            _log(f"held-out CFG {g}: {accs} | overall {res['overall']:.3f}")
        best = max(result["heldout"], key=lambda r: r["overall"])
        result["best_guidance_scale"] = best["guidance_scale"]
        result["eval_wall_time_s"] = round(time.time() - start, 1)
        if args.benchmark_json:
            path = Path(args.benchmark_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
