"""CPU runs pick their precision from what the CPU computes natively (flowrl.precision, flowrl fit)."""

import glob
import logging
import os

import pytest
import torch
from test_cli import _config_documents

from flowrl import precision as P
from flowrl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "toy", "*.yaml")))


@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-only"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_cpu_precision_follows_native_bf16(native_bf16):
    assert P.cpu_precision() == ("bf16-mixed" if native_bf16 else "32-true")


def test_explicit_precision_is_kept(native_bf16):
    assert P.resolve_precision("32-true", "cpu") == ("32-true", None)
    assert P.resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", None)


def test_unset_precision_off_the_cpu_stays_lightnings_default(native_bf16):
    assert P.resolve_precision(None, "gpu") == (None, None)


def test_cpu_description_names_the_capability():
    info = P.cpu_description()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["native_bf16"], bool) and info["model_name"]


@pytest.mark.parametrize("config", TOY_CONFIGS, ids=os.path.basename)
def test_toy_configs_leave_precision_to_the_cpu(config):
    """No toy config forces a precision: bf16 autocast is ~5x slower than float32 on AVX2-only CPUs."""
    documents = _config_documents(["--config", config])  # the file after its bases
    for data in documents:
        assert "precision" not in data.get("trainer", {}), f"{config} (or its base) forces trainer.precision"
    if any("trainer_type" in data for data in documents):  # a whole config, not an overlay or a base
        assert [d["trainer"]["accelerator"] for d in documents if "accelerator" in d.get("trainer", {})][-1] == "cpu"


def test_flowrl_fit_chooses_logs_and_records_the_precision(native_bf16, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")
    with caplog.at_level(logging.INFO):
        cli = main(["--config", config, "--trainer.logger=false"], run=False)
    expected = "bf16-mixed" if native_bf16 else "32-true"
    assert cli.trainer.precision == expected
    assert cli.config.trainer.precision == expected  # what the saved config.yaml of the run records
    assert f"runs {expected}" in caplog.text and "native bf16: " + ("yes" if native_bf16 else "no") in caplog.text


def test_flowrl_fit_precision_override_wins(native_bf16, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml")
    forced = "32-true" if native_bf16 else "bf16-mixed"
    cli = main(["--config", config, "--trainer.logger=false", f"--trainer.precision={forced}"], run=False)
    assert cli.trainer.precision == forced
