"""How much each toy config's short learning run (``tests/e2e/test_toy_learning.py``) varies between seeds.

Runs the test's short run (its settings, imported from the test module) of every toy config for each of
``--seeds`` and records the paired eval-reward gain (after - before, same prompts and starting noise),
its mean, min, and spread (max - min) per config. The test's margin must be at least three times the
largest spread and below the smallest gain by a clear amount; this file is the evidence.

    python benchmarks/toy_learning_spread.py                      # all configs, seeds 0 1 2
    python benchmarks/toy_learning_spread.py --configs awm --seeds 0 1

Writes ``benchmarks/toy_learning_spread.json``. Timings depend on the machine (its CPU is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "e2e"):  # the short run is a test of tests/e2e
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import test_toy_learning as short  # noqa: E402
import torch  # noqa: E402

from flowrl.cli import main  # noqa: E402
from flowrl.precision import cpu_description  # noqa: E402


def run(name: str, seed: int, workdir: Path, before_cache: dict, settings: dict) -> dict:
    os.chdir(workdir)
    start = time.perf_counter()
    cli = main(short.short_run_args(name, settings) + [f"--seed_everything={seed}", f"--model.seed={seed}",
                                             f"--data.seed={seed}"], run=False)
    key = short.sampler_key(cli.model)
    if key not in before_cache:
        before_cache[key] = short.eval_reward(cli.model, settings)
    t_fit = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t_fit
    with short.validation_weights(cli.trainer, cli.model):
        after = short.eval_reward(cli.model, settings)
    before = before_cache[key]
    return {"seed": seed, "before": before, "after": after, "gain": after - before,
            "fit_seconds": fit_s, "seconds": time.perf_counter() - start}


def main_cli(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=short.CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "toy_learning_spread.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="change a setting of the test's short run (a probe; the JSON records it)")
    parser.add_argument("--workdir", default="/tmp/toy_learning_spread")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {**short.SETTINGS}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in settings:
            parser.error(f"--set {key}: not a setting of the short run ({', '.join(settings)})")
        settings[key] = json.loads(value)
    before_cache: dict = {}
    results = {}
    for name in args.configs:
        runs = [run(name, s, workdir, before_cache, settings) for s in args.seeds]
        gains = [r["gain"] for r in runs]
        results[name] = {"runs": runs, "gain_mean": sum(gains) / len(gains), "gain_min": min(gains),
                         "gain_spread": max(gains) - min(gains),
                         "seconds_mean": sum(r["seconds"] for r in runs) / len(runs)}
        print(f"{name}: gains {[round(g, 3) for g in gains]} spread {results[name]['gain_spread']:.3f} "
              f"{results[name]['seconds_mean']:.1f} s/run", flush=True)
    out = {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "settings": settings, "margin": short.MARGIN, "configs": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main_cli()
