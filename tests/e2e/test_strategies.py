"""The strategy presets under lightning_configs/strategies/ parse on top of their family's config and shard that
family's transformer blocks; callbacks keeping parameter copies refuse strategies that would lose their shards."""

import os
from types import SimpleNamespace

import pytest
import yaml
from test_cli import PRESETS, ROOT
from tiny import make_module

from flowrl.cli import main

FAMILY_CONFIG = {"sd3": "sd35", "flux": "flux", "qwen_image": "qwen_image", "wan": "wan", "wan22": "wan22",
                 "flux2": "flux2", "flux_kontext": "flux_kontext", "z_image": "z_image", "wan_i2v": "wan_i2v",
                 "qwen_image_edit": "qwen_image_edit"}


def _family(preset: str) -> str:
    return os.path.basename(preset).removeprefix("fsdp2_").removesuffix(".yaml")


def test_there_is_an_fsdp2_preset_per_family_one_for_the_toy_and_a_multinode_one():
    names = {os.path.basename(p) for p in PRESETS}
    assert {f"fsdp2_{f}.yaml" for f in [*FAMILY_CONFIG, "toy"]} | {"multinode_ddp.yaml"} == names


@pytest.mark.parametrize("preset", [p for p in PRESETS if "fsdp2_" in p and "toy" not in p], ids=os.path.basename)
def test_fsdp2_preset_parses_and_shards_the_familys_blocks(preset, capsys):
    """Each family's preset: callbacks.FSDP2Strategy, bf16 all-gathers with float32 reduction, and block classes
    the family's transformer is made of (the tiny one has the real classes)."""
    from flowrl.policy.sharding import sharded_block_classes
    from flowrl.policy.tiny import build_tiny_pipeline

    family = _family(preset)
    config = os.path.join(ROOT, "lightning_configs", FAMILY_CONFIG[family], "grpo.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--config", preset, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]["class_path"] == "callbacks.FSDP2Strategy"
    fsdp = printed["model"]["init_args"]["policy"]["fsdp"]
    assert (fsdp["param_dtype"], fsdp["reduce_dtype"]) == ("bfloat16", "float32")
    transformer = build_tiny_pipeline(family).transformer
    assert [c.__name__ for c in sharded_block_classes(transformer, fsdp["blocks"])] == fsdp["blocks"]
    assert sharded_block_classes(transformer) == sharded_block_classes(transformer, fsdp["blocks"])  # = diffusers'


def test_multinode_preset_parses(capsys):
    preset = os.path.join(ROOT, "lightning_configs", "strategies", "multinode_ddp.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml"), "--config", preset,
              "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["num_nodes"], trainer["devices"], trainer["strategy"]) == (2, 8, "ddp")


def test_whole_copy_callbacks_refuse_strategies_that_lose_their_shards_at_start_up(tiny_sd3_path):
    """Lightning's FSDP (FSDP1) and plain ModelParallelStrategy would save a callback's copy from process 0 alone:
    refused, naming callbacks.FSDP2Strategy, which saves every process's shards and is accepted."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from callbacks import EMA, FSDP2Strategy, ReferenceModel
    from flowrl.algorithms import GRPO

    module = make_module(GRPO, tiny_sd3_path, finetune_type="full")
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ValueError, match=f"callbacks.EMA keeps a copy.*{type(strategy).__name__}.*callbacks.FSDP2Strategy"):
            EMA().setup(trainer, module, "fit")
        with pytest.raises(ValueError, match="ReferenceModel.*callbacks.FSDP2Strategy"):
            ReferenceModel(kl_beta=0.04).on_fit_start(trainer, module)
    for strategy in (DDPStrategy(), FSDP2Strategy()):
        EMA().setup(SimpleNamespace(strategy=strategy), module, "fit")
        ReferenceModel(kl_beta=0.04).on_fit_start(SimpleNamespace(strategy=strategy), module)
    EMA(ema_decay=0).setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")  # disabled: no copy
    lora = make_module(GRPO, tiny_sd3_path, finetune_type="lora")
    ReferenceModel(kl_beta=0.04).on_fit_start(SimpleNamespace(strategy=FSDPStrategy()), lora)  # no copy either


@pytest.mark.parametrize("args, message", [
    (["--model.policy.fsdp.param_dtype=bfloat16"],
     "error: policy.fsdp does nothing under strategy SingleDeviceStrategy; use trainer.strategy: callbacks.FSDP2Strategy"),
    (["--config", os.path.join(ROOT, "lightning_configs", "strategies", "fsdp2_toy.yaml"),
      "--model.policy.fsdp.blocks=[TransformerBlock]"],
     "error: FSDP2 finds no block to shard in SD3Transformer2DModel: none of ['TransformerBlock'] is one of its modules; "
     "set policy.fsdp.blocks to class names of its repeated blocks, e.g. ["),
], ids=["fsdp-options-without-fsdp", "blocks-not-found"])
def test_a_sharding_that_cannot_work_is_refused_in_one_line_before_any_process_starts(args, message, capsys):
    from flowrl.cli import console_main

    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml"),
                      "--trainer.precision=32-true", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err
