"""The strategy presets under lightning_configs/strategies/ parse on top of their family's config and wrap that
family's transformer blocks; the callbacks that keep whole parameter copies refuse a sharding strategy at start-up."""

import importlib
import os
from types import SimpleNamespace

import pytest
import yaml
from test_cli import PRESETS, ROOT
from tiny import make_module

from flowrl.cli import main

FAMILY_CONFIG = {"sd3": "sd35", "flux": "flux", "qwen_image": "qwen_image", "wan": "wan"}


def _family(preset: str) -> str:
    return os.path.basename(preset).removeprefix("fsdp_").removesuffix(".yaml")


def test_there_is_an_fsdp_preset_per_family_and_a_multinode_one():
    names = {os.path.basename(p) for p in PRESETS}
    assert {f"fsdp_{f}.yaml" for f in FAMILY_CONFIG} | {"multinode_ddp.yaml"} == names


@pytest.mark.parametrize("preset", [p for p in PRESETS if "fsdp_" in p], ids=os.path.basename)
def test_fsdp_preset_parses_and_wraps_the_familys_blocks(preset, capsys):
    family = _family(preset)
    config = os.path.join(ROOT, "lightning_configs", FAMILY_CONFIG[family], "grpo.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--config", preset, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"
    # every wrapped class is a block the family's transformer is made of
    from flowrl.policy.tiny import build_tiny_pipeline

    transformer = build_tiny_pipeline(family).transformer
    present = {type(m) for m in transformer.modules()}
    for path in strategy["init_args"]["auto_wrap_policy"]:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name) in present, path


def test_multinode_preset_parses(capsys):
    preset = os.path.join(ROOT, "lightning_configs", "strategies", "multinode_ddp.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml"), "--config", preset,
              "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["num_nodes"], trainer["devices"], trainer["strategy"]) == (2, 8, "ddp")


def test_whole_copy_callbacks_refuse_fsdp_at_start_up(tiny_sd3_path):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from callbacks import EMA, ReferenceModel
    from flowrl.algorithms import GRPO

    fsdp, ddp = SimpleNamespace(strategy=FSDPStrategy()), SimpleNamespace(strategy=DDPStrategy())
    module = make_module(GRPO, tiny_sd3_path, finetune_type="full")
    with pytest.raises(ValueError, match="callbacks.EMA keeps a full copy.*FSDPStrategy"):
        EMA().setup(fsdp, module, "fit")
    EMA().setup(ddp, module, "fit")
    EMA(ema_decay=0).setup(fsdp, module, "fit")  # disabled: no copy, nothing to refuse
    with pytest.raises(ValueError, match="ReferenceModel.*FSDPStrategy"):
        ReferenceModel(kl_beta=0.04).on_fit_start(fsdp, module)
    lora = make_module(GRPO, tiny_sd3_path, finetune_type="lora")
    ReferenceModel(kl_beta=0.04).on_fit_start(fsdp, lora)  # the adapter-disabled network: no copy
