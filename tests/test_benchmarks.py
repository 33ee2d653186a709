"""Smoke runs of the benchmark scripts that have a short form, so that they cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_step_sensitivity_smoke(tmp_path):
    bench = _load("toy_step_sensitivity")
    overrides = ["--data.max_val_prompts=5", "--model.num_inference_steps=3", "--model.train_steps=[0]"]
    res = bench.run(str(ROOT / "lightning_configs" / "toy" / "grpo.yaml"), 2, overrides)
    assert res["samples"] == 10 and len(res["sigmas"]) == 4
    assert [r["step"] for r in res["steps"]] == [0, 1]  # every step but the last
    rows = res["steps"] + [res["independent_starts"], *res["start_noise_mix"].values()]
    for row in rows:
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["chance_agreement"] <= 1.0
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"])
    out = tmp_path / "sens.json"
    out.write_text(json.dumps(res))
    bench.plot(res, out.with_suffix(".png"))
    assert out.with_suffix(".png").stat().st_size > 0
