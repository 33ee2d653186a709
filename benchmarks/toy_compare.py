"""GRPO vs DiffusionNFT vs AWM on the toy world, under the same wall-clock budget.

Each method runs its shipped config (``lightning_configs/toy/{grpo,nft,awm}.yaml``) through
``flowrl.cli.main`` from the same seed (same prompts in the same order, same starting weights) for
``--minutes`` of *training* wall time. In-training validation is switched off; instead the weights
that the config's validation would use (the EMA average when the config has an ``callbacks.EMA``
that swaps for validation, else the live weights) are snapshotted at ``--points`` evenly spaced
moments of the budget, and every snapshot is evaluated afterwards on the held-out prompts (the
config's ``data.val_prompts``, ``toy:eval``: 32 per category; strict verifier accuracy as GenEval).
Evaluation time is therefore not charged to any method.

Writes ``--out`` (JSON: per method, held-out accuracy per category and overall, against training
seconds, samples generated and iterations) and the same name with ``.png`` (accuracy vs wall time
and vs samples). Needs the shipped toy checkpoint (``flowrl/toy/checkpoint``).

    python benchmarks/toy_compare.py                       # 15 minutes per method
    python benchmarks/toy_compare.py --minutes 2 --points 2   # a smoke run

Not a test: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks import EMA  # noqa: E402
from flowrl.cli import main  # noqa: E402
from flowrl.toy import TOY_CHECKPOINT  # noqa: E402

CONFIGS = {
    "grpo": ROOT / "lightning_configs" / "toy" / "grpo.yaml",
    "nft": ROOT / "lightning_configs" / "toy" / "nft.yaml",
    "awm": ROOT / "lightning_configs" / "toy" / "awm.yaml",
}
ACCURACY_KEY = "val/shapes_acc_overall"


class WallClockBudget(L.Callback):
    """Stops training after ``budget_s`` seconds spent in training batches and snapshots the weights
    that validation would use at ``num_points`` evenly spaced moments (plus one before training)."""

    def __init__(self, budget_s: float, num_points: int, eval_weights: str = "as_configured"):
        self.budget_s, self.num_points, self.eval_weights = float(budget_s), int(num_points), eval_weights
        self.train_seconds = 0.0
        self.samples = 0
        self.snapshots: list[dict] = []
        self._batch_start = 0.0
        self._next = 1

    def _weights(self, trainer, pl_module) -> tuple[dict[str, torch.Tensor], str]:
        if self.eval_weights == "as_configured":
            ema = EMA.used_for_validation(trainer.callbacks)
            if ema is not None:
                return {n: t.detach().cpu().clone() for n, t in ema.averaged_parameters.items()}, "ema"
        live = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        return live, "live"

    def _snapshot(self, trainer, pl_module) -> None:
        weights, kind = self._weights(trainer, pl_module)
        self.snapshots.append({
            "train_seconds": self.train_seconds,
            "samples": self.samples,
            "iterations": int(getattr(pl_module, "iteration", 0)),
            "optimizer_steps": int(trainer.global_step),
            "weights_kind": kind,
            "weights": weights,
        })

    def on_train_start(self, trainer, pl_module):
        self._snapshot(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Runs after the other callbacks (appended last), so an EMA update of this batch is included.
        self.train_seconds += time.perf_counter() - self._batch_start
        self.samples += len(batch["prompt"]) * trainer.world_size
        while self._next <= self.num_points and self.train_seconds >= self.budget_s * self._next / self.num_points:
            self._snapshot(trainer, pl_module)
            self._next += 1
        if self.train_seconds >= self.budget_s:
            trainer.should_stop = True


def evaluate(module, datamodule, weights: dict[str, torch.Tensor], precision: str) -> dict[str, float]:
    """Held-out metrics of ``module`` with ``weights`` loaded into its trained parameters."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, callbacks=[],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.last_validation_metrics)


