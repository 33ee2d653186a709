import glob
import os

import pytest

from flowrl.cli import console_main, main
from flowrl.errors import ConfigError
from flowrl.fit import expand_config_bases, translate_argv, translate_config
from flowrl.policy.tiny import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "**", "*.yaml"), recursive=True))
#: overlays (a few lines added after a whole config with a second --config) and the config each is tested on
OVERLAYS = {os.path.join(ROOT, "lightning_configs", "toy", "lora.yaml"): os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")}
#: strategy presets for GPUs (tests/e2e/test_strategies.py parses them; no GPU here to run them)
PRESETS = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "strategies", "*.yaml")))
#: the parts whole configs share, named by them with ``base:`` (never run alone): the toy's shared settings, and
#: the real models' and algorithms' files that lightning_configs/<family>/<algorithm>.yaml compose
BASES = [os.path.join(ROOT, "lightning_configs", "toy", "base.yaml")] + sorted(
    glob.glob(os.path.join(ROOT, "lightning_configs", "models", "*.yaml"))
    + glob.glob(os.path.join(ROOT, "lightning_configs", "algorithms", "*.yaml")))
CONFIGS = [c for c in ALL_CONFIGS if c not in OVERLAYS and c not in PRESETS and c not in BASES]


#: families whose configs score with a reward that downloads weights (CLIP): tests swap in an offline reward (the
#: reward itself runs on a tiny CLIP in tests/e2e/test_editing.py)
DOWNLOADING_REWARDS = {"flux_kontext"}


def tiny_overrides(config: str, tiny_path: str | None, prompt_file: str) -> list[str]:
    """Shrink any config to a few seconds of CPU work on the tiny pipeline of its family (or the toy model)."""
    args = [
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1",
        "--trainer.num_sanity_val_steps=0",
        "--model.group_size=2",
        "--model.num_inference_steps=8",  # toy configs train steps up to index 5
        "--model.eval.num_inference_steps=3",
        "--model.train_batch_size=4",
        "--model.gradient_accumulation_steps=1",
        "--data.batch_size=4",
        "--data.val_batch_size=4",
        "--data.max_val_prompts=4",
    ]
    if os.sep + "toy" + os.sep not in config:
        args += [
            f"--model.policy.pretrained_model_name_or_path={tiny_path}",
            "--model.policy.frozen_dtype=float32",
            "--model.policy.lora_rank=2",
            "--model.resolution=16",
            "--model.eval.resolution=16",
            f"--data.train_prompts={prompt_file}",
            f"--data.val_prompts={prompt_file}",
        ]
    if config_family(config) in DOWNLOADING_REWARDS:  # its reward's weights cannot be downloaded here
        args.append("--model.rewards=[{name: jpeg_compressibility, args: {}}]")
    if any(os.sep + d + os.sep in config for d in ("wan", "wan22")):
        args.append("--model.policy.num_frames=5")  # the tiny Wan's shortest clip, instead of the config's 33
    if config_family(config) == "wan_i2v":  # image-to-video: the same prompts, each row naming its first frame
        from pathlib import Path

        from contract import image_prompt_file

        prompts = [p for p in open(prompt_file, encoding="utf-8").read().splitlines() if p.strip()]
        rows = image_prompt_file(Path(prompt_file).parent, prompts)
        args += ["--model.policy.num_frames=5", f"--data.train_prompts={rows}", f"--data.val_prompts={rows}"]
    if config_family(config) == "qwen_image_edit":  # editing: rows naming condition images, resized to 32 x 32 px
        args.append("--model.policy.condition_image_area=1024")  # (the stock 1024 x 1024: 65k tiny-VAE tokens)
        if not prompt_file.endswith(".jsonl"):  # a plain prompt file: the shipped example edits instead
            edits = os.path.join(ROOT, "examples", "prompts", "edits.jsonl")
            args += [f"--data.train_prompts={edits}", f"--data.val_prompts={edits}"]
    if tiny_path is not None and trainer_type_from_args(["--config", config]) == "diffusion-opd":
        # the config's teachers are the user's LoRAs of the real model: the tiny pipeline (an exported model folder)
        # teaches instead
        args.append(f"--model.teachers=[{{path: {tiny_path}, name: tiny}}]")
    return args


def _config_documents(args):
    """The YAML mappings of a command line's ``--config`` files, bases first."""
    import yaml

    args = expand_config_bases(args)
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    docs = [yaml.safe_load(open(c, encoding="utf-8") if os.path.isfile(c) else c) for c in configs]
    return [d for d in docs if isinstance(d, dict)]


def trainer_type_from_args(args) -> str:
    """The seed name of the algorithm a command line's configs choose (the last ``trainer_type``; grpo by default)."""
    found = "grpo"
    for document in _config_documents(args):
        found = document.get("trainer_type", found)
    return found


