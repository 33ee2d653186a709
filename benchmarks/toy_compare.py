"""Every toy config side by side under the same wall-clock budget, several seeds each.

Each method runs its shipped config (``lightning_configs/toy/<method>.yaml``: grpo, flow_grpo, dance_grpo,
cps_grpo, mix_grpo, grpo_guard, nft, awm, dppo, dgpo, crd, dpo, dpo_offline, opd) through ``flowrl.cli.main`` for
``--minutes`` of *training* wall time, once per seed (``--seeds``; a seed sets the prompts' order, the noise and the rollouts; every
method starts from the same shipped weights). In-training validation is switched off; instead the weights
that the config's validation would use (the EMA average when the config has an ``callbacks.EMA`` that
swaps for validation, else the live weights) are snapshotted at ``--points`` evenly spaced moments of the
budget (plus the start) and evaluated afterwards, all methods on the same held-out prompts (``toy:eval``,
32 per category, ``--val-samples-per-prompt`` each; strict verifier accuracy as GenEval) with the same
eval sampler. Evaluation time is therefore not charged to any method. Precision is the one ``flowrl fit``
picks for the CPU, the same for every method (recorded).

Writes ``--out`` (JSON: per method and seed, held-out accuracy per category and overall against training
seconds, samples and iterations; per method the mean and spread over seeds and the time to ``--target``)
and the same name with ``.png`` (overall and per-category accuracy against wall time and samples; mean
over seeds, the band is min..max), and prints the table of docs/status.md. A run already in ``--out`` with the same
budget is kept (``--fresh`` reruns it): an interrupted comparison resumes.

    python benchmarks/toy_compare.py                          # all configs, seeds 0 1, 3 minutes each
    python benchmarks/toy_compare.py --methods nft grpo --minutes 1 --points 1 --seeds 0   # a smoke run
    python benchmarks/toy_compare.py --table                  # the table of docs/status.md from the JSON

Not a test: timings depend on the machine and on whatever else runs on it; run it on an idle machine,
one method at a time (concurrent CPU jobs make torch several times slower).
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
from flowrl.precision import cpu_description  # noqa: E402
from flowrl.toy import TOY_CHECKPOINT  # noqa: E402

METHODS = ["grpo", "flow_grpo", "dance_grpo", "cps_grpo", "mix_grpo", "grpo_guard", "nft", "awm", "dppo", "dgpo", "crd",
           "dpo", "dpo_offline", "opd"]
CONFIGS = {name: ROOT / "lightning_configs" / "toy" / f"{name}.yaml" for name in METHODS}
ACCURACY_KEY = "val/shapes_acc_overall"
CATEGORIES = ["single_object", "colors", "counting", "two_objects", "position"]
VAL_PROMPTS = "toy:eval"  # every method is scored on the same held-out prompts


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


def run_method(name: str, seed: int, args, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)  # the configs' runs/ and logs land here
    try:
        overrides = [
            "--config", str(CONFIGS[name]),  # run=False: no subcommand; fit is called below
            f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
            "--trainer.max_steps=-1", "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--data.val_prompts={VAL_PROMPTS}", f"--data.val_samples_per_prompt={args.val_samples_per_prompt}",
            "--model.eval.seed=0",  # the same starting noise for every method's evaluation
        ]
        if args.max_val_prompts is not None:
            overrides.append(f"--data.max_val_prompts={args.max_val_prompts}")
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
            print(f"[{name} seed {seed}] t={snap['train_seconds']:.0f}s samples={snap['samples']} "
                  f"it={snap['iterations']} acc={metrics.get(ACCURACY_KEY, float('nan')):.3f}", flush=True)
        iterations = int(cli.model.iteration)
        return {
            "config": str(CONFIGS[name].relative_to(ROOT)),
            "seed": seed,
            "minutes": args.minutes,
            "precision": precision,
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


def time_to(points: list[dict], target: float, key: str = ACCURACY_KEY) -> float | None:
    """Training seconds at which the accuracy first reaches ``target`` (linear between snapshots), or None."""
    for prev, cur in zip(points, points[1:]):
        if cur[key] >= target:
            if prev[key] >= target:
                return prev["train_seconds"]
            frac = (target - prev[key]) / (cur[key] - prev[key])
            return prev["train_seconds"] + frac * (cur["train_seconds"] - prev["train_seconds"])
    return 0.0 if points and points[0][key] >= target else None


def summarize(runs: list[dict], target: float) -> dict:
    """Mean and spread over seeds of the final (and starting) accuracies, and the time to ``target``."""
    def stats(values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    # (a category missing from a run, e.g. with --max-val-prompts, reads NaN)
    final = {c: stats([r["points"][-1].get(f"val/shapes_acc_{c}", float("nan")) for r in runs])
             for c in CATEGORIES + ["overall"]}
    times = [time_to(r["points"], target) for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "start_overall": stats([r["points"][0][ACCURACY_KEY] for r in runs]),
        "final": final,
        "gain_overall": stats([r["points"][-1][ACCURACY_KEY] - r["points"][0][ACCURACY_KEY] for r in runs]),
        "seconds_to_target": times,
        "reached_target": sum(t is not None for t in times),
        "seconds_per_iteration": stats([r["seconds_per_iteration"] for r in runs]),
        "samples": stats([r["samples"] for r in runs]),
    }


def table(results: dict) -> str:
    """docs/status.md's markdown table: one row per method, mean over seeds (min..max)."""
    target = results["target"]
    head = ("| method | held-out accuracy after (mean, min..max) | gain | " + " | ".join(CATEGORIES)
            + f" | minutes to {target:.2f} | s / iteration | samples |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, summary in results["summary"].items():
        f = summary["final"]
        times = [t for t in summary["seconds_to_target"] if t is not None]
        n = len(summary["seeds"])
        reach = (f"{sum(times) / len(times) / 60:.1f}" + ("" if len(times) == n else f" ({len(times)}/{n} seeds)")
                 if times else f"not reached (0/{n})")
        lines.append(
            f"| {name} | {f['overall']['mean']:.3f} ({f['overall']['min']:.3f}..{f['overall']['max']:.3f}) "
            f"| {summary['gain_overall']['mean']:+.3f} | " + " | ".join(f"{f[c]['mean']:.2f}" for c in CATEGORIES)
            + f" | {reach} | {summary['seconds_per_iteration']['mean']:.1f} | {summary['samples']['mean']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("overall", "train_seconds"), ("overall", "samples")] + [(c, "train_seconds") for c in CATEGORIES]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    axes = axes.ravel()
    for name, runs in results["runs"].items():
        runs = list(runs.values())
        for ax, (cat, xkey) in zip(axes, panels):
            n = min(len(r["points"]) for r in runs)
            xs = [sum(r["points"][i][xkey] for r in runs) / len(runs) for i in range(n)]
            xs = [x / 60 for x in xs] if xkey == "train_seconds" else xs
            ys = [[r["points"][i].get(f"val/shapes_acc_{cat}", float("nan")) for r in runs] for i in range(n)]
            line, = ax.plot(xs, [sum(y) / len(y) for y in ys], marker="o", ms=3, label=name)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    for ax, (cat, xkey) in zip(axes, panels):
        ax.set_title(f"held-out accuracy: {cat}")
        ax.set_xlabel("training wall time (min)" if xkey == "train_seconds" else "samples generated")
        ax.grid(alpha=0.3)
    if results["target"] is not None:
        for ax in axes[:2]:
            ax.axhline(results["target"], color="gray", ls="--", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center")
    fig.suptitle(f"toy world: {results['minutes']:g} min of training per run, seeds {results['seeds']}, "
                 f"{results['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget per run")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--points", type=int, default=3, help="evaluated snapshots per run (plus the start)")
    p.add_argument("--target", type=float, default=0.40, help="held-out overall accuracy whose time is reported")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-val-prompts", type=int, default=None, help="evaluate on the first N validation prompts only (toy:eval is sorted by category: biased)")
    p.add_argument("--val-samples-per-prompt", type=int, default=2)
    p.add_argument("--eval-weights", choices=["as_configured", "live"], default="as_configured",
                   help="as_configured: the EMA average where the config validates with it; live: the trained weights")
    p.add_argument("--override", action="append", default=[], metavar="METHOD:--key=value",
                   help="extra CLI override for one method, e.g. nft:--model.nft_beta=0.1 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="rerun runs already in --out")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
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
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return {}
    own_model = {m for m in args.methods if any("pretrained_model_name_or_path" in o for o in args.override.get(m, []))}
    if set(args.methods) - own_model and not (TOY_CHECKPOINT / "model_index.json").exists():
        raise SystemExit(f"the toy checkpoint {TOY_CHECKPOINT} is missing; train it first (scripts/pretrain_toy.py)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    kept = previous.get("runs", {}) if previous.get("minutes") == args.minutes else {}
    results = {
        "minutes": args.minutes,
        "seeds": args.seeds,
        "target": args.target,
        "threads": args.threads,
        "eval_weights": args.eval_weights,
        "val_prompts": VAL_PROMPTS,
        "val_samples_per_prompt": args.val_samples_per_prompt,
        "max_val_prompts": args.max_val_prompts,
        "cpu": cpu_description(),
        "machine": f"{platform.machine()} cpus={os.cpu_count()}",
        "torch": torch.__version__,
        "accuracy_key": ACCURACY_KEY,
        "runs": {},
        "summary": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        runs = results["runs"].setdefault(name, {})
        for seed in args.seeds:
            done = kept.get(name, {}).get(str(seed))
            if done is not None and not args.override.get(name):
                runs[str(seed)] = done
                continue
            runs[str(seed)] = run_method(name, seed, args, args.workdir / name)
            args.out.write_text(json.dumps(results, indent=1))  # partial results survive an interruption
        results["summary"][name] = summarize(list(runs.values()), args.target)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main_()
