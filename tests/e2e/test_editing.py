"""Editing end to end: `flowrl fit` of NFT on the tiny FLUX.1-Kontext with an editing prompt file (rows naming the
images to edit) and the CLIP editing reward, `flowrl export` of its LoRA, and `flowrl sample` of the export with the
condition images through the stock pipeline's own call."""

import json
import os

import torch
from contract import image_prompt_file
from test_cli import tiny_overrides
from test_clip_rewards import tiny_clip  # noqa: F401 (a fixture)

from flowrl.cli import console_main, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "lightning_configs", "flux_kontext", "nft.yaml")
AREA = 16 * 24


def test_an_editing_run_trains_exports_and_samples_with_its_condition_images(tiny_pipeline_path, tiny_clip,  # noqa: F811
                                                                             prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    edits = image_prompt_file(tmp_path, ["make it red", "add a hat", "make it blue", "add a sun"])
    reward = f"[{{name: clip_edit, args: {{model_name_or_path: {tiny_clip}}}}}]"
    cli = main(["fit", "--config", CONFIG, *tiny_overrides(CONFIG, tiny_pipeline_path("flux_kontext"), prompt_file),
                f"--data.train_prompts={edits}", f"--data.val_prompts={edits}", f"--model.rewards={reward}",
                f"--model.policy.condition_image_area={AREA}"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step >= 2 and torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/loss"]))
    # the reward scored edits (clip_edit refuses samples without their condition image) in training and validation
    assert list(module.reward_fn.rewards) == ["clip_edit"]
    assert torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/reward_mean"]))
    assert torch.isfinite(torch.as_tensor(trainer.logged_metrics["val/reward"]))
    cached = [k for k in module.policy.prompt_cache._rows if "\x00" in k]
    assert len(cached) >= 4  # rows keyed by prompt and image content
    ckpt = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(ckpt)
    out = str(tmp_path / "export")
    assert console_main(["export", "--ckpt_path", ckpt, "--config", os.path.join(trainer.log_dir, "config.yaml"),
                         "--out", out]) is None
    assert json.load(open(os.path.join(out, "flowrl_export.json")))["condition_image_area"] == AREA
    # flowrl sample of the export: the stock FluxKontextPipeline with each row's image, at the trained condition size
    samples = str(tmp_path / "samples")
    reward_arg = json.dumps({"name": "clip_edit", "args": {"model_name_or_path": tiny_clip}})
    assert console_main(["sample", "--lora", out, "--prompts", edits, "--num_per_prompt", "2", "--out", samples,
                         "--num_inference_steps", "3", "--resolution", "16", "--reward", reward_arg,
                         "--no_progress"]) is None
    summary = json.load(open(os.path.join(samples, "scores.json")))
    assert len(summary["images"]) == 8 and all("reward_clip_edit" in r for r in summary["images"])
    # the stock call's images are flowrl's own ODE sampling of the same export with the same condition images
    flowrl_samples = str(tmp_path / "ode")
    assert console_main(["sample", "--lora", out, "--prompts", edits, "--num_per_prompt", "2", "--out",
                         flowrl_samples, "--num_inference_steps", "3", "--resolution", "16", "--dynamics", "ODE",
                         "--no_progress"]) is None
    import numpy as np
    from PIL import Image

    for record in summary["images"]:
        a = np.asarray(Image.open(os.path.join(samples, record["image"])), dtype=np.int16)
        b = np.asarray(Image.open(os.path.join(flowrl_samples, record["image"])), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, record
