"""GPU benchmark: grpo, nft and awm on SD3.5-Medium-sized and FLUX.1-dev-sized random weights, eager vs compiled.

Nothing is downloaded: each setup's pipeline is built from its configuration with random weights (on the GPU, in
bfloat16, as the hub ships them), saved to a temporary folder and loaded by ``flowrl fit`` as a real model is:

* ``sd35m``: the SD3.5-Medium pipeline of ``benchmarks/memory.py`` (:func:`memory.build_sd35_medium`): the 2.24B
  MMDiT-X transformer (24 layers, 13 dual-attention ones), CLIP-L and CLIP-G at full width, the SD3 VAE, **no T5**
  (the pipeline pads the T5 part of the prompt with zeros, so the transformer still sees 77 + 256 text tokens);
* ``flux_dev``: the FLUX.1-dev transformer at full size (11.9B parameters: 19 double and 38 single blocks, 24 heads
  of 128, guidance embedding) and FLUX's VAE; **the text encoders are small random ones** (one-layer CLIP 768 wide,
  one-layer T5 4096 wide, 512 T5 tokens as FLUX.1-dev): only the denoiser is timed against its floor, and the
  prompt embeddings have the real shapes.

Every run: LoRA rank 32 (alpha 64) on a bf16 frozen base, ``bf16-mixed``, 512 px, 10 sampling steps, gradient
checkpointing (as ``lightning_configs/models/base.yaml``), the algorithm's toy file (``lightning_configs/toy/<alg>.yaml``,
as ``benchmarks/overhead.py``) with the model, size and reward overridden, one warm-up iteration, then
``--iterations`` measured ones; each configuration eager, then with each ``--compile`` mode (``policy.compile``).

Run on a GPU machine (one script; the JSON is rewritten after every run, so a timeout keeps what finished; run
times not measured yet: building and saving FLUX's 24 GB of bf16 weights alone takes minutes). The whole matrix::

    timeout 3600 python benchmarks/gpu.py --setups sd35m flux_dev --algorithms grpo nft awm \\
        --compile rollout all --iterations 2

and a first, shorter run (SD3.5-M only, eager vs ``all``) that fits a 10-minute slot::

    timeout 540 python benchmarks/gpu.py --setups sd35m --algorithms grpo nft awm --compile all --iterations 2

One record per run in ``benchmarks/gpu.json`` (``results``; beside them ``device``, ``torch``, ``command``):

* ``algorithm``, ``setup``, ``compiled`` (bool), ``compile_mode`` (null, rollout, all), ``device`` (the GPU's name;
  the CPU's under ``--smoke``), ``precision``, ``resolution``, ``images_per_iteration`` (rollout samples);
* ``seconds_per_iteration``: median wall time of the measured iterations (CUDA synchronised at both ends);
  ``iteration_seconds``: each of them; ``images_per_second``: images_per_iteration / seconds_per_iteration;
* ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over the measured iterations (null on a CPU);
* ``transformer_parameters`` / ``trainable_parameters``; ``transformer_calls_per_iteration``;
* ``model_tflop_per_iteration``: the transformer's model FLOPs of one iteration, from the eager run's recorded
  calls: 2 x transformer parameters x tokens (image tokens after patching + text tokens, times the batch) per call,
  x3 for a call with autograd on (forward + backward); the recompute of gradient checkpointing and attention's
  quadratic term are not counted (the usual MFU convention). The same work for the compiled runs;
* ``achieved_tflops``: that over ``seconds_per_iteration``; ``peak_tflops``: the GPU's dense bf16 rate
  (:data:`PEAK_BF16_TFLOPS` by device name, or ``--peak-tflops``; null when unknown); ``mfu``: their ratio;
* ``eager_floor_seconds``: the eager run's transformer calls of one iteration replayed alone, eager (compilation
  forced off), with a backward through each call that had grad; ``ratio_to_eager_floor``: the median of each
  measured iteration over the replay made right after it (below 1: compiled faster than eager compute);
* ``compile_seconds``, ``compiled_graphs``, ``recompiles_after_warmup`` (0 once every shape is compiled),
  ``break_even_iterations`` (compile time over the seconds an iteration saves against eager; null: none saved).

``--smoke``: the same code path on the CPU with tiny shapes (a tiny SD3 at 32 px and a tiny FLUX.1-dev at 16 px,
4 samples, 3 steps), in seconds; ``tests/e2e/test_benchmarks.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOY = ROOT / "lightning_configs" / "toy"
SETUPS = ("sd35m", "flux_dev")
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three red squares"]

#: dense bf16 tensor-core TFLOPS by a substring of ``torch.cuda.get_device_name()``; the first match wins (specific
#: names first). The vendors' data sheets (without sparsity).
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0))

#: per setup: samples an iteration, group size, training micro-batch, CFG/guidance scale; smoke: resolution too
SIZES = {"sd35m": {"batch": 16, "group": 8, "micro": 8, "guidance": 4.5, "resolution": 512},
         "flux_dev": {"batch": 8, "group": 4, "micro": 4, "guidance": 3.5, "resolution": 512}}
SMOKE_SIZES = {"sd35m": {"batch": 4, "group": 2, "micro": 4, "guidance": 4.5, "resolution": 32},
               "flux_dev": {"batch": 4, "group": 2, "micro": 4, "guidance": 3.5, "resolution": 16}}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak: ``override`` if given, else from :data:`PEAK_BF16_TFLOPS` (None: unknown)."""
    if override is not None:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