def _bases(config: str) -> list[str]:
    import yaml

    named = yaml.safe_load(open(config, encoding="utf-8")).get("base") or []
    return [os.path.normpath(os.path.join(os.path.dirname(config), b)) for b in ([named] if isinstance(named, str)
                                                                             else named)]


def test_every_config_is_whole_or_a_tested_overlay():
    for config in ALL_CONFIGS:
        whole = any("trainer_type" in d for d in _config_documents(["--config", config]))  # bases included
        if config in CONFIGS:
            assert whole, f"{config}: a whole config sets trainer_type (itself or in a base); else list it as an " \
                          "overlay (OVERLAYS), a strategy preset (PRESETS) or a base (BASES)"
        elif config in OVERLAYS or config in PRESETS:
            assert not whole, f"{config}: an overlay or preset does not choose the algorithm"
    named = {b for c in ALL_CONFIGS for b in _bases(c)}
    assert set(BASES) <= named <= set(BASES) | set(CONFIGS)  # a base is named; a whole config may be a base too


def test_real_model_configs_compose_a_model_and_an_algorithm():
    """lightning_configs/<family>/<algorithm>.yaml is models/<family>.yaml + algorithms/<algorithm>.yaml + the
    family's tuning of that algorithm, and every pair of a model and an algorithm parses."""
    models = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "models", "*.yaml")))
    algorithms = sorted(glob.glob(os.path.join(ROOT, "lightning_configs", "algorithms", "*.yaml")))
    for config in CONFIGS:
        family = config_family(config)
        if family == "toy":
            continue
        bases = _bases(config)
        assert [os.path.basename(b) for b in bases] == [f"{family}.yaml", os.path.basename(config)], config
    for model in (m for m in models if not m.endswith("base.yaml")):
        for algorithm in algorithms:
            with pytest.raises(SystemExit) as exit_info:
                main(["fit", "--config", model, "--config", algorithm, "--print_config"])
            assert exit_info.value.code in (0, None), (model, algorithm)


def _leaves(data, prefix=""):
    if not isinstance(data, dict):
        return {prefix: data}
    return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}


@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if "base" in (open(c, encoding="utf-8").read())
                                    and _bases(c)], ids=lambda c: os.path.relpath(c, ROOT))
def test_a_config_states_only_what_differs_from_its_bases(config):
    """A config that names bases holds only what makes it itself: no option repeats its bases' value."""
    import yaml

    own = yaml.safe_load(open(config, encoding="utf-8"))
    own.pop("base")
    base = {}
    for named in _bases(config):
        for document in _config_documents(["--config", named]):
            base.update(_leaves(document))
    repeated = {k: v for k, v in _leaves(own).items() if k in base and base[k] == v}
    assert not repeated, f"{config} repeats its base: {repeated}"


def test_every_toy_config_has_a_base():
    for config in CONFIGS:
        if config_family(config) == "toy":
            assert _bases(config), f"{config}: start it with `base: base.yaml` and keep the differences"


def test_config_bases_are_read_first_and_bad_ones_named(tmp_path):
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "root.yaml").write_text("trainer_type: nft\nmodel: {group_size: 4}\n")
    (tmp_path / "child.yaml").write_text("base: parent/root.yaml\nmodel: {group_size: 2}\n")
    args = expand_config_bases(["fit", "--config", str(tmp_path / "child.yaml"), "--model.resolution=8"])
    assert args[:3] == ["fit", "--config", str(tmp_path / "parent" / "root.yaml")]
    assert args[3] == "--config" and yaml_of(args[4]) == {"model": {"group_size": 2}}  # base consumed
    assert args[5:] == ["--model.resolution=8"]
    inline = f"base: {tmp_path / 'parent' / 'root.yaml'}\nmodel: {{group_size: 2}}\n"  # an absolute base, inline
    assert expand_config_bases(["--config", inline])[:2] == ["--config", str(tmp_path / "parent" / "root.yaml")]
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist"):
        expand_config_bases(["--config", str(tmp_path / "orphan.yaml")])
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        expand_config_bases(["--config", str(tmp_path / "loop.yaml")])


def yaml_of(text: str):
    import yaml

    return yaml.safe_load(text)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS), ids=lambda c: os.path.relpath(c, ROOT))
