"""The toy case that hacks, with and without ``callbacks.RewardHackingGuard``: the curves behind the README's picture.

Runs ``lightning_configs/toy/hacking.yaml`` (DiffusionNFT trained on JPEG compressibility, the verifier scored at
validation only) and ``hacking_guard.yaml`` (the same with the guard in ``rollback`` mode), one after the other
with the same seed, and records at every validation the gold metric (held-out verifier accuracy), the graded
verifier score and the samples' pixel diversity, the training reward at every step, and the guard's decisions. The
guarded run is validated once more after training: the state it ended with. Writes ``--out`` (JSON) and the same
name with ``.png``: gold accuracy and training reward over the iterations, both runs, the guard's decisions marked.

    python benchmarks/hacking.py                      # the configs as shipped (20 iterations each)
    python benchmarks/hacking.py --plot-only          # redraw the PNG from the JSON

Not a test (``tests/e2e/test_hacking.py`` is the short check); float32 on every CPU kind, so that the numbers do
not depend on the CPU's bf16 support.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks import RewardHackingGuard  # noqa: E402

GOLD = "val/shapes_acc_overall"
RUNS = {"without the guard": "hacking.yaml", "with RewardHackingGuard (rollback)": "hacking_guard.yaml"}


class Record(L.Callback):
    """The training reward at every step and the validation figures at every whole validation of ``fit``."""

    def __init__(self):
        self.train: list[dict] = []
        self.validations: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("train/reward_mean")
        if value is not None:
            self.train.append({"step": trainer.global_step, "reward": round(float(value), 5)})

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or (trainer.sanity_checking and trainer.num_sanity_val_steps != float("inf")):
            return
        m = trainer.callback_metrics
        self.validations.append({"step": trainer.global_step, **{k: round(float(m[k]), 5) for k in
                                 (GOLD, "val/reward", "val/diversity_pixel") if k in m}})


def run(config: str, overrides: list[str]) -> dict:
    from flowrl.cli import main

    args = ["--config", str(ROOT / "lightning_configs" / "toy" / config), "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.precision=32-true", *overrides]
    cli = main(args, run=False)
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    out = {"config": f"lightning_configs/toy/{config}", "overrides": overrides, "train": record.train,
           "validations": record.validations, "steps": cli.trainer.global_step}
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, RewardHackingGuard)]
    if guards:
        guard = guards[0]
        out["decisions"] = [{k: d[k] for k in ("step", "action", "signals", "gold", "best_gold", "best_step",
                                               "message")} for d in guard.decisions]
        out["best"] = {"step": guard.best["step"], "gold": guard.best["gold"]}
        final = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        out["after_training"] = {"step": cli.trainer.global_step, GOLD: round(float(final[GOLD]), 5),
                                 "val/reward": round(float(final["val/reward"]), 5)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, train_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (label, res), colour in zip(result["runs"].items(), ("C3", "C0")):
        vals = res["validations"]
        gold_ax.plot([v["step"] for v in vals], [v[GOLD] for v in vals], "o-", color=colour, label=label)
        train = res["train"]
        train_ax.plot([t["step"] for t in train], [t["reward"] for t in train], "-", color=colour, lw=1.2,
                      label=label)
        if "after_training" in res:  # the restored state, validated after training
            after = res["after_training"]
            gold_ax.plot([vals[-1]["step"], after["step"]], [vals[-1][GOLD], after[GOLD]], ":", color=colour)
            gold_ax.plot([after["step"]], [after[GOLD]], "*", ms=14, color=colour,
                         label="the guarded run's end state, validated")
        for d in res.get("decisions", ()):
            for ax in (gold_ax, train_ax):
                ax.axvline(d["step"], color=colour, ls=":", lw=1)
            gold_ax.annotate(f"{d['action']}\n-> step {d['best_step']}", (d["step"], d["gold"] or d["best_gold"]),
                             textcoords="offset points", xytext=(4, 8), fontsize=7, color=colour)
    gold_ax.set_xlabel("iteration")
    gold_ax.set_ylabel("held-out verifier accuracy (gold)")
    gold_ax.set_title("gold metric (eval_rewards: shapes)", fontsize=10)
    gold_ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.8))
    train_ax.set_xlabel("iteration")
    train_ax.set_ylabel("training reward: -JPEG kB")
    train_ax.set_title("training reward (the exploitable proxy)", fontsize=10)
    fig.suptitle("Reward hacking on the toy: the proxy rises, the verifier falls; the guard rolls back", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "hacking.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    parser.add_argument("--override", action="append", default=[], help="a flowrl fit argument for both runs")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "runs" / "hacking"),
                        help="where the runs write their runs/ folders (samples, checkpoints)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.plot_only:
        result = json.loads(out.read_text())
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        here = os.getcwd()
        os.chdir(args.workdir)
        try:
            result = {"gold": GOLD, "precision": "32-true", "torch": torch.__version__,
                  "runs": {label: run(config, args.override) for label, config in RUNS.items()}}
        finally:
            os.chdir(here)
        out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main_()
