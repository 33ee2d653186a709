"""Memory of one GRPO iteration: LoRA vs full fine-tuning, with and without the KL reference, EMA, the frozen
base in bf16.

Each configuration runs in its own process on a mid-sized random SD3 transformer (built from a config, nothing
downloaded), so its numbers do not mix with the others'. Two measures:

* ``state_mib``: the bytes of the tensors the run keeps, counted on the objects after one optimizer step:
  transformer parameters, gradients, optimizer state, the EMA's shadow copy, the KL reference's copy (a LoRA
  run's reference is the adapter-disabled network: no copy);
* ``peak_rss_mib``: the process's peak resident memory (``getrusage``; libraries, loading and training), and
  ``peak_rss_delta_mib``: how far the iteration pushed it above the peak reached while building the module
  (activations, temporaries, gradients, optimizer state, copies; 0 when loading peaked higher).

A CPU has one device, so "reference / EMA on the CPU vs on the model's device" are the same here; on a GPU
their copies move off the accelerator (``ref_param_device`` / ``ema_device: cpu``).

``sharded``: full fine-tuning with EMA and a full-copy KL reference on 1 process and on 2 FSDP2 processes
(``callbacks.FSDP2Strategy``, gloo), for the toy model and the SD3 above: each process's bytes of parameters,
gradients, optimizer state, EMA and reference (its shards under FSDP2; about half of the one-process figures).

``memory_options``: the LoRA iteration with the rollout's memory options (``latent_storage_dtype``,
``offload_rollout``): its peak, the bytes the rollout stores, and the first update's ratio deviation (0: exact).

``load``: building the policy (LoRA with a bf16 base; full fine-tuning with bf16 frozen parts) as flowrl did before
(every component loaded in float32, then cast) and lean (each component loaded in its training dtype), from files
saved in bfloat16 and in float32, each in a fresh process (:func:`measure_load`): the peak resident increase over
the bytes of the weights in their training dtypes, and its process-private (anonymous) part. ``load_sd35_medium``
(``--parts sd35``, about 16 GB of RAM at its peak, skipped under 14 GB available): the same for an
SD3.5-Medium-sized pipeline of random weights (:func:`build_sd35_medium`).
Writes ``benchmarks/memory.json`` (the parts not run keep their last results).

    python benchmarks/memory.py [--layers 12] [--width 384] [--parts training,options,load,sd35]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "lora": {"finetune_type": "lora"},
    "lora_bf16_base": {"finetune_type": "lora", "frozen_dtype": "bfloat16"},
    "lora_kl_reference": {"finetune_type": "lora", "reference": True},
    "full": {"finetune_type": "full"},
    "full_kl_reference": {"finetune_type": "full", "reference": True},
    "full_ema": {"finetune_type": "full", "ema": True},
}


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


SHARDED = {"full_ema_reference": {"finetune_type": "full", "ema": True, "reference": True}}

#: the rollout's memory options, each on the LoRA iteration of ``lora`` above
OPTIONS = {
    "rollout_float32": {"finetune_type": "lora"},
    "rollout_bf16_latents": {"finetune_type": "lora", "latent_storage_dtype": "bfloat16"},
    "rollout_fp16_latents": {"finetune_type": "lora", "latent_storage_dtype": "float16"},
    "rollout_offload": {"finetune_type": "lora", "offload_rollout": True},
    "rollout_bf16_offload": {"finetune_type": "lora", "latent_storage_dtype": "bfloat16", "offload_rollout": True},
}


def _bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (a DTensor counts its local shard)."""
    from callbacks._swap import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def measure(name: str, path: str, processes: int = 1) -> dict:
    """One configuration, in this process (and, with ``processes=2``, the FSDP2 process Lightning starts by running
    this script again): build, one iteration, count."""
    import lightning as L
    import torch

    from callbacks import EMA, FSDP2Strategy, ReferenceModel
    from flowrl.algorithms import GRPO
    from flowrl.data import PromptDataModule
    from flowrl.policy import PolicyConfig
    from flowrl.rewards import RewardSpec

    torch.set_num_threads(2 // processes)
    spec = {**CONFIGS, **SHARDED, **OPTIONS}[name]
    policy = PolicyConfig(path, finetune_type=spec["finetune_type"], lora_rank=16,
                          frozen_dtype=spec.get("frozen_dtype", "float32"))
    module = GRPO(policy=policy, rewards=[RewardSpec("jpeg_compressibility")], group_size=2,
                  resolution=32 if path == "flowrl:toy" else 64,
                  num_inference_steps=4, guidance_scale=3.0, train_batch_size=4, clip_range=1e-2,
                  latent_storage_dtype=spec.get("latent_storage_dtype", "float32"),
                  offload_rollout=spec.get("offload_rollout", False))
    rollouts = []  # the iteration's rollout, to count what it stores
    draw = module.rollout
    module.rollout = lambda *a, **k: rollouts.append(draw(*a, **k)) or rollouts[-1]
    callbacks = []
    if spec.get("reference"):
        callbacks.append(ReferenceModel(kl_beta=0.01, ref_param_device="cpu"))
    if spec.get("ema"):
        callbacks.append(EMA(ema_decay=0.9, ema_device="cpu"))
    prompts = Path(tempfile.mkdtemp()) / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parallel = {"devices": 2, "strategy": FSDP2Strategy()} if processes == 2 else {}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, **parallel)
    trainer.fit(module, datamodule=PromptDataModule(str(prompts), group_size=2, batch_size=4 // processes))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    transformer = module.policy.transformer
    params = _bytes(transformer.parameters())
    trainable = list(module.policy.trainable_parameters())
    grads = _bytes(trainable)  # zeroed to None after the step: their size
    optim = _bytes(t for state in trainer.optimizers[0].state.values()
                   for t in state.values() if isinstance(t, torch.Tensor) and t.dim())
    # the callbacks' copies (their private dicts: what they hold, not what a checkpoint would write)
    ema = _bytes(t for cb in callbacks if isinstance(cb, EMA) for t in cb._ema.values())
    ref = _bytes(t for cb in callbacks if isinstance(cb, ReferenceModel) for t in cb._ref.values())
    state = params + grads + optim + ema + ref
    stored = [getattr(rollouts[0], f) for f in ("latents", "next_latents", "log_probs", "means", "v_uncond", "final")]
    stored = sum(getattr(t, "nbytes", None) or t.numel() * t.element_size() for t in stored if t is not None)
    return {"config": name, **spec, "processes": processes, "rank": trainer.global_rank,
            "rollout_stored_kib": round(stored / 1024, 1),
            "ratio_first_update_max_abs_dev": float(trainer.logged_metrics["train/ratio_first_update_max_abs_dev"]),
            "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "state_mib": _mib(state), "parameters_mib": _mib(params), "gradients_mib": _mib(grads),
            "optimizer_mib": _mib(optim), "ema_mib": _mib(ema), "reference_mib": _mib(ref),
            "peak_rss_mib": round(peak / 1024, 1), "peak_rss_delta_mib": round((peak - built) / 1024, 1)}


def build(path: Path, layers: int, width: int, dtype: str = "float32") -> None:
    """The mid-sized random SD3, saved with its weights in ``dtype``."""
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    heads = max(1, width // 32)
    save_in(build_tiny_sd3_pipeline(seed=0, sample_size=64, num_layers=layers, attention_head_dim=width // heads,
                                    num_attention_heads=heads, text_hidden_size=width // 2, vae_channels=8,
                                    vae_downsample=2), path, dtype)


def _json_rows(out: str) -> list[dict]:
    """Every JSON object the child processes printed: two ranks writing to one pipe at once may put two on a line."""
    decoder, rows = json.JSONDecoder(), []
    for line in out.splitlines():
        i = line.find("{")
        while i != -1:
            row, end = decoder.raw_decode(line, i)
            rows.append(row)
            i = line.find("{", end)
    return rows


def run_one(name: str, path: str, processes: int) -> list[dict]:
    """One configuration in a fresh process (each FSDP2 process prints its own line)."""
    out = subprocess.run([sys.executable, __file__, "--one", name, path, str(processes)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                         if processes > 1 else None).stdout
    rows = _json_rows(out)
    for row in rows:
        print(row, flush=True)
    return sorted(rows, key=lambda r: r["rank"])


# ---------------------------------------------------------------------------------------------- loading
#: how each load row builds the policy: (finetune_type, frozen_dtype); LoRA rank 32, as the real-model configs
LOADS = {"lora_bf16": ("lora", "bfloat16"), "full_bf16": ("full", "bfloat16")}


def _proc_status() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon and RssFile of this process, MiB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        rows = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(rows[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def _unique_tensors(module):
    """Every parameter and buffer of ``module`` once (tied weights share their storage)."""
    import itertools

    seen = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        seen.setdefault((t.data_ptr(), t.dtype, t.numel()), t)
    return list(seen.values())


def measure_load(path: str, finetune_type: str, frozen_dtype: str, lean: bool, warm: str, lora_rank: int = 32) -> dict:
    """Peak resident memory of building the policy from ``path`` in this process (a fresh one): today's load
    (``lean=False``: every component in float32, then cast to its training dtype) or the lean one.

    A first build from ``warm`` (a tiny pipeline of the same classes) runs the lazy imports and first-call
    allocations; the peak (VmHWM) is then reset (``/proc/self/clear_refs``) and measured over the build and a read
    of every weight's pages (weights loaded straight from a file in their own dtype stay mapped to it, and count
    only once read). ``ratio``: the peak increase over the bytes of the policy's weights in their training dtypes.
    ``anon_peak_increase_mib``: the process-private part (sampled every 2 ms), without the file's mapped pages."""
    import gc
    import threading
    import time

    import torch

    import flowrl.policy.policy as policy_module
    from flowrl.policy import FlowMatchingPolicy, PolicyConfig

    torch.set_num_threads(2)
    lean_dtypes = policy_module.load_dtypes

    def build_policy(p):
        policy_module.load_dtypes = lean_dtypes if lean else (lambda config, name: None)  # None: all float32
        try:
            return FlowMatchingPolicy.from_config(PolicyConfig(p, finetune_type=finetune_type,
                                                               frozen_dtype=frozen_dtype, lora_rank=lora_rank))
        finally:
            policy_module.load_dtypes = lean_dtypes

    build_policy(warm)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _proc_status()
    anon = [before["RssAnon"]]
    done = threading.Event()

    def sample():
        while not done.wait(0.002):
            anon.append(_proc_status()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    policy = build_policy(path)
    seconds = time.perf_counter() - start
    tensors = _unique_tensors(policy)
    for t in tensors:  # one element per page: every page of every weight resident
        t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    done.set()
    sampler.join()
    after = _proc_status()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    peak = after["VmHWM"] - before["VmRSS"]
    return {"finetune_type": finetune_type, "frozen_dtype": frozen_dtype, "path": "lean" if lean else "float32_then_cast",
            "weights_mib": round(weights / 2**20, 1), "peak_increase_mib": round(peak, 1),
            "ratio": round(peak * 2**20 / weights, 3),
            "anon_peak_increase_mib": round(max(anon) - before["RssAnon"], 1),
            "resident_after_mib": round(after["VmRSS"] - before["VmRSS"], 1), "load_seconds": round(seconds, 2),
            "weight_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})}


def run_load(path: str, finetune_type: str, frozen_dtype: str, lean: bool, warm: str, lora_rank: int = 32,
             keep_free_mib: float = 1024) -> dict:
    """:func:`measure_load` in a fresh process. The machine is shared: should its available memory fall under
    ``keep_free_mib`` the child is stopped and the row says so."""
    import time

    cmd = [sys.executable, __file__, "--load", path, finetune_type, frozen_dtype, str(int(lean)), warm, str(lora_rank)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stopped = False
    while child.poll() is None:
        if available_mib() < keep_free_mib:
            child.kill()
            stopped = True
        time.sleep(0.2)
    out = child.stdout.read()
    rows = _json_rows(out)
    if stopped or not rows:
        return {"finetune_type": finetune_type, "frozen_dtype": frozen_dtype,
                "path": "lean" if lean else "float32_then_cast",
                "skipped": "stopped: the machine's available memory fell under 1 GiB" if stopped else "failed"}
    print(rows[0], flush=True)
    return rows[0]


def available_mib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as f:
        rows = dict(line.split(":", 1) for line in f)
    return int(rows["MemAvailable"].split()[0]) / 1024


def save_in(pipeline, path: Path, dtype: str) -> None:
    """``save_pretrained`` with the weights in ``dtype`` (the hub ships SD3.5, FLUX, Qwen-Image in half precision)."""
    import torch

    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(getattr(torch, dtype))
    pipeline.save_pretrained(path)


def load_rows(tmp: Path, layers: int, width: int) -> list[dict]:
    """Every :data:`LOADS` row, today's path and the lean one, from files in bfloat16 and in float32."""
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    warm = tmp / "warm"
    build_tiny_sd3_pipeline(seed=0, sample_size=16, num_layers=1, vae_channels=8).save_pretrained(warm)
    rows = []
    for files in ("bfloat16", "float32"):
        path = tmp / f"files_{files}"
        build(path, layers, width, dtype=files)
        for finetune_type, frozen_dtype in LOADS.values():
            for lean in (False, True):
                row = run_load(str(path), finetune_type, frozen_dtype, lean, str(warm))
                rows.append({"model": f"sd3 {layers} layers x {width}", "files": files, **row})
    return rows


def build_sd35_medium(path: Path) -> dict:
    """An SD3.5-Medium-sized pipeline with random weights, from its configuration (nothing downloaded): the
    2.24B-parameter MMDiT-X transformer (24 layers, 13 dual-attention ones, RMS QK norm), CLIP-L and CLIP-G at full
    width, the SD3 VAE, no T5; built and saved in bfloat16, the dtype of the published files (the float32 build
    would need 13 GB here)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from flowrl.policy.tiny.text import BOS, DEFAULT_WORDS, EOS, build_word_tokenizer

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
        tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=77)
        ids = {"bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
               "pad_token_id": tokenizer.convert_tokens_to_ids(EOS)}
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", **ids))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", **ids))
    finally:
        torch.set_default_dtype(default)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g,
        tokenizer_2=build_word_tokenizer(DEFAULT_WORDS, model_max_length=77), text_encoder_3=None, tokenizer_3=None)
    counts = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    save_in(pipeline, path, "bfloat16")
    return counts


def sd35_rows(tmp: Path, min_free_mib: float = 14 * 1024) -> dict:
    """The SD3.5-Medium-size build (:func:`build_sd35_medium`) loaded by today's path and the lean one, LoRA rank
    32 with a bf16 base (``lightning_configs/sd35/grpo.yaml``), each in a fresh process; skipped (and said so) when
    the machine has less than ``min_free_mib`` available."""
    free = available_mib()
    if free < min_free_mib:
        return {"skipped": f"{free / 1024:.1f} GiB available, under the {min_free_mib / 1024:.0f} GiB this needs"}
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    warm = tmp / "warm_sd35"
    build_tiny_sd3_pipeline(seed=0, sample_size=16, num_layers=1, vae_channels=8).save_pretrained(warm)
    path = tmp / "sd35_medium"
    counts = build_sd35_medium(path)
    rows = [run_load(str(path), "lora", "bfloat16", lean, str(warm)) for lean in (False, True)]
    return {"parameters": counts, "files": "bfloat16", "available_mib_before": round(free), "rows": rows}


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=384, help="attention width (heads x head dim)")
    parser.add_argument("--parts", default="training,options,load",
                        help="comma list of: training (the configurations and FSDP2), options (the rollout's memory "
                             "options), load (today's load vs the lean one), sd35 (the SD3.5-Medium-size load: "
                             "~16 GB of RAM, minutes); the JSON keeps the other parts' last results")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory.json")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "PATH", "PROCESSES"), help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one configuration, its JSON on stdout (each process its line)
        name, path, processes = args.one
        print(json.dumps(measure(name, path, int(processes))), flush=True)
        return {}
    if args.load:  # a child process: one load
        path, finetune_type, frozen_dtype, lean, warm, rank = args.load
        print(json.dumps(measure_load(path, finetune_type, frozen_dtype, lean == "1", warm, int(rank))), flush=True)
        return {}
    from flowrl.precision import cpu_description

    parts = set(args.parts.split(","))
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out.update({"cpu": cpu_description(), "layers": args.layers, "width": args.width})
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        if parts & {"training", "options"}:
            build(Path(model), args.layers, args.width)
        if "training" in parts:
            out.update(training(model))
        if "options" in parts:
            out["memory_options"] = [row for name in OPTIONS for row in run_one(name, model, 1)]
        if "load" in parts:
            out["load"] = load_rows(Path(tmp), args.layers, args.width)
        if "sd35" in parts:
            out["load_sd35_medium"] = sd35_rows(Path(tmp))
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def training(model: str) -> dict:
    """The training configurations (:data:`CONFIGS`) and the FSDP2 rows (:data:`SHARDED`), with their summary."""
    results, sharded = [], []
    for name in CONFIGS:
        results += run_one(name, model, 1)
    for path in ("flowrl:toy", model):
        for processes in (1, 2):
            rows = run_one("full_ema_reference", path, processes)
            sharded += [{**r, "model": "toy" if path == "flowrl:toy" else "sd3"} for r in rows]
    lora = next(r for r in results if r["config"] == "lora")
    lora_ref = next(r for r in results if r["config"] == "lora_kl_reference")
    return {"results": results, "sharded": sharded,
            "lora_reference_extra_state_fraction": (lora_ref["state_mib"] - lora["state_mib"]) / lora["state_mib"],
            "sharded_state_per_process_2_over_1": {
                m: max(r["state_mib"] for r in sharded if r["model"] == m and r["processes"] == 2)
                / next(r["state_mib"] for r in sharded if r["model"] == m and r["processes"] == 1)
                for m in ("toy", "sd3")}}


if __name__ == "__main__":
    main_()
