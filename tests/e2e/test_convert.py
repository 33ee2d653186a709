"""``flowrl convert``: Flow-Factory-shaped configs (tests/data/flow_factory/, written for these tests in the shape of
Flow-Factory's examples) convert with every key accounted for, parse with ``flowrl fit --print_config``, run an
optimizer step on their family's tiny pipeline; the batch arithmetic keeps samples per optimizer step and optimizer
steps per epoch; refusals name the key; a converted toy config trains end to end; docs/convert.md is the table."""

import glob
import os
import shutil

import pytest
import yaml

from flowrl.cli import console_main, main
from flowrl.convert import DROPPED, MAPPED, REFUSED, RULES, VLM_TEMPLATE, convert, rules_table
from flowrl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "flow_factory")
EXAMPLES = sorted(p for p in glob.glob(os.path.join(DATA, "*.yaml")) if not p.endswith("toy_nft.yaml"))
#: Flow-Factory model_type -> flowrl's tiny pipeline family
TINY = {"sd3-5": "sd3", "flux1": "flux", "qwen-image": "qwen_image", "wan2_t2v": "wan"}


def load(path):
    return yaml.safe_load(open(path, encoding="utf-8"))


def input_keys(ff: dict) -> set[str]:
    """Every key of a Flow-Factory config as the report names it."""
    keys = set()
    for key, value in ff.items():
        if key in ("rewards", "eval_rewards") and isinstance(value, list):
            for i, entry in enumerate(value):
                keys |= {f"{key}[{i}].{k}" for k in entry}
        elif isinstance(value, dict):
            keys |= {f"{key}.{k}" for k in value}
        else:
            keys.add(key)
    return keys


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_key_is_accounted_for_once(path):
    ff = load(path)
    c = convert(ff, DATA)
    assert not c.refused, c.refused
    reported = [k for k, _, _ in c.report]
    assert sorted(reported) == sorted(input_keys(ff)), set(reported) ^ input_keys(ff)
    assert all(s in (MAPPED, DROPPED) and w for _, s, w in c.report)


