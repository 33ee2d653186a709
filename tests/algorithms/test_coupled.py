"""The coupled paradigm end to end: step selection wiring and configuration errors through the CLI."""

import os

import pytest
from tiny import make_module, seed_options

from flowrl.algorithms import GRPO
from flowrl.cli import main
from flowrl.policy import PolicyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD3_CONFIG = os.path.join(ROOT, "lightning_configs", "sd35", "grpo.yaml")


def make_grpo(path, **kw):
    overrides = {"num_inference_steps": 6, "guidance_scale": 1.0, "train_batch_size": 4, **kw}
    return make_module(GRPO, path, lora_rank=2, **overrides)


def tiny_args(tiny_sd3_path, prompt_file):
    return [
        "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0",
        f"--model.policy.pretrained_model_name_or_path={tiny_sd3_path}", "--model.policy.frozen_dtype=float32",
        "--model.policy.lora_rank=2", "--model.resolution=16", "--model.eval.resolution=16",
        "--model.group_size=2", "--model.num_inference_steps=4", "--model.train_batch_size=4",
        f"--data.train_prompts={prompt_file}", f"--data.val_prompts={prompt_file}", "--data.batch_size=4",
    ]


# ---------------------------------------------------------------- step selection reaches the rollout


def test_num_train_steps_draws_from_train_steps(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path, train_steps=[1, 2, 4], num_train_steps=2)
    seen = set()
    for iteration in range(3):
        module.iteration = iteration
        rollout = module.rollout(["a red circle"] * 2)
        assert len(rollout.train_steps) == 2 and set(rollout.train_steps) <= {1, 2, 4}
        assert rollout.train_steps == module.step_selector.select(iteration)
        assert rollout.latents.shape[1] == rollout.log_probs.shape[1] == 2
        seen |= set(rollout.train_steps)
    assert len(seen) > 2  # the draw changes with the iteration


def test_progressive_window_with_stride_reaches_the_rollout(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path, window_size=2, window_shift_interval=1, window_stride=2)
    assert module.step_selector.window_stride == 2 and module.hparams["step_selection"]["init_args"]["window_stride"] == 2
    # N = 6: trainable steps 0..4, window starts 0, 2 (next would pass step 4), then back to 0
    expected = {0: [0, 1], 1: [2, 3], 2: [0, 1]}
    for iteration, steps in expected.items():
        module.iteration = iteration
        assert module.rollout(["a red circle"] * 2).train_steps == steps


def test_window_stride_is_a_cli_option(tiny_sd3_path, prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", SD3_CONFIG, *tiny_args(tiny_sd3_path, prompt_file), "--model.window_size=1",
                "--model.window_shift_interval=1", "--model.window_stride=2"], run=False)
    assert cli.model.step_selector.window_stride == 2 and cli.model.step_selector.select(1) == [2]


# ---------------------------------------------------------------- configuration errors, before any work


REFERENCE_BAD_KL = """
trainer:
  callbacks:
    - class_path: callbacks.ReferenceModel
      init_args: {kl_beta: 0.1, kl_type: kl-based}
"""


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--model.dynamics_type=ODE"], "decoupled trainer (nft, awm)"),
        (["--trainer_type=grpo-guard", "--model.dynamics_type=ODE"], "dynamics: flowrl.dynamics.FlowSDE"),
        (["--trainer_type=grpo-guard", "--model.dynamics_type=Dance-SDE"], "dynamics: flowrl.dynamics.FlowSDE"),
        (["--trainer_type=grpo-guard", "--model.dynamics_type=CPS"], "dynamics: flowrl.dynamics.FlowSDE"),
        (["--model.train_steps=[0,1]", "--model.num_train_steps=3"], "lower it to at most 2"),
        (["--model.train_steps=[3]"], "out of range: valid step indices are 0..2"),
        (["--model.train_steps=[-1]"], "out of range"),
        (["--model.window_size=2"], "window_shift_interval"),
        (["--config", "BAD_KL"], "choose one of 'x-based', 'v-based'"),
    ],
    ids=["ode-grpo", "ode-guard", "dance-guard", "cps-guard", "num_train_steps", "step-past-schedule",
         "negative-step", "window-without-interval", "kl_type"],
)
def test_configuration_errors_name_the_fix(overrides, match, tiny_sd3_path, prompt_file, tmp_path, monkeypatch,
                                           capsys):
    monkeypatch.chdir(tmp_path)
    bad_kl = tmp_path / "bad_kl.yaml"
    bad_kl.write_text(REFERENCE_BAD_KL)
    overrides = [str(bad_kl) if o == "BAD_KL" else o for o in overrides]
    args = ["fit", "--config", SD3_CONFIG, *tiny_args(tiny_sd3_path, prompt_file), *overrides]
    with pytest.raises((ValueError, SystemExit)) as info:
        main(args)
    text = str(info.value) + capsys.readouterr().err
    assert match in text
    assert not os.path.exists(tmp_path / "runs")  # nothing was started


@pytest.mark.parametrize("trainer, dynamics_type", [("grpo", "Flow-SDE"), ("grpo", "Dance-SDE"), ("grpo", "CPS"),
                                                    ("grpo-guard", "Flow-SDE")])  # guard takes Flow-SDE only
def test_coupled_trainers_refuse_noise_level_zero(tiny_sd3_path, trainer, dynamics_type):
    """At noise level 0 every trained step has std 0: a constant log-prob and a zero policy gradient."""
    from flowrl.algorithms import ALGORITHMS
    from flowrl.errors import ConfigError

    with pytest.raises(ConfigError, match="noise_level > 0"):
        ALGORITHMS[trainer](policy=PolicyConfig(tiny_sd3_path, lora_rank=2), resolution=16, num_inference_steps=4,
                            group_size=2, **seed_options(dynamics_type=dynamics_type, noise_level=0.0))


