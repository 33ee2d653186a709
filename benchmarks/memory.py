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
Writes ``benchmarks/memory.json``.

    python benchmarks/memory.py [--layers 12] [--width 64]
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
    spec = {**CONFIGS, **SHARDED}[name]
    policy = PolicyConfig(path, finetune_type=spec["finetune_type"], lora_rank=16,
                          frozen_dtype=spec.get("frozen_dtype", "float32"))
    module = GRPO(policy=policy, rewards=[RewardSpec("jpeg_compressibility")], group_size=2,
                  resolution=32 if path == "flowrl:toy" else 64,
                  num_inference_steps=4, guidance_scale=3.0, train_batch_size=4, clip_range=1e-2)
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
    return {"config": name, **spec, "processes": processes, "rank": trainer.global_rank,
            "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "state_mib": _mib(state), "parameters_mib": _mib(params), "gradients_mib": _mib(grads),
            "optimizer_mib": _mib(optim), "ema_mib": _mib(ema), "reference_mib": _mib(ref),
            "peak_rss_mib": round(peak / 1024, 1), "peak_rss_delta_mib": round((peak - built) / 1024, 1)}


def build(path: Path, layers: int, width: int) -> None:
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    heads = max(1, width // 32)
    build_tiny_sd3_pipeline(seed=0, sample_size=64, num_layers=layers, attention_head_dim=width // heads,
                            num_attention_heads=heads, text_hidden_size=width // 2, vae_channels=8,
                            vae_downsample=2).save_pretrained(path)


def run_one(name: str, path: str, processes: int) -> list[dict]:
    """One configuration in a fresh process (each FSDP2 process prints its own line)."""
    out = subprocess.run([sys.executable, __file__, "--one", name, path, str(processes)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                         if processes > 1 else None).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        print(row, flush=True)
    return sorted(rows, key=lambda r: r["rank"])


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=384, help="attention width (heads x head dim)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory.json")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "PATH", "PROCESSES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one configuration, its JSON on stdout (each process its line)
        name, path, processes = args.one
        print(json.dumps(measure(name, path, int(processes))), flush=True)
        return {}
    results, sharded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "model", args.layers, args.width)
        for name in CONFIGS:
            results += run_one(name, str(Path(tmp) / "model"), 1)
        for model in ("flowrl:toy", str(Path(tmp) / "model")):
            for processes in (1, 2):
                rows = run_one("full_ema_reference", model, processes)
                sharded += [{**r, "model": "toy" if model == "flowrl:toy" else "sd3"} for r in rows]
    lora = next(r for r in results if r["config"] == "lora")
    lora_ref = next(r for r in results if r["config"] == "lora_kl_reference")
    from flowrl.precision import cpu_description

    summary = {"lora_reference_extra_state_fraction": (lora_ref["state_mib"] - lora["state_mib"]) / lora["state_mib"],
               "sharded_state_per_process_2_over_1": {
                   m: max(r["state_mib"] for r in sharded if r["model"] == m and r["processes"] == 2)
                   / next(r["state_mib"] for r in sharded if r["model"] == m and r["processes"] == 1)
                   for m in ("toy", "sd3")}}
    out = {"cpu": cpu_description(), "layers": args.layers, "width": args.width, "results": results,
           "sharded": sharded, **summary}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main_()