def test_the_batch_arithmetic_keeps_samples_per_step_and_steps_per_epoch():
    """grpo_lora_sd3_5 on 8 processes: 48 prompts x 24 samples in micro-batches of 8, 2 optimizer steps an epoch.
    Flow-Factory: 18 micro-batches a process, accumulation (18 // 2) * 2 SDE steps = 18 calls, 2 optimizer steps.
    flowrl: 144 samples a process, micro-batches of 8, 9 accumulated: 2 optimizer steps of 8 x 9 x 8 = 576 samples."""
    out = convert(load(os.path.join(DATA, "grpo_lora_sd3_5.yaml")), DATA).out
    init = out["model"]["init_args"]
    assert out["data"]["batch_size"] == 144 and init["train_batch_size"] == 8
    assert init["gradient_accumulation_steps"] == 9 and init["group_size"] == 24
    assert out["trainer"]["max_steps"] == 300 * 2 and out["trainer"]["devices"] == 8
    assert init["step_selection"]["init_args"] == {"train_steps": [0, 1, 2, 3], "num_train_steps": 2}
    assert init["policy"]["lora_alpha"] == 64.0 and init["policy"]["frozen_dtype"] == "bfloat16"
    assert out["trainer"]["strategy"] == "ddp" and out["trainer"]["precision"] == "bf16-mixed"
    ref = [cb for cb in out["trainer"]["callbacks"] if cb["class_path"] == "callbacks.ReferenceModel"]
    assert ref and ref[0]["init_args"] == {"kl_beta": 0.04, "kl_type": "x-based", "ref_param_device": "same_as_model"}
    ckpt = [cb for cb in out["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert ckpt[0]["init_args"]["every_n_train_steps"] == 20 * 2  # save_freq 20 epochs


def test_the_prompt_count_is_rounded_up_as_flow_factory_does():
    """M = 16 prompts of 16 on 8 processes with micro-batches of 2 and one step an epoch: Flow-Factory's
    group_contiguous alignment keeps 16 (a multiple of lcm(16 / gcd(16, 16) * 1, 8) = 8)."""
    out = convert(load(os.path.join(DATA, "grpo_full_qwen_image.yaml")), DATA).out
    assert out["data"]["batch_size"] == 16 * 16 // 8
    assert out["model"]["init_args"]["gradient_accumulation_steps"] == 16 // 1
    assert out["model"]["init_args"]["policy"]["fsdp"]["blocks"] == ["QwenImageTransformerBlock"]
    assert out["trainer"]["strategy"] == {"class_path": "callbacks.FSDP2Strategy"}
    assert out["data"]["max_train_prompts"] == 1000 and out["trainer"]["enable_checkpointing"] is False


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_converted_config_parses_and_runs_a_step_on_the_tiny_pipeline(path, tmp_path, monkeypatch, prompt_file,
                                                                      tiny_pipeline_path):
    ff = load(path)
    out = tmp_path / "converted.yaml"
    assert console_main(["convert", path, "-o", str(out)]) is None
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(out), "--print_config"])
    assert exit_info.value.code in (0, None)
    monkeypatch.chdir(tmp_path)
    converted = load(out)
    if converted["model"]["init_args"]["policy"].pop("fsdp", None) is not None:  # one CPU process: no sharding
        out.write_text(yaml.safe_dump(converted, sort_keys=False))
    family = ff["model"]["model_type"]
    args = ["fit", "--config", str(out), "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.precision=32-true", "--trainer.logger=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            f"--model.policy.pretrained_model_name_or_path={tiny_pipeline_path(TINY[family])}",
            "--model.policy.frozen_dtype=float32", "--model.resolution=16",
            "--model.eval.resolution=16", "--model.group_size=2", "--model.num_inference_steps=8",
            "--model.train_batch_size=4", "--model.gradient_accumulation_steps=1",
            "--model.rewards=[{name: jpeg_incompressibility}]", f"--data.train_prompts={prompt_file}",
            "--data.batch_size=4", "--data.max_train_prompts=null"]
    if ff["model"].get("finetune_type") == "lora":
        args += ["--model.policy.lora_rank=2", "--model.policy.lora_alpha=2"]
    if family == "wan2_t2v":
        args.append("--model.policy.num_frames=5")
    if "teachers" in converted["model"]["init_args"]:  # the config's teachers are LoRAs of the real model
        args.append(f"--model.teachers=[{{path: {tiny_pipeline_path(TINY[family])}, name: tiny}}]")
    if "num_train_timesteps" in converted["model"]["init_args"]:  # the converted count is for the config's steps
        args.append("--model.num_train_timesteps=1")
    cli = main(args)
    assert cli.trainer.global_step >= 1 and "train/loss" in cli.trainer.logged_metrics
    assert type(cli.model).__name__ == load(out)["model"]["class_path"].rsplit(".", 1)[1]


def test_a_converted_toy_config_trains_end_to_end(tmp_path, monkeypatch):
    """A Flow-Factory-shaped config of the toy (the shipped model, toy prompts, the verifier as a class path):
    converted, then ``flowrl fit`` on it as written: 3 epochs of one optimizer step, validations at 2."""
    shutil.copytree(os.path.join(DATA, "toy_data"), tmp_path / "toy_data")
    shutil.copy(os.path.join(DATA, "toy_nft.yaml"), tmp_path / "toy_nft.yaml")
    monkeypatch.chdir(tmp_path)
    console_main(["convert", "toy_nft.yaml", "-o", "flowrl.yaml"])
    converted = load(tmp_path / "flowrl.yaml")
    assert converted["data"]["train_prompts"] == os.path.join("toy_data", "train.txt")
    assert converted["model"]["init_args"]["rewards"] == [
        {"class_path": "flowrl.toy.verifier.ShapesReward", "weight": 1.0, "label": "shapes"}]
    cli = main(["fit", "--config", "flowrl.yaml"])
    assert cli.trainer.global_step == 3 and cli.model.iteration == 3
    assert "val/shapes_acc_overall" in cli.trainer.logged_metrics
    assert os.path.isdir(tmp_path / "runs" / "toy-nft-converted")


