"""Per-step training metrics of every toy config, for a fixed seed, to show a refactor changed no behaviour.

    python scripts/behaviour_check.py --out before.json            # on the commit before the change
    python scripts/behaviour_check.py --compare before.json        # on the commit after it: exit 1 on any difference

Each config under ``lightning_configs/toy/`` (except the overlay ``lora.yaml``, run on top of ``nft.yaml``)
trains 3 iterations of 32 samples (micro-batches of 8, validation off, float32) and every ``train/*`` metric
logged at each step is recorded (reward mean, loss, ratio, grad norm ...). Equality is exact (floats compared as
Python floats of the logged float32 values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "lightning_configs" / "toy"
OVERRIDES = """
trainer:
  max_steps: 3
  limit_val_batches: 0
  num_sanity_val_steps: 0
  precision: 32-true
  enable_progress_bar: false
  enable_model_summary: false
model:
  train_batch_size: 8
data:
  batch_size: 32
"""


class Record(L.Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("train/")})


def run(configs: list[str]) -> list[dict[str, float]]:
    from flowrl.cli import main

    record = Record()
    args = []
    for c in configs:
        args += ["--config", str(TOY / c)]
    args += ["--config", OVERRIDES]
    cli = main(args, run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return record.steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--compare")
    parser.add_argument("--only", nargs="*", help="config names (e.g. nft.yaml)")
    ns = parser.parse_args()
    runs = {name: [name] for name in sorted(p.name for p in TOY.glob("*.yaml")) if name not in ("base.yaml", "lora.yaml")}
    runs["nft.yaml+lora.yaml"] = ["nft.yaml", "lora.yaml"]
    if ns.only:
        runs = {k: v for k, v in runs.items() if k in ns.only}
    results = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the runs/ folders the configs name land here
        try:
            for name, configs in runs.items():
                results[name] = run(configs)
                print(name, json.dumps(results[name][-1]), flush=True)
        finally:
            os.chdir(cwd)
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    if ns.compare:
        before = json.loads(Path(ns.compare).read_text())
        diffs = []
        for name, steps in results.items():
            if name not in before:
                diffs.append(f"{name}: not in {ns.compare}")
                continue
            for i, (a, b) in enumerate(zip(before[name], steps)):
                for key in sorted(set(a) | set(b)):
                    x, y = a.get(key), b.get(key)
                    same = x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y))
                    if not same:
                        diffs.append(f"{name} step {i} {key}: {x} -> {y}")
            if len(before[name]) != len(steps):
                diffs.append(f"{name}: {len(before[name])} steps -> {len(steps)}")
        print("\n".join(diffs) if diffs else f"identical: {len(results)} configs, every train/* metric of every step")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
