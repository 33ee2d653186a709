"""``flowrl export``: a checkpoint of ``flowrl fit`` read back by stock diffusers gives flowrl's velocity.

Other families reuse :func:`assert_export_round_trip` (see its docstring)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from test_cli import tiny_overrides

from flowrl.cli import console_main, main
from flowrl.export import EXPORT_INFO, build_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD3_LORA_CONFIG = os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml")
TOY_CONFIG = os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml")  # flowrl:toy, finetune_type: full
PROMPTS = ["a red circle", "two blue squares"]


def fast_overrides(config: str, base_path: str | None, prompt_file: str, finetune_type: str) -> list[str]:
    """test_cli's tiny_overrides, one optimizer step, no validation, and the fine-tuning type asked for."""
    args = tiny_overrides(config, base_path, prompt_file) + [
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--data.batch_size=2",
        "--model.train_batch_size=2",
        f"--model.policy.finetune_type={finetune_type}",
    ]
    if finetune_type == "lora":  # alpha != rank: the exported scale (alpha / r = 3) must survive loading
        args += ["--model.policy.lora_rank=2", "--model.policy.lora_alpha=6"]
    return args


def null_components(path: str) -> dict:
    """``None`` for every component saved as null (an SD3 without T5): stock from_pretrained needs them passed."""
    index = json.load(open(os.path.join(path, "model_index.json")))
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


def train_and_export(config: str, base_path: str | None, prompt_file: str, tmp_path, finetune_type: str,
                     extra_overrides=(), export_args=()) -> SimpleNamespace:
    """``flowrl fit`` for one optimizer step, trained parameters randomised (a non-zero LoRA / a changed
    transformer), a checkpoint, then ``flowrl export`` with the config the run saved."""
    cli = main(["fit", "--config", config, *fast_overrides(config, base_path, prompt_file, finetune_type),
                *extra_overrides])
    assert cli.trainer.global_step >= 1
    module = cli.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    ckpt = str(tmp_path / "run.ckpt")
    cli.trainer.save_checkpoint(ckpt)
    run_config = os.path.join(cli.trainer.log_dir, "config.yaml")  # written by flowrl fit
    assert os.path.isfile(run_config)
    out = str(tmp_path / "export")
    assert console_main(["export", "--ckpt_path", ckpt, "--config", run_config, "--out", out, *export_args]) is None
    return SimpleNamespace(module=module, policy=module.policy.eval(), ckpt=ckpt, config=run_config, out=out,
                           info=json.load(open(os.path.join(out, EXPORT_INFO))))


def _inputs(module):
    policy = module.policy
    latents = policy.prepare_latents(len(PROMPTS), module.height, module.width, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.35])
    return latents, sigma, policy.encode_prompt(PROMPTS)