# ---------------------------------------------------------------------------------------------- building
def build_flux_dev(path: Path) -> dict:
    """FLUX.1-dev's transformer and VAE at full size with random weights, small random text encoders of the real
    widths (CLIP 768 pooled, T5 4096 per token, 512 T5 tokens), saved in bfloat16. Returns parameter counts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from memory import save_in
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flowrl.policy.tiny.flux import FLUX_SCHEDULER_CONFIG, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR
    from flowrl.policy.tiny.text import BOS, DEFAULT_WORDS, EOS, build_t5_tokenizer, build_word_tokenizer

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                            scaling_factor=FLUX_VAE_SCALING_FACTOR, shift_factor=FLUX_VAE_SHIFT_FACTOR,
                            use_quant_conv=False, use_post_quant_conv=False)
        tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=77)
        eos = tokenizer.convert_tokens_to_ids(EOS)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=eos, pad_token_id=eos))
        tokenizer_2 = build_t5_tokenizer(DEFAULT_WORDS, model_max_length=512)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8,
            feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id))
    finally:
        torch.set_default_dtype(default)
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae,
                            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                            transformer=transformer)
    counts = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    save_in(pipeline, path, "bfloat16")
    return counts


def build_setup(setup: str, path: Path, smoke: bool) -> dict:
    """Saves the setup's pipeline to ``path`` (tiny ones under ``smoke``); its parameter counts. The full-size
    weights are initialised on the GPU where there is one (minutes on a CPU for FLUX's 12B)."""
    if smoke:
        from flowrl.policy.tiny.flux import build as build_tiny_flux
        from flowrl.policy.tiny.sd3 import build_tiny_sd3_pipeline

        pipeline = build_tiny_sd3_pipeline(seed=0) if setup == "sd35m" else build_tiny_flux(seed=0)
        pipeline.save_pretrained(path)
        return {"transformer": sum(p.numel() for p in pipeline.transformer.parameters())}
    from memory import build_sd35_medium

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        counts = build_sd35_medium(path) if setup == "sd35m" else build_flux_dev(path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


# ---------------------------------------------------------------------------------------------- measuring
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call_tflop(kwargs: dict, grad: bool, parameters: int, patch_size: int) -> float:
    """Model TFLOP of one transformer call: 2 x parameters x tokens (image tokens after patching, a 4-d latent
    ``(B, C, H, W)`` or packed ``(B, N, C)``, plus the text tokens), x3 with autograd on (forward + backward)."""
    hidden = kwargs["hidden_states"]
    image = hidden.shape[0] * hidden.shape[2] * hidden.shape[3] // patch_size ** 2 if hidden.dim() == 4 \
        else hidden.shape[0] * hidden.shape[1]
    text = kwargs.get("encoder_hidden_states")
    tokens = image + (text.shape[0] * text.shape[1] if isinstance(text, torch.Tensor) else 0)
    return 2.0 * parameters * tokens * (3 if grad else 1) / 1e12


class Recorder:
    """Keeps the transformer's calls (inputs cloned, grad mode, autocast dtype) while ``capture`` is on: the eager
    run's first measured iteration, replayed as the floor and counted for the model FLOPs."""

    def __init__(self, transformer, device_type: str):
        self.capture = False
        self.calls: list[dict] = []
        self.device_type = device_type
        transformer.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if self.capture:
            kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            on = torch.is_autocast_enabled(self.device_type)
            self.calls.append({"kwargs": kw, "grad": torch.is_grad_enabled(),
                               "autocast": torch.get_autocast_dtype(self.device_type) if on else None})


def replay_floor(transformer, calls: list[dict], device_type: str) -> float:
    """Seconds of the recorded calls alone, eager (compilation forced off), a backward through each call that had
    grad, synchronised at both ends."""
    _sync()
    start = time.perf_counter()
    for call in calls:
        with torch.set_grad_enabled(call["grad"]), torch.compiler.set_stance("force_eager"), torch.autocast(
                device_type, dtype=call["autocast"] or torch.bfloat16, enabled=call["autocast"] is not None):
            out = transformer(**call["kwargs"])
            out = out[0] if isinstance(out, tuple) else out.sample
            if call["grad"]:
                out.float().sum().backward()
    _sync()
    seconds = time.perf_counter() - start
    for p in transformer.parameters():
        p.grad = None
    return seconds


def make_clock(recorder: Recorder, transformer, iterations: int, floor_calls: list[dict] | None):
    """A Lightning callback timing each measured iteration (after one warm-up), the peak GPU memory within it, and,
    right after it, one replay of the floor calls (the eager run's; drift cancels in their ratio)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.seen, self.times, self.replays, self.peaks = 0, [], [], []
            self.graphs_at_start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.seen == 1:
                self.graphs_at_start = pl_module.policy.compile_stats().get("perf/compiled_graphs", 0.0)
            recorder.capture = self.seen == 1 and floor_calls is None
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            now = time.perf_counter()
            measured, self.seen = self.seen >= 1, self.seen + 1
            recorder.capture = False
            if not measured:
                return
            self.times.append(now - self.start)
            self.peaks.append(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
            self.replays.append(replay_floor(transformer, floor_calls or recorder.calls, recorder.device_type))
            if self.seen == 1 + iterations:
                trainer.should_stop = True

    return Clock()


def precision(smoke: bool) -> str:
    """bf16-mixed with a bf16 base; the smoke run in float32 (bf16 matmuls of tiny shapes crawl on CPUs without
    native bf16, and the smoke checks the code path, not the numbers)."""
    return "32-true" if smoke else "bf16-mixed"


def run_args(setup: str, algorithm: str, path: Path, smoke: bool, compile_mode: str | None) -> list[str]:
    """``flowrl fit`` arguments of one run: the algorithm's toy file with the model, LoRA, precision, size and
    reward of the benchmark (one optimizer step an iteration)."""
    s = (SMOKE_SIZES if smoke else SIZES)[setup]
    steps = 3 if smoke else 10
    args = ["--config", str(TOY / f"{algorithm}.yaml"),
            f"--trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}", f"--trainer.precision={precision(smoke)}",
            "--trainer.max_steps=1000", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--model.policy.pretrained_model_name_or_path={path}", "--model.policy.finetune_type=lora",
            "--model.policy.lora_rank=32", "--model.policy.lora_alpha=64", f"--model.policy.frozen_dtype={'float32' if smoke else 'bfloat16'}",
            "--model.policy.gradient_checkpointing=true", f"--model.resolution={s['resolution']}",
            f"--model.eval.resolution={s['resolution']}", f"--model.guidance_scale={s['guidance']}",
            "--model.rewards=[{name: jpeg_compressibility}]", f"--model.num_inference_steps={steps}",
            f"--model.group_size={s['group']}", f"--data.batch_size={s['batch']}",
            f"--model.train_batch_size={s['micro']}",
            f"--model.gradient_accumulation_steps={max(1, s['batch'] // s['micro'])}",
            "--data.train_prompts=[" + ", ".join(repr(p) for p in PROMPTS) + "]"]
    if algorithm == "grpo":
        args.append("--model.train_steps=[0, 1]")  # the toy's: the two noisiest steps SDE and trained
    if algorithm in ("nft", "awm") and smoke:
        args.append("--model.num_train_timesteps=1")  # 0.3 of 3 steps leaves one (10 steps: the toy's 3)
    if compile_mode:
        args.append(f"--model.policy.compile={compile_mode}")
    return args


def run(setup: str, algorithm: str, path: Path, iterations: int, smoke: bool, device: str, peak: float | None,
        compile_mode: str | None = None, floor_calls: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """One configuration; ``floor_calls``: the eager run's recorded calls (None: this is the eager run, which
    records them). Returns the record and the calls."""
    from flowrl.cli import main

    cli = main(run_args(setup, algorithm, path, smoke, compile_mode), run=False)
    module, trainer = cli.model, cli.trainer
    transformer = module.policy.transformer
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    recorder = Recorder(transformer, device_type)
    clock = make_clock(recorder, transformer, iterations, floor_calls)
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=cli.datamodule)
    calls = floor_calls or recorder.calls
    parameters = sum(p.numel() for p in transformer.parameters())
    patch = getattr(transformer.config, "patch_size", 1) or 1
    tflop = sum(call_tflop(c["kwargs"], c["grad"], parameters, patch) for c in calls)
    seconds = statistics.median(clock.times)
    stats = module.policy.compile_stats()
    images = (SMOKE_SIZES if smoke else SIZES)[setup]["batch"]
    achieved = tflop / seconds
    record = {
        "algorithm": algorithm, "setup": setup, "compiled": compile_mode is not None, "compile_mode": compile_mode,
        "device": device, "precision": precision(smoke), "resolution": (SMOKE_SIZES if smoke else SIZES)[setup]["resolution"],
        "smoke": smoke, "lora_rank": 32, "iterations": iterations, "images_per_iteration": images,
        "seconds_per_iteration": seconds, "iteration_seconds": [round(t, 4) for t in clock.times],
        "images_per_second": images / seconds,
        "peak_memory_gib": max(clock.peaks) if clock.peaks[0] is not None else None,
        "transformer_parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in module.policy.trainable_parameters()),
        "transformer_calls_per_iteration": len(calls),
        "model_tflop_per_iteration": tflop, "achieved_tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "eager_floor_seconds": statistics.median(clock.replays),
        "floor_seconds": [round(t, 4) for t in clock.replays],
        "ratio_to_eager_floor": statistics.median(t / f for t, f in zip(clock.times, clock.replays)),
        "compile_seconds": stats.get("perf/compile_seconds", 0.0),
        "compiled_graphs": int(stats.get("perf/compiled_graphs", 0)),
        "recompiles_after_warmup": int(stats.get("perf/compiled_graphs", 0) - clock.graphs_at_start),
    }
    del cli, module, trainer, transformer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record, calls


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "nft", "awm"], choices=["grpo", "nft", "awm"])
    parser.add_argument("--compile", nargs="*", default=["rollout", "all"], choices=["rollout", "all"],
                        help="policy.compile modes run after each eager run (none: eager only)")
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 TFLOPS, where its name is not in PEAK_BF16_TFLOPS")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code path in seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.json")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        from flowrl.errors import ConfigError

        raise ConfigError("benchmarks/gpu.py needs a CUDA GPU; run it on one, or pass --smoke for the CPU check")
    args.out = args.out.resolve()  # the runs work in a temporary directory
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        from flowrl.precision import cpu_description

        device = cpu_description()["model_name"]
    peak = peak_tflops(device, args.peak_tflops) if torch.cuda.is_available() else args.peak_tflops
    out = {"device": device, "torch": torch.__version__, "command": "python benchmarks/gpu.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "peak_tflops": peak, "parameters": {}, "results": []}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for setup in args.setups:
                path = Path(tmp) / setup
                out["parameters"][setup] = build_setup(setup, path, args.smoke)
                os.chdir(tmp)
                for algorithm in args.algorithms:
                    eager, calls = run(setup, algorithm, path, args.iterations, args.smoke, device, peak)
                    _report(eager, out, args.out)
                    for mode in args.compile:
                        r, _ = run(setup, algorithm, path, args.iterations, args.smoke, device, peak, mode, calls)
                        saved = eager["seconds_per_iteration"] - r["seconds_per_iteration"]
                        r["break_even_iterations"] = r["compile_seconds"] / saved if saved > 0 else None
                        _report(r, out, args.out)
                os.chdir(cwd)
        finally:
            os.chdir(cwd)
    return out


def _report(record: dict, out: dict, path: Path) -> None:
    """Appends ``record``, rewrites the JSON (a timeout keeps what finished) and prints one line."""
    out["results"].append(record)
    path.write_text(json.dumps(out, indent=2) + "\n")
    mfu = f"{record['mfu']:.3f}" if record["mfu"] is not None else "n/a"
    mem = f"{record['peak_memory_gib']:.1f} GiB" if record["peak_memory_gib"] is not None else "n/a"
    print(f"{record['setup']:8s} {record['algorithm']:5s} {record['compile_mode'] or 'eager':7s} "
          f"{record['seconds_per_iteration']:.3f} s/it, {record['images_per_second']:.2f} img/s, peak {mem}, "
          f"MFU {mfu}, eager floor {record['eager_floor_seconds']:.3f} s, ratio {record['ratio_to_eager_floor']:.3f}"
          + (f", compile {record['compile_seconds']:.1f} s" if record["compiled"] else ""), flush=True)


if __name__ == "__main__":
    main_()