def run_method(name: str, args, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)  # the configs' runs/ and logs land here
    try:
        overrides = [
            "--config", str(CONFIGS[name]),  # run=False: no subcommand; fit is called below
            f"--seed_everything={args.seed}", f"--model.seed={args.seed}", f"--data.seed={args.seed}",
            "--trainer.max_steps=-1", "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
        ]
        if args.max_val_prompts is not None:
            overrides.append(f"--data.max_val_prompts={args.max_val_prompts}")
        if args.val_samples_per_prompt is not None:
            overrides.append(f"--data.val_samples_per_prompt={args.val_samples_per_prompt}")
        overrides += args.override.get(name, [])
        cli = main(overrides, run=False)
        budget = WallClockBudget(args.minutes * 60.0, args.points, args.eval_weights)
        cli.trainer.callbacks.append(budget)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        precision = str(cli.trainer.precision)
        points = []
        for snap in budget.snapshots:
            t0 = time.perf_counter()
            metrics = evaluate(cli.model, cli.datamodule, snap.pop("weights"), precision)
            snap.update(metrics, eval_seconds=time.perf_counter() - t0)
            points.append(snap)
            print(f"[{name}] t={snap['train_seconds']:.0f}s samples={snap['samples']} it={snap['iterations']} "
                  f"acc={metrics.get(ACCURACY_KEY, float('nan')):.3f} reward={metrics.get('val/reward', float('nan')):.3f}",
                  flush=True)
        iterations = int(cli.model.iteration)
        return {
            "config": str(CONFIGS[name].relative_to(ROOT)),
            "overrides": overrides[2:],
            "train_seconds": budget.train_seconds,
            "fit_seconds": fit_seconds,
            "iterations": iterations,
            "samples": budget.samples,
            "seconds_per_iteration": budget.train_seconds / max(iterations, 1),
            "points": points,
        }
    finally:
        os.chdir(cwd)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results["methods"].items():
        pts = res["points"]
        acc = [p.get(ACCURACY_KEY, float("nan")) for p in pts]
        axes[0].plot([p["train_seconds"] / 60 for p in pts], acc, marker="o", label=name)
        axes[1].plot([p["samples"] for p in pts], acc, marker="o", label=name)
    axes[0].set_xlabel("training wall time (min)")
    axes[1].set_xlabel("samples generated")
    for ax in axes:
        ax.set_ylabel("held-out accuracy (overall)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"toy world, {results['minutes']:g} min per method, seed {results['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget per method")
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--points", type=int, default=6, help="evaluated snapshots per method (plus the start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-val-prompts", type=int, default=None, help="evaluate on the first N validation prompts only (toy:eval is sorted by category: biased)")
    p.add_argument("--val-samples-per-prompt", type=int, default=None, help="default: the config's data.val_samples_per_prompt")
    p.add_argument("--eval-weights", choices=["as_configured", "live"], default="as_configured",
                   help="as_configured: the EMA average where the config validates with it; live: the trained weights")
    p.add_argument("--override", action="append", default=[], metavar="METHOD:--key=value",
                   help="extra CLI override for one method, e.g. nft:--model.nft_beta=0.1 (repeatable)")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "runs" / "toy_compare")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "toy_compare.json")
    args = p.parse_args(argv)
    per_method: dict[str, list[str]] = {}
    for item in args.override:
        method, sep, flag = item.partition(":")
        if not sep or method not in CONFIGS:
            p.error(f"--override {item!r}: expected METHOD:--key=value with METHOD in {list(CONFIGS)}")
        per_method.setdefault(method, []).append(flag)
    args.override = per_method
    return args


def main_(argv=None) -> dict:
    args = parse_args(argv)
    own_model = {m for m in args.methods if any("pretrained_model_name_or_path" in o for o in args.override.get(m, []))}
    if set(args.methods) - own_model and not (TOY_CHECKPOINT / "model_index.json").exists():
        raise SystemExit(f"the toy checkpoint {TOY_CHECKPOINT} is missing; train it first (flowrl/toy/pretrain.py)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {
        "minutes": args.minutes,
        "seed": args.seed,
        "threads": args.threads,
        "eval_weights": args.eval_weights,
        "max_val_prompts": args.max_val_prompts,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(),
        "torch": torch.__version__,
        "accuracy_key": ACCURACY_KEY,
        "methods": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        results["methods"][name] = run_method(name, args, args.workdir / name)
        args.out.write_text(json.dumps(results, indent=2))  # partial results survive an interruption
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main_()