def test_overlay_runs_a_few_steps_on_its_config(overlay, prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = OVERLAYS[overlay]
    cli = main(["fit", "--config", base, "--config", overlay, *tiny_overrides(base, None, prompt_file)])
    assert cli.trainer.global_step >= 2
    assert "train/loss" in cli.trainer.logged_metrics
    if overlay.endswith("lora.yaml"):
        assert cli.model.policy.finetune_type == "lora"
        assert any(os.scandir(tmp_path / "runs" / "toy-lora"))


def test_configs_exist():
    assert any("toy" in c for c in CONFIGS)
    for family in FAMILIES:  # real-model configs: grpo and nft for every family
        assert {os.path.basename(c) for c in CONFIGS if os.sep + family + os.sep in c} >= {"grpo.yaml", "nft.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.relpath(c, ROOT))
def test_config_parses_and_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: flowrl.algorithms." in printed and "policy:" in printed  # the class_path form
    assert "trainer_type" not in printed and "dynamics_type" not in printed


def config_family(config: str) -> str:
    """The model family a config under lightning_configs/<dir>/ is for (its directory name)."""
    return os.path.basename(os.path.dirname(config))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.relpath(c, ROOT))
def test_config_runs_a_few_steps(config, tiny_pipeline_path, prompt_file, tmp_path, monkeypatch):
    """Every shipped config, with its model swapped for the tiny pipeline of its family (toy configs: the toy)."""
    monkeypatch.chdir(tmp_path)  # runs/ and logs land in the temporary directory
    family = config_family(config)
    tiny = None if family == "toy" else tiny_pipeline_path(family)
    cli = main(["fit", "--config", config, *tiny_overrides(config, tiny, prompt_file)])
    assert cli.trainer.global_step >= 2
    assert cli.model.trainer_type == trainer_type_from_args(["--config", config])
    assert "train/loss" in cli.trainer.logged_metrics
    assert any(os.scandir(tmp_path / "runs"))
    saved = glob.glob(str(tmp_path / "runs" / "**" / "config.yaml"), recursive=True)
    assert saved and all("\nbase:" not in open(s).read() for s in saved)  # the merged whole, runnable alone


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS[0]}\nmodel_typo: 1\n")
    with pytest.raises(ConfigError, match="model_typo"):
        main(["fit", "--config", str(bad), "--print_config"])
    with pytest.raises(ConfigError, match="not_an_option"):
        main(["fit", "--config", CONFIGS[0], "--model.not_an_option=3", "--print_config"])


def test_the_seeds_flat_names_become_the_class_path_form():
    flat = {"trainer_type": "grpo-guard", "model": {"dynamics_type": "Flow-SDE", "noise_level": 0.5,
                                                     "train_steps": [0, 1], "num_train_steps": 1, "window_size": None,
                                                     "advantage_aggregation": "gdpo", "group_size": 4}}
    assert translate_config(flat) == {"model": {"class_path": "flowrl.algorithms.GRPOGuard", "init_args": {
        "group_size": 4, "advantage_estimator": "gdpo",
        "dynamics": {"class_path": "flowrl.dynamics.FlowSDE", "init_args": {"noise_level": 0.5}},
        "step_selection": {"class_path": "flowrl.dynamics.TrainSteps",
                           "init_args": {"train_steps": [0, 1], "num_train_steps": 1}}}}}
    assert translate_config({"model": {"group_size": 4}}) == {"model": {"group_size": 4}}  # nothing to translate
    assert translate_argv(["--trainer_type", "nft", "--model.dynamics_type=CPS", "--model.noise_level=0.5",
                           "--model.train_steps=[0]", "--model.seed=3"]) == [
        "--model=flowrl.algorithms.NFT", "--model.dynamics=flowrl.dynamics.CPS", "--model.dynamics.noise_level=0.5",
        "--model.step_selection=flowrl.dynamics.TrainSteps", "--model.step_selection.train_steps=[0]", "--model.seed=3"]
    with pytest.raises(ConfigError, match="unknown"):
        translate_argv(["--trainer_type", "ppo"])
    with pytest.raises(ConfigError, match="dynamics_type 'SDE' is unknown"):
        translate_config({"model": {"dynamics_type": "SDE"}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("--model.policy.pretrained_model_name_or_path=./missing/model", "does not exist"),
        ("--model.group_size=1", "group_size"),
        ("--data.batch_size=3", "whole groups"),
        ("--model.dynamics_type=ODE", "decoupled"),
        ("--model.train_steps=[0,99]", "out of range"),
    ],
)
def test_bad_input_fails_before_work(override, match, tiny_sd3_path, prompt_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml")
    args = ["fit", "--config", config, *tiny_overrides(config, tiny_sd3_path, prompt_file), override]
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as info:
        main(args)
    text = str(info.value) + capsys.readouterr().err
    assert match in text
    assert not os.path.exists(tmp_path / "runs")  # nothing was started


def test_empty_prompt_file_fails_before_work(tiny_sd3_path, prompt_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    config = os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml")
    args = ["fit", "--config", config, *tiny_overrides(config, tiny_sd3_path, prompt_file), f"--data.train_prompts={empty}"]
    with pytest.raises((ValueError, SystemExit)) as info:
        main(args)
    assert "no prompts" in str(info.value) + capsys.readouterr().err


def test_console_command_exits_zero_after_training(tiny_sd3_path, prompt_file, tmp_path, monkeypatch):
    """``flowrl fit ...`` (the console script) must end with status 0, not print the CLI object and exit 1."""
    import sys

    config = next(c for c in CONFIGS if os.sep + "sd35" + os.sep in c)
    argv = ["flowrl", "fit", "--config", config, *tiny_overrides(config, tiny_sd3_path, prompt_file)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    assert console_main() is None
