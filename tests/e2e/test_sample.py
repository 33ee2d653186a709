"""``flowrl sample``: a grid, the images and their scores from a base model, a checkpoint or an exported LoRA,
through the stock pipeline's own ``__call__``, or through flowrl's RolloutSampler with any dynamics."""

import json
import os

import pytest
import torch
from PIL import Image
from test_export import TOY_CONFIG, train_and_export

from flowrl.cli import console_main, main
from flowrl.errors import ConfigError
from flowrl.rewards import build_reward

FAST = ["--prompt", "a red circle", "--prompt", "two blue squares", "--num_per_prompt", "2",
        "--num_inference_steps", "4", "--no_progress"]


def images_of(out: str) -> torch.Tensor:
    records = json.load(open(os.path.join(out, "scores.json")))["images"]
    arrays = [torch.tensor(list(Image.open(os.path.join(out, r["image"])).getdata())) for r in records]
    return torch.stack(arrays).float()


def test_sample_from_the_base_model_writes_grid_images_and_scores(tmp_path, capsys):
    out = str(tmp_path / "base")
    summary = main(["sample", "--model", "flowrl:toy", *FAST, "--reward", "shapes", "--out", out])
    assert "4 images of 2 prompts, mean reward" in capsys.readouterr().out
    assert Image.open(os.path.join(out, "grid.png")).size[0] > 2 * 128  # two enlarged 32-pixel images a row
    records = summary["images"]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["two blue squares"] * 2
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    # The scores are the reward of the saved pictures (the reward sees 8-bit images, as saved).
    pixels = images_of(out).reshape(4, 32, 32, 3).permute(0, 3, 1, 2) / 255
    expected = build_reward("shapes")(pixels, [r["prompt"] for r in records])
    assert [r["reward"] for r in records] == pytest.approx(expected.tolist())
    assert summary["mean_reward"] == pytest.approx(float(expected.mean()))


def test_images_do_not_depend_on_the_batch_size(tmp_path):
    main(["sample", "--model", "flowrl:toy", *FAST, "--batch_size", "1", "--out", str(tmp_path / "one")])
    main(["sample", "--model", "flowrl:toy", *FAST, "--batch_size", "4", "--out", str(tmp_path / "four")])
    torch.testing.assert_close(images_of(str(tmp_path / "one")), images_of(str(tmp_path / "four")), atol=1, rtol=0)


def test_exported_lora_in_a_stock_pipeline_samples_what_the_checkpoint_samples(prompt_file, tmp_path, monkeypatch):
    """The same images from the training checkpoint (flowrl's peft LoRA) and from its export loaded by the stock
    pipeline's load_lora_weights (base model taken from the export); both differ from the base model's."""
    monkeypatch.chdir(tmp_path)
    run = train_and_export(TOY_CONFIG, None, prompt_file, tmp_path, "lora")
    assert run.info["call_kwargs"] == {"max_sequence_length": 0}  # the toy SD3 has no T5
    common = [*FAST, "--guidance_scale", "4.5", "--resolution", "32"]
    ckpt = main(["sample", "--ckpt_path", run.ckpt, "--config", run.config, *common, "--out", "ckpt"])
    lora = main(["sample", "--lora", run.out, *common, "--reward", "shapes", "--out", "lora"])
    main(["sample", "--model", "flowrl:toy", *common, "--out", "base"])
    # Nothing given: the run's validation sampling, recorded in the export, from either source.
    defaults = main(["sample", "--lora", run.out, *FAST[:6], "--no_progress", "--out", "defaults"])
    recorded = run.info["sampling"]
    assert recorded == {"num_inference_steps": 3, "guidance_scale": 4.5, "height": 32, "width": 32}
    assert {k: defaults[k] for k in recorded} == recorded
    from_ckpt = main(["sample", "--ckpt_path", run.ckpt, "--config", run.config, *FAST[:6], "--no_progress",
                      "--out", "ckpt-defaults"])
    assert {k: from_ckpt[k] for k in recorded} == recorded
    assert ckpt["mean_reward"] is not None  # the run's own reward (shapes) scores a checkpoint by default
    assert lora["mean_reward"] is not None
    torch.testing.assert_close(images_of("ckpt"), images_of("lora"), atol=1, rtol=0)  # at most 1/255 apart
    assert (images_of("ckpt") - images_of("base")).abs().max() > 8


def test_the_rollout_sampler_with_the_ode_draws_the_stock_pipelines_images(tmp_path):
    main(["sample", "--model", "flowrl:toy", *FAST, "--out", str(tmp_path / "stock")])
    summary = main(["sample", "--model", "flowrl:toy", *FAST, "--dynamics", "ODE", "--out", str(tmp_path / "ode")])
    assert summary["dynamics"].startswith("ODE") and summary["height"] == 32
    assert (images_of(str(tmp_path / "stock")) - images_of(str(tmp_path / "ode"))).abs().max() <= 1


def test_any_dynamics_draws_through_the_rollout_sampler(tmp_path):
    ode = main(["sample", "--model", "flowrl:toy", *FAST, "--dynamics", "ODE", "--out", str(tmp_path / "ode")])
    args = ["sample", "--model", "flowrl:toy", *FAST, "--dynamics", "CPS", "--noise_level", "0.5", "--sde_steps", "0",
            "1"]
    cps = main([*args, "--out", str(tmp_path / "cps")])
    main([*args, "--batch_size", "1", "--out", str(tmp_path / "again")])
    assert cps["dynamics"] == "CPS(noise_level=0.5)" and cps["sde_steps"] == [0, 1] and ode["sde_steps"] is None
    assert not torch.equal(images_of(str(tmp_path / "cps")), images_of(str(tmp_path / "ode")))  # the SDE explores
    assert torch.equal(images_of(str(tmp_path / "cps")), images_of(str(tmp_path / "again")))  # seeded per image


@pytest.mark.parametrize("args, match", [
    (["--noise_level", "0.5"], "give --dynamics too"),
    (["--dynamics", "ODE", "--noise_level", "0.5"], "--noise_level does nothing for --dynamics ODE"),
    (["--dynamics", "flowrl.dynamics.Nope"], "has no 'Nope'"),
], ids=["noise-without-dynamics", "noise-for-ode", "unknown-dynamics"])
def test_dynamics_options_are_checked_before_any_model_loads(args, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        main(["sample", "--model", "flowrl:toy", "--prompt", "x", *args, "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("args, match", [
    (["--model", "flowrl:toy"], "give prompts"),
    (["--model", "flowrl:toy", "--prompt", "x", "--ema"], "--ema needs --ckpt_path"),
    (["--model", "flowrl:toy", "--prompt", "x", "--reward", "no_such_reward"], "unknown reward"),
    (["--prompt", "x"], "give --model"),
    (["--lora", "missing-dir", "--prompt", "x"], "is not a directory"),
    (["--model", "flowrl:toy", "--prompt", "x", "--num_per_prompt", "0"], "must be >= 1"),
], ids=["no-prompts", "ema", "reward", "no-model", "lora-dir", "count"])
def test_bad_input_is_one_error_line(args, match, tmp_path, capsys):
    with pytest.raises(ConfigError, match=match):
        main(["sample", *args, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_:
        console_main(["sample", *args, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert not os.path.exists(tmp_path / "x")  # nothing written
