"""Smoke runs of the benchmark scripts that have a short form, so that they cannot rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def test_toy_compare_smoke(tmp_path):
    """Two seeds of one method for a second each: the JSON, the summary over seeds, the table and the PNG."""
    bench = _load("toy_compare")
    small = ["--model.group_size=2", "--data.batch_size=4", "--model.train_batch_size=4",
             "--model.gradient_accumulation_steps=1", "--model.num_inference_steps=3", "--model.num_train_timesteps=1",
             "--model.eval.num_inference_steps=2", "--trainer.logger=false"]
    out = tmp_path / "compare.json"
    argv = ["--methods", "nft", "--seeds", "0", "1", "--minutes", "0.01", "--points", "1",
            "--max-val-prompts", "5", "--val-samples-per-prompt", "1", "--target", "0.0",
            "--workdir", str(tmp_path / "runs"), "--out", str(out)]
    argv += [x for o in small for x in ("--override", f"nft:{o}")]
    res = bench.main_(argv)
    runs = res["runs"]["nft"]
    assert sorted(runs) == ["0", "1"] and all(len(r["points"]) == 2 for r in runs.values())
    assert all(r["points"][-1]["iterations"] >= 1 and r["samples"] >= 4 for r in runs.values())
    summary = res["summary"]["nft"]
    assert summary["seeds"] == [0, 1] and summary["reached_target"] == 2 and summary["seconds_to_target"] == [0.0, 0.0]
    final = summary["final"]["overall"]
    assert final["min"] <= final["mean"] <= final["max"]
    saved = json.loads(out.read_text())
    assert json.dumps(saved["summary"]["nft"], sort_keys=True) == json.dumps(summary, sort_keys=True)  # (NaN != NaN)
    assert out.with_suffix(".png").stat().st_size > 0
    rows = bench.table(saved).splitlines()
    assert rows[0].startswith("| method |") and rows[2].startswith("| nft | ") and len(rows) == 3


def test_toy_compare_time_to_target_interpolates():
    bench = _load("toy_compare")
    key = bench.ACCURACY_KEY
    points = [{"train_seconds": 0.0, key: 0.3}, {"train_seconds": 60.0, key: 0.35}, {"train_seconds": 120.0, key: 0.45}]
    assert bench.time_to(points, 0.40) == pytest.approx(90.0)
    assert bench.time_to(points, 0.30) == 0.0
    assert bench.time_to(points, 0.50) is None


def test_overhead_smoke(tmp_path):
    """One measured iteration of grpo on the tiny SD3 with T5: every phase, the floor replay, JSON and PNG."""
    bench = _load("overhead")
    out = bench.main_(["--iterations", "1", "--setups", "sd3_t5", "--algorithms", "grpo", "--precisions", "32-true",
                       "--out", str(tmp_path / "overhead.json"), "--extra=--model.num_inference_steps=4",
                       "--extra=--model.group_size=2", "--extra=--data.batch_size=4", "--extra=--model.train_batch_size=4"])
    (r,) = out["results"]
    assert set(r["phases_per_iteration"]) == set(bench.PHASES)
    assert r["phases_per_iteration"]["sampling_steps"] > 0 and r["phases_per_iteration"]["backward"] > 0
    # 4 steps x 2 CFG branches, then per trained step one graph pass (the unconditional one kept from the rollout)
    assert r["transformer_calls_per_iteration"] == 10
    assert r["floor_seconds_per_iteration"] > 0 and r["ratio_to_floor"] == pytest.approx(
        r["seconds_per_iteration"] / r["floor_seconds_per_iteration"])
    assert json.loads((tmp_path / "overhead.json").read_text())["cpu"]["capability"]
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_memory_counts_one_configuration(tmp_path):
    bench = _load("memory")
    path = tmp_path / "model"
    bench.build(path, layers=1, width=32)
    lora = bench.measure("lora_kl_reference", str(path))
    assert lora["reference_mib"] == 0  # the adapter-disabled network is the reference: no copy
    assert 0 < lora["gradients_mib"] < lora["parameters_mib"]
    assert lora["optimizer_mib"] == pytest.approx(2 * lora["gradients_mib"], abs=0.02)  # AdamW: two moments


def test_memory_of_two_fsdp2_processes_is_half_of_one_each(tmp_path):
    """Full fine-tuning with EMA and a full-copy reference on 2 FSDP2 processes: the two processes' parameters,
    gradients, optimizer state, EMA and reference add up to the model's (each holds its shards)."""
    bench = _load("memory")
    path = tmp_path / "model"
    bench.build(path, layers=2, width=64)
    rows = bench.run_one("full_ema_reference", str(path), 2)
    assert [r["rank"] for r in rows] == [0, 1] and all(r["processes"] == 2 for r in rows)
    whole = rows[0]["transformer_parameters"] * 4 / 2**20  # float32
    for key in ("parameters_mib", "gradients_mib", "ema_mib", "reference_mib"):
        assert sum(r[key] for r in rows) == pytest.approx(whole, abs=0.02), key
        assert all(r[key] < 0.6 * whole for r in rows), key
    assert sum(r["optimizer_mib"] for r in rows) == pytest.approx(2 * whole, abs=0.04)  # AdamW: two moments


def test_gpu_benchmark_smoke(tmp_path):
    """``benchmarks/gpu.py --smoke``: its code path on the CPU (tiny SD3 and tiny FLUX.1-dev, grpo, eager): one
    JSON record per run with the fields the GPU run reports, and the model FLOPs counted from the call shapes."""
    import torch

    bench = _load("gpu")
    out = tmp_path / "gpu.json"
    res = bench.main_(["--smoke", "--setups", "sd35m", "flux_dev", "--algorithms", "grpo", "--compile",
                       "--iterations", "1", "--peak-tflops", "2.0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    sd3, flux = res["results"]
    assert (sd3["setup"], flux["setup"]) == ("sd35m", "flux_dev")
    # 3 steps x 2 CFG branches + the 2 trained steps; FLUX is guidance-distilled: one pass a step
    assert sd3["transformer_calls_per_iteration"] == 8 and flux["transformer_calls_per_iteration"] == 5
    for r in (sd3, flux):
        assert r["algorithm"] == "grpo" and r["compiled"] is False and r["compile_mode"] is None
        assert r["device"] == res["device"] and r["lora_rank"] == 32 and r["smoke"] is True
        assert r["peak_memory_gib"] is None  # no GPU
        assert r["images_per_second"] == pytest.approx(r["images_per_iteration"] / r["seconds_per_iteration"])
        assert r["mfu"] == pytest.approx(r["model_tflop_per_iteration"] / r["seconds_per_iteration"] / 2.0)
        assert r["eager_floor_seconds"] > 0 and r["ratio_to_eager_floor"] > 0
        assert 0 < r["trainable_parameters"] < r["transformer_parameters"]
    # FLOPs: 2 x parameters x tokens, x3 with autograd on; a 4-d latent patched, a packed one as it is
    p = 1000
    hidden, text = torch.zeros(2, 4, 8, 8), torch.zeros(2, 5, 3)
    assert bench.call_tflop({"hidden_states": hidden, "encoder_hidden_states": text}, False, p, 2) == \
        pytest.approx(2 * p * (2 * 16 + 2 * 5) / 1e12)
    assert bench.call_tflop({"hidden_states": torch.zeros(2, 16, 64)}, True, p, 1) == \
        pytest.approx(3 * 2 * p * 32 / 1e12)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert bench.peak_tflops("Some GPU", None) is None and bench.peak_tflops("Some GPU", 5.0) == 5.0
