"""The toy-world pretraining script runs end to end, and the shipped checkpoint loads and samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowrl.toy import TOY_CHECKPOINT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import pretrain_toy as pretrain  # noqa: E402  (scripts/pretrain_toy.py: the toy's pretraining script)

SHIPPED = TOY_CHECKPOINT


def _load(path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe: StableDiffusion3Pipeline, prompts: list[str], guidance_scale: float = 5.0) -> torch.Tensor:
    return pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        height=32,
        width=32,
        max_sequence_length=0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_sigma_sampling_is_in_range_and_shift_moves_mass_up():
    gen = torch.Generator().manual_seed(0)
    for kind in pretrain.TIME_SAMPLINGS:
        cfg = pretrain.PretrainConfig(
            time_sampling=kind, time_shift=3.0 if kind == "shifted_uniform" else 1.0
        )
        s = pretrain.sample_sigmas(cfg, 4096, gen)
        assert s.shape == (4096,) and s.min() > 0 and s.max() < 1
    plain = pretrain.sample_sigmas(pretrain.PretrainConfig(time_sampling="uniform", time_shift=1.0), 4096, gen)
    shifted = pretrain.sample_sigmas(
        pretrain.PretrainConfig(time_sampling="shifted_uniform", time_shift=3.0), 4096, gen
    )
    assert shifted.mean() > plain.mean() + 0.1
    # the default (logit-normal shifted by 3, like the sampler) trains high noise levels more than the unshifted one
    default = pretrain.sample_sigmas(pretrain.PretrainConfig(), 4096, gen)
    unshifted = pretrain.sample_sigmas(pretrain.PretrainConfig(time_shift=1.0), 4096, gen)
    assert (default > 0.9).float().mean() > (unshifted > 0.9).float().mean() + 0.1
    with pytest.raises(ValueError, match="time_sampling"):
        pretrain.sample_sigmas(pretrain.PretrainConfig(time_sampling="cosine"), 4, gen)


def test_scene_sampler_draws_train_prompts_only_and_is_seeded():
    from flowrl.toy import shapes

    train, heldout = shapes.split_prompts(seed=0)
    a_px, a_pr = pretrain.SceneSampler(train, seed=3)(16)
    b_px, b_pr = pretrain.SceneSampler(train, seed=3)(16)
    assert a_px.shape == (16, 3, 32, 32) and 0 <= a_px.min() and a_px.max() <= 1
    assert a_pr == b_pr and torch.equal(a_px, b_px)
    assert set(a_pr) <= set(train) and not set(a_pr) & set(heldout)


def test_pretrain_script_runs_and_round_trips(tmp_path):
    out = tmp_path / "tiny"
    argv = ["--out", str(out), "--seed", "1", "--vae-steps", "3", "--steps", "3", "--batch-size", "4"]
    argv += ["--vae-batch-size", "4", "--warmup-steps", "2"]
    result = pretrain.main(argv)
    assert result["config"]["steps"] == 3 and result["train_wall_time_s"] > 0
    assert (out / "model_index.json").exists() and (out / "transformer" / "config.json").exists()
    assert json.loads((out / "pretrain_config.json").read_text())["seed"] == 1
    assert not list(out.rglob("*.bin")), "weights must be safetensors"

    pipe = _load(out)
    assert pipe.vae.config.scaling_factor > 0 and pipe.text_encoder_3 is None
    images = _sample(pipe, ["a red circle", "two blue squares"])
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_pretrain_is_deterministic_from_seed(tmp_path):
    argv = ["--seed", "2", "--vae-steps", "2", "--steps", "2", "--batch-size", "2", "--vae-batch-size", "2"]
    for name in ("a", "b"):
        pretrain.main(["--out", str(tmp_path / name), *argv])
    a, b = _load(tmp_path / "a"), _load(tmp_path / "b")
    for ma, mb in [(a.transformer, b.transformer), (a.vae, b.vae), (a.text_encoder_2, b.text_encoder_2)]:
        for (na, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
            assert torch.equal(pa, pb), na


def test_eval_writes_benchmark_json(tmp_path, monkeypatch):
    out, bench = tmp_path / "tiny", tmp_path / "bench.json"
    # a latent-downsampling variant: the evaluation must render and score 32 px images, not latent-sized ones
    arch = '{"vae_downsample": 1, "latent_channels": 8, "num_layers": 1}'
    pretrain.main(
        ["--out", str(out), "--vae-steps", "1", "--steps", "1", "--batch-size", "2", "--vae-batch-size", "2",
         "--architecture", arch, "--object-sizes", "8", "10"]
    )  # fmt: skip
    saved_config = json.loads((out / "pretrain_config.json").read_text())
    assert saved_config["architecture"]["vae_downsample"] == 1 and saved_config["object_sizes"] == [8, 10]
    assert _load(out).vae_scale_factor == 2
    result = pretrain.main(
        ["--out", str(out), "--eval-only", "--eval-samples", "1", "--eval-min-per-category", "1",
         "--eval-steps", "2", "--guidance-scales", "1", "4", "--benchmark-json", str(bench)]
    )  # fmt: skip
    saved = json.loads(bench.read_text())
    assert saved["best_guidance_scale"] in (1.0, 4.0)
    evals = saved["heldout"]
    assert [e["guidance_scale"] for e in evals] == [1.0, 4.0]
    from flowrl.toy.shapes import CATEGORIES

    assert set(evals[0]["accuracy"]) == set(CATEGORIES)
    assert 0 <= evals[0]["overall"] <= 1 and result["heldout"] == evals


def test_shipped_checkpoint_loads_and_generates():
    pipe = _load(SHIPPED)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 32  # 32 px images
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    images = _sample(
        pipe, ["a red circle", "a blue square left of a green triangle", "three yellow triangles"]
    )
    assert images.shape == (3, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a blank canvas


def test_latent_normalization_keeps_the_autoencoder_function():
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    vae = build_tiny_sd3_pipeline(seed=0).vae.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist
        before_mean, before_std, before_rec = z.mean, z.std, vae.decode(z.mean).sample
        mean, std = before_mean.mean(dim=(0, 2, 3)), before_mean.std(dim=(0, 2, 3))
        pretrain._normalize_latents(vae, mean, std)
        after = vae.encode(x).latent_dist
        after_rec = vae.decode(after.mean).sample
    view = (1, -1, 1, 1)
    torch.testing.assert_close(
        after.mean, (before_mean - mean.view(view)) / std.view(view), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(after.std, before_std / std.view(view), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(after_rec, before_rec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.mean.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor == 0.0


def test_downsampling_autoencoder_option():
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(seed=0, sample_size=32, vae_downsample=1, latent_channels=8, num_layers=1)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.sample_size == 16
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 8, 16, 16)
    images = _sample(pipe, ["a red circle"])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* vae_downsample"):
        build_tiny_sd3_pipeline(sample_size=20, vae_downsample=2, patch_size=2)


@pytest.mark.parametrize("arch", ['{"num_layer": 2}', "[1]", "num_layers=2"])
def test_bad_architecture_is_refused_before_any_work(tmp_path, arch, capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path / "x"), "--architecture", arch])
    assert "architecture" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("sizes", [["4", "10"], ["10", "8"], ["8", "13"]])
def test_bad_object_sizes_are_refused_before_any_work(tmp_path, sizes):
    with pytest.raises(ValueError, match="6 <= lo <= hi <= 12"):
        pretrain.main(["--out", str(tmp_path / "x"), "--object-sizes", *sizes])
    assert not (tmp_path / "x").exists()