def assert_export_round_trip(base_path, pipeline_class, tmp_path, prompt_file, *, config=SD3_LORA_CONFIG,
                             finetune_type="lora", denoise=None, extra_overrides=(), atol=1e-5):
    """Train ``config`` on ``base_path`` (``None``: the config's own model) for a step, export it with ``flowrl
    export``, load the export into a fresh stock pipeline and check that its transformer gives flowrl's velocity
    (guidance 1; same latents, sigma and prompt embeddings) and not the base model's.

    * lora: ``pipeline_class.from_pretrained(base).load_lora_weights(out)``; rank and alpha as trained;
    * full: ``DiffusionPipeline.from_pretrained(out)`` is a ``pipeline_class`` whose frozen components equal the base's.

    ``denoise(transformer, latents, sigma, cond)`` calls a stock transformer; the default is the family adapter's
    ``forward`` (it only formats the inputs). A family's test: ``assert_export_round_trip(tiny_pipeline_path("flux"),
    FluxPipeline, tmp_path, prompt_file, config=<its lora config>)`` (and ``finetune_type="full"``).
    Returns the run (``train_and_export``'s namespace)."""
    run = train_and_export(config, base_path, prompt_file, tmp_path, finetune_type, extra_overrides)
    policy = run.policy
    base = policy.pipeline.name_or_path
    guidance = 1.0 if policy.adapter.guidance_mode == "distilled" else None
    denoise = denoise or (lambda tr, x, s, c: policy.adapter.forward(tr, x, s, c, guidance))
    latents, sigma, cond = _inputs(run.module)

    def stock(transformer):
        with torch.no_grad():
            return denoise(transformer, latents, sigma, cond).float()

    with torch.no_grad():
        expected = policy.velocity(latents, sigma, cond, guidance_scale=1.0)
    base_pipe = pipeline_class.from_pretrained(base, **null_components(base))
    base_out = stock(base_pipe.transformer)
    assert run.info["finetune_type"] == finetune_type
    assert run.info["pipeline_class"] == pipeline_class.__name__ and run.info["base_model"] == base
    assert run.info["trainer_type"] == run.module.trainer_type and run.info["weights"] == "live"
    if finetune_type == "lora":
        assert os.path.isfile(os.path.join(run.out, "pytorch_lora_weights.safetensors"))
        assert (run.info["lora_rank"], run.info["lora_alpha"], run.info["lora_scale"]) == (2, 6, 3.0)
        assert run.info["target_modules"] == sorted(policy.transformer.peft_config["default"].target_modules)
        pipe = base_pipe
        pipe.load_lora_weights(run.out)
        (loaded,) = pipe.transformer.peft_config.values()
        assert (loaded.r, loaded.lora_alpha) == (2, 6)
    else:
        pipe = DiffusionPipeline.from_pretrained(run.out, **null_components(run.out))
        assert type(pipe) is pipeline_class
        assert run.info["null_components"] == sorted(null_components(run.out))
        for name in policy.adapter.frozen_components:
            ours, theirs = getattr(pipe, name, None), getattr(base_pipe, name, None)
            assert (ours is None) == (theirs is None), name
            if ours is not None:
                for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
                    assert torch.equal(a, b), f"{name}.{k}"
    out = stock(pipe.transformer)
    torch.testing.assert_close(out, expected, atol=atol, rtol=atol)
    assert (out - base_out).abs().max() > 1e-3, "the export equals the base model: nothing trained was exported"
    return run


