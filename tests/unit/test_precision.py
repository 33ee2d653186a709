"""CPU runs choose their precision by timing their own denoiser (flowrl.precision, flowrl fit)."""

import glob
import logging
import os

import pytest
import torch
import yaml
from test_cli import _config_documents

from flowrl import precision as P
from flowrl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "toy", "*.yaml")))
TINY = ["--trainer.logger=false", "--model.train_batch_size=4", "--data.batch_size=8", "--model.group_size=4",
        "--model.gradient_accumulation_steps=2"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache of its own, and no choice handed down by an earlier run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(P.ENV, raising=False)


@pytest.fixture(params=["32-true", "bf16-mixed"])
def faster(request, monkeypatch):
    """Timings as on a CPU where ``request.param`` is the faster (bf16 1.5x faster, or 1.5x slower); counts calls."""
    calls = []

    def fake(policy, precision, batch_size, height, width, repeats):
        calls.append((precision, batch_size, height, width))
        return 0.2 if precision == request.param else 0.3

    monkeypatch.setattr(P, "_time_passes", fake)
    return request.param, calls


def test_the_faster_precision_is_chosen_and_cached(faster):
    chosen, calls = faster
    policy = main(["--config", os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml"), *TINY,
                   "--trainer.precision=32-true"], run=False).model.policy
    first = P.measure_precision(policy, 4, 32, 32)
    assert (first.chosen, first.source, first.seconds[chosen]) == (chosen, "measured", 0.2)
    assert {c[0] for c in calls} == set(P.CANDIDATES) and all(c[1:] == (4, 32, 32) for c in calls)
    n = len(calls)
    again = P.measure_precision(policy, 4, 32, 32)  # the same CPU and shapes: read back, nothing timed
    assert (again.chosen, again.source, again.seconds, len(calls)) == (chosen, "cached", first.seconds, n)
    P.measure_precision(policy, 8, 32, 32)  # another micro-batch is another measurement
    assert len(calls) > n
    assert "(measured)" in first.line() and f"running {chosen} (1.50x faster)" in first.line()


@pytest.mark.parametrize("bf16, chosen", [(0.0949, "bf16-mixed"), (0.0960, "32-true"), (0.1, "32-true"),
                                          (0.2, "32-true")])
def test_bf16_must_be_clearly_faster(bf16, chosen, monkeypatch):
    """float32 takes 100 ms: bf16 autocast is chosen only below 100 / 1.05 = 95.2 ms (it rounds every activation)."""
    monkeypatch.setattr(P, "_time_passes", lambda policy, precision, *a: bf16 if precision == "bf16-mixed" else 0.1)
    monkeypatch.setattr(P, "_shape_key", lambda *a: "key")
    choice = P.measure_precision(None, 4, 32, 32)
    assert choice.chosen == chosen
    assert ("x faster" in choice.line()) == (chosen == "bf16-mixed" or bf16 > 0.1)


def test_a_real_measurement_times_both_and_leaves_no_gradient():
    policy = main(["--config", os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml"), *TINY,
                   "--trainer.precision=32-true"], run=False).model.policy
    choice = P.measure_precision(policy, 2, 32, 32, repeats=1, use_cache=False)
    assert set(choice.seconds) == set(P.CANDIDATES) and all(0 < s < 60 for s in choice.seconds.values())
    assert choice.chosen == min(choice.seconds, key=choice.seconds.get)
    assert all(p.grad is None for p in policy.trainable_parameters())


def test_the_other_processes_of_a_run_take_the_first_ones_choice(monkeypatch):
    monkeypatch.setenv(P.ENV, "bf16-mixed")
    monkeypatch.setattr(P, "_time_passes", lambda *a: pytest.fail("timed although the run's choice was handed down"))
    assert P.measure_precision(object(), 4, 32, 32) == P.PrecisionChoice("bf16-mixed", {}, "inherited")


def test_who_chooses():
    assert P.needs_choice(None, "cpu") and not P.needs_choice("32-true", "cpu")
    assert not P.needs_choice("bf16-mixed", "cpu") and not P.needs_choice(None, "gpu")
    assert P.cpu_precision() == "32-true"  # nothing to time without a module


def test_cpu_description_names_the_capability():
    info = P.cpu_description()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["native_bf16"], bool) and info["model_name"]


@pytest.mark.parametrize("config", TOY_CONFIGS, ids=os.path.basename)
def test_toy_configs_leave_precision_to_the_cpu(config):
    """No toy config forces a precision: which is faster depends on the CPU."""
    documents = _config_documents(["--config", config])  # the file after its bases
    for data in documents:
        assert "precision" not in data.get("trainer", {}), f"{config} (or its base) forces trainer.precision"
    if any("trainer_type" in data for data in documents):  # a whole config, not an overlay or a base
        assert [d["trainer"]["accelerator"] for d in documents if "accelerator" in d.get("trainer", {})][-1] == "cpu"


def test_flowrl_fit_chooses_logs_and_records_the_precision(faster, tmp_path, monkeypatch, caplog):
    chosen, calls = faster
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")
    with caplog.at_level(logging.INFO):
        cli = main(["fit", "--config", config, *TINY, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                    "--trainer.num_sanity_val_steps=0", "--trainer.logger=true"])
    assert cli.trainer.precision == chosen and calls
    assert {c[1:] for c in calls} == {(4, 32, 32)}  # the run's micro-batch at its training resolution
    times = {p: 200 if p == chosen else 300 for p in P.CANDIDATES}  # both times are in the line
    assert f"32-true {times['32-true']} ms, bf16-mixed {times['bf16-mixed']} ms (measured): running {chosen}" in caplog.text
    saved = glob.glob(str(tmp_path / "runs" / "**" / "config.yaml"), recursive=True)
    assert saved and yaml.safe_load(open(saved[0]))["trainer"]["precision"] == chosen  # the run records it
    assert P.ENV not in os.environ  # one process: nothing handed down


def test_flowrl_fit_precision_override_wins(faster, tmp_path, monkeypatch):
    _, calls = faster
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml")
    for forced in P.CANDIDATES:
        cli = main(["--config", config, *TINY, f"--trainer.precision={forced}"], run=False)
        assert cli.trainer.precision == forced
    assert not calls  # nothing timed