@pytest.mark.parametrize("edit, message", [
    (lambda ff: ff["train"].update(colour="red"), "train.colour: unknown key"),
    (lambda ff: ff["model"].update(model_type="ltx2_t2av"), "model_type 'ltx2_t2av' has no flowrl family"),
    (lambda ff: ff["train"].update(trainer_type="tdm"), "trainer_type 'tdm' has no flowrl algorithm"),
    (lambda ff: ff.update(eval_rewards=[{"name": "hps", "reward_model": "HPS"}]), "eval_rewards[0].reward_model"),
    (lambda ff: ff["rewards"].append({"name": "r", "reward_model": "rational_rewards_t2i"}), "rational_rewards_t2i"),
    (lambda ff: ff["model"].update(target_modules="all"), "target_modules: all with LoRA"),
    (lambda ff: ff["model"].update(resume_path="ckpts/x"), "model.resume_path"),
    (lambda ff: ff["log"].update(logging_backend="swanlab"), "swanlab"),
    (lambda ff: ff["train"].update(group_size=1), "group_size 1"),
])
def test_keys_without_an_equivalent_are_refused_by_name_and_nothing_is_written(tmp_path, capsys, edit, message):
    ff = load(os.path.join(DATA, "grpo_lora_sd3_5.yaml"))
    edit(ff)
    source, out = tmp_path / "ff.yaml", tmp_path / "out.yaml"
    source.write_text(yaml.safe_dump(ff))
    with pytest.raises(SystemExit) as exit_info:
        console_main(["convert", str(source), "-o", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "nothing written" in err, err


def test_report_lists_every_key_with_its_treatment(capsys):
    console_main(["convert", os.path.join(DATA, "dgpo_lora_sd3_5.yaml"), "--report"])
    text = capsys.readouterr().out
    assert "| `train.switch_ema_ref` | dropped |" in text and "| `train.dpo_beta` | mapped | model.dpo_beta" in text
    assert "| `config_file` | mapped | trainer.strategy: ddp" in text and "ZeRO" in text


def test_missing_and_malformed_inputs_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["convert", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a Flow-Factory config"):
        main(["convert", str(tmp_path / "list.yaml")])


def test_docs_convert_md_is_the_mapping_table():
    text = open(os.path.join(ROOT, "docs", "convert.md"), encoding="utf-8").read()
    assert rules_table() in text, "regenerate the table: flowrl convert --table (docs/convert.md says how)"
    assert {r.status for r in RULES.values()} == {MAPPED, DROPPED, REFUSED}


def test_eval_rewards_become_validation_only_rewards():
    ff = load(os.path.join(DATA, "grpo_lora_sd3_5.yaml"))
    ff["eval_rewards"] = [{"name": "text", "reward_model": "CLIP", "weight": 1.0, "batch_size": 8},
                          {"name": "pick", "reward_model": "PickScore", "weight": 0.5}]
    c = convert(ff, DATA)
    assert not c.refused
    assert c.out["model"]["init_args"]["eval_rewards"] == [
        {"weight": 1.0, "name": "clip_score", "label": "text"}, {"weight": 0.5, "name": "pickscore", "label": "pick"}]
    assert ("eval_rewards[0].batch_size", DROPPED, RULES["rewards.batch_size"].note) in c.report


@pytest.mark.parametrize("model_type, pipeline_class", [("wan2_i2v", "WanImageToVideoPipeline"),
                                                        ("flux1-kontext", None), ("z-image", None),
                                                        ("flux2", None), ("flux2-klein", None)])
def test_the_image_conditioned_and_newer_families_convert(tmp_path, model_type, pipeline_class):
    """Flow-Factory's editing, image-to-video and Z-Image model types become the flowrl families of the same models;
    wan2_i2v trains in WanImageToVideoPipeline whatever pipeline the model folder names (Wan2.2 TI2V-5B)."""
    ff = load(os.path.join(DATA, "grpo_lora_wan21_t2v.yaml"))
    ff["model"]["model_type"] = model_type
    source, out = tmp_path / "ff.yaml", tmp_path / "out.yaml"
    source.write_text(yaml.safe_dump(ff))
    console_main(["convert", str(source), "-o", str(out)])
    policy = load(out)["model"]["init_args"]["policy"]
    assert policy.get("pipeline_class") == pipeline_class


def test_an_editing_dataset_keeps_its_image_folder(tmp_path, monkeypatch):
    """A Flow-Factory editing dataset (train.jsonl whose image paths are relative to <dataset_dir>/images) converts
    to a prompt file and data.image_dir that flowrl reads the same images from."""
    import json

    from PIL import Image

    from flowrl.data import load_prompt_rows

    (tmp_path / "edits" / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "edits" / "images" / "cat.png")
    (tmp_path / "edits" / "train.jsonl").write_text(json.dumps({"prompt": "make it red", "image": "cat.png"}) + "\n")
    ff = load(os.path.join(DATA, "grpo_lora_sd3_5.yaml"))
    ff["model"]["model_type"] = "flux1-kontext"
    ff["data"] = {"dataset_dir": "edits"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ff.yaml").write_text(yaml.safe_dump(ff))
    console_main(["convert", "ff.yaml", "-o", "out.yaml"])
    data = load(tmp_path / "out.yaml")["data"]
    assert data["image_dir"] == os.path.join("edits", "images")
    rows = load_prompt_rows(data["train_prompts"], image_dir=data["image_dir"])
    assert rows.images == [(os.path.abspath(os.path.join("edits", "images", "cat.png")),)]


def test_flow_factorys_vlm_judge_becomes_vlm_judge(tmp_path):
    ff = load(os.path.join(DATA, "grpo_lora_sd3_5.yaml"))
    ff["rewards"] = [{"name": "judge", "reward_model": "vllm_evaluate", "api_base_url": "http://gpu7:8000/v1",
                      "vlm_model": "Qwen3-VL-8B", "max_concurrent": 16, "max_retries": 5, "api_key": "EMPTY",
                      "canonicalize": True}]
    (tmp_path / "ff.yaml").write_text(yaml.safe_dump(ff))
    console_main(["convert", str(tmp_path / "ff.yaml"), "-o", str(tmp_path / "out.yaml")])
    (entry,) = load(tmp_path / "out.yaml")["model"]["init_args"]["rewards"]
    assert entry["name"] == "vlm_judge" and entry["label"] == "judge"
    assert entry["args"] == {"template": VLM_TEMPLATE, "base_url": "http://gpu7:8000/v1", "model": "Qwen3-VL-8B",
                             "concurrency": 16, "retries": 5}
    assert "{prompt}" in VLM_TEMPLATE  # vlm_judge refuses a question without the prompt


@pytest.mark.parametrize("trainer_type, expected", [("grpo", {"latent_storage_dtype": "bfloat16", "offload_rollout": True}),
                                                    ("nft", {"offload_rollout": True})])
def test_memory_and_attention_options_map_where_they_do_something(tmp_path, trainer_type, expected):
    ff = load(os.path.join(DATA, "grpo_lora_sd3_5.yaml"))
    ff["train"].update(trainer_type=trainer_type, latent_storage_dtype="bf16", offload_samples_to_cpu=True)
    ff["model"]["attn_backend"] = "native"
    (tmp_path / "ff.yaml").write_text(yaml.safe_dump(ff))
    console_main(["convert", str(tmp_path / "ff.yaml"), "-o", str(tmp_path / "out.yaml")])
    init = load(tmp_path / "out.yaml")["model"]["init_args"]
    assert {k: init[k] for k in ("latent_storage_dtype", "offload_rollout") if k in init} == expected
    assert init["policy"]["attention_backend"] == "native"