def sd3_denoise(transformer, latents, sigma, cond):
    """SD3's transformer called directly (not through flowrl's adapter)."""
    return transformer(hidden_states=latents, timestep=sigma * 1000, encoder_hidden_states=cond["prompt_embeds"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_export_round_trip_tiny_sd3(finetune_type, tiny_sd3_path, prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_export_round_trip(tiny_sd3_path, StableDiffusion3Pipeline, tmp_path, prompt_file,
                             finetune_type=finetune_type, denoise=sd3_denoise)


def test_export_round_trip_toy_lora(prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = assert_export_round_trip(None, StableDiffusion3Pipeline, tmp_path, prompt_file, config=TOY_CONFIG,
                                   finetune_type="lora", denoise=sd3_denoise)
    assert run.info["pretrained_model_name_or_path"] == "flowrl:toy"


def test_export_round_trip_toy_full_and_ema(prompt_file, tmp_path, monkeypatch):
    """The shipped toy config as it is (full fine-tuning, EMA callback); ``--ema`` exports the EMA average."""
    monkeypatch.chdir(tmp_path)
    run = assert_export_round_trip(None, StableDiffusion3Pipeline, tmp_path, prompt_file, config=TOY_CONFIG,
                                   finetune_type="full", denoise=sd3_denoise)
    ema_out = str(tmp_path / "export-ema")
    console_main(["export", "--ckpt_path", run.ckpt, "--config", run.config, "--out", ema_out, "--ema"])
    assert json.load(open(os.path.join(ema_out, EXPORT_INFO)))["weights"] == "ema"
    ckpt = torch.load(run.ckpt, weights_only=True)
    (average,) = [s["ema"] for s in ckpt["callbacks"].values() if isinstance(s, dict) and "ema" in s]
    exported = DiffusionPipeline.from_pretrained(ema_out, **null_components(ema_out)).transformer.state_dict()
    prefix = "policy.transformer."
    assert set(average) == {n for n, p in run.module.named_parameters() if p.requires_grad}
    changed = 0
    for name, value in average.items():
        torch.testing.assert_close(exported[name[len(prefix):]], value.float(), atol=0, rtol=0)
        changed += not torch.equal(value.float(), ckpt["state_dict"][name].float())
    assert changed  # the average is not the (randomised) live weights


# ------------------------------------------------------------------------------------------------ bad input
def _one_error_line(capsys, match: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        console_main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--config", SD3_LORA_CONFIG,
                      "--out", str(out)])
    assert info.value.code == 2
    _one_error_line(capsys, "does not exist")
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_lora_checkpoint(tiny_sd3_path, tmp_path_factory):
    """A checkpoint-shaped file holding the trained parameters of the tiny SD3 LoRA module (rank 2), no training."""
    path = tmp_path_factory.mktemp("ckpt")
    (path / "prompts.txt").write_text("a red circle\n")
    overrides = fast_overrides(SD3_LORA_CONFIG, tiny_sd3_path, str(path / "prompts.txt"), "lora")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        module = build_module([SD3_LORA_CONFIG], overrides)
    trained = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"state_dict": trained, "global_step": 0}, path / "lora.ckpt")
    (path / "garbage.ckpt").write_text("not a checkpoint\n")
    return SimpleNamespace(dir=path, overrides=overrides)


@pytest.mark.parametrize(
    "ckpt, extra, match",
    [
        ("lora.ckpt", ["--model.policy.lora_rank=3"], "another shape"),
        ("lora.ckpt", ["--model.policy.finetune_type=full"], "not in it"),
        ("lora.ckpt", ["--model.policy.target_modules=[attn.to_q]"], "not trained by the config"),
        ("lora.ckpt", ["--ema"], "no EMA state"),
        ("garbage.ckpt", [], "is truncated or not a checkpoint"),
        ("lora.ckpt", ["--no_such_flag"], "unrecognized arguments"),
    ],
    ids=["rank", "finetune_type", "targets", "ema", "garbage", "flag"],
)
def test_mismatched_checkpoint_is_one_error_line(ckpt, extra, match, tiny_lora_checkpoint, tmp_path, monkeypatch,
                                                 capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        console_main(["export", "--ckpt_path", str(tiny_lora_checkpoint.dir / ckpt), "--config", SD3_LORA_CONFIG,
                      "--out", str(out), *tiny_lora_checkpoint.overrides, *extra])
    assert info.value.code == 2
    _one_error_line(capsys, match)
    assert not out.exists()


def test_missing_config_is_one_error_line(tiny_lora_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        console_main(["export", "--ckpt_path", str(tiny_lora_checkpoint.dir / "lora.ckpt"), "--config",
                      str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    _one_error_line(capsys, "does not exist")


def test_matching_fake_checkpoint_exports_and_refuses_a_used_out_dir(tiny_lora_checkpoint, tmp_path, monkeypatch,
                                                                    capsys):
    """Control for the mismatch cases: the same file and overrides export; a second export into it is refused."""
    monkeypatch.chdir(tmp_path)
    args = ["export", "--ckpt_path", str(tiny_lora_checkpoint.dir / "lora.ckpt"), "--config", SD3_LORA_CONFIG,
            "--out", str(tmp_path / "out"), *tiny_lora_checkpoint.overrides]
    console_main(args)
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    with pytest.raises(SystemExit):
        console_main(args)
    _one_error_line(capsys, "not empty")
    console_main([*args, "--overwrite"])


def test_lora_scale_folded_when_the_loader_stores_no_metadata(tiny_sd3_path, tmp_path, monkeypatch):
    """A loader mixin whose save_lora_weights takes no adapter metadata: alpha / r is folded into lora_B, and the
    stock pipeline (which then loads with scale 1) still gives flowrl's velocity."""
    from flowrl.export import export_policy
    from flowrl.policy import FlowMatchingPolicy

    original = StableDiffusion3Pipeline.save_lora_weights.__func__

    def save_without_metadata(cls, save_directory, transformer_lora_layers=None, safe_serialization=True):
        return original(cls, save_directory, transformer_lora_layers=transformer_lora_layers,
                        safe_serialization=safe_serialization)

    monkeypatch.setattr(StableDiffusion3Pipeline, "save_lora_weights", classmethod(save_without_metadata))
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, lora_alpha=6).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    info = json.load(open(os.path.join(export_policy(policy, tmp_path / "out"), EXPORT_INFO)))
    assert info["lora_alpha_stored_in"] == "folded_into_lora_B" and info["lora_scale"] == 3.0
    module = SimpleNamespace(policy=policy, height=16, width=16)
    latents, sigma, cond = _inputs(module)
    with torch.no_grad():
        expected = policy.velocity(latents, sigma, cond)
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, **null_components(tiny_sd3_path))
        base = sd3_denoise(pipe.transformer, latents, sigma, cond)
        pipe.load_lora_weights(str(tmp_path / "out"))
        out = sd3_denoise(pipe.transformer, latents, sigma, cond)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-3
