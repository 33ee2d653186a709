"""Options that would do nothing, or values outside their range, are refused by name before any work starts."""

import os
import subprocess
import sys

import pytest
from conftest import parsed_config
from tiny import make_module

from flowrl.algorithms import ALGORITHMS, AWM, GRPO, NFT, DiffusionOPD, GRPOGuard
from flowrl.cli import console_main, main
from flowrl.errors import ConfigError
from flowrl.fit import COMPONENT_OPTIONS, options_of
from flowrl.policy import PolicyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(ROOT, "lightning_configs", "toy")


# ------------------------------------------------------------------ options of another component
@pytest.mark.parametrize("cls, option, value", [
    (NFT, "clip_range", 1e-4), (GRPO, "time_shift", 3.0), (GRPO, "guard_loss_weighting", "none"),
    (NFT, "awm_weighting", "t"), (AWM, "nft_beta", 0.5),
])
def test_python_constructor_refuses_an_option_the_algorithm_does_not_take(tiny_sd3_path, cls, option, value):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{option}'"):
        make_module(cls, tiny_sd3_path, **{option: value})


def test_cli_names_the_component_that_takes_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.clip_range does nothing for flowrl\.algorithms\.NFT: it is an "
                                          r"option of .*GRPO \(trainer_type grpo\).*AWM"):
        main(["--config", os.path.join(TOY, "nft.yaml"), "--model.clip_range=1e-4"], run=False)
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  time_shift: 3.0\n")
    with pytest.raises(ConfigError, match=r"model\.time_shift does nothing for flowrl\.algorithms\.GRPO.*NFT"):
        main(["--config", os.path.join(TOY, "grpo.yaml"), "--config", str(extra)], run=False)
    with pytest.raises(ConfigError, match=r"model\.clip_range does nothing for flowrl\.algorithms\.NFT"):
        main(["--config", os.path.join(TOY, "nft.yaml"), "--model.clip_range", "0.2"], run=False)
    with pytest.raises(ConfigError, match=r"noise_level does nothing for flowrl\.dynamics\.ODE.*FlowSDE"):
        main(["--config", os.path.join(TOY, "nft.yaml"), "--model.dynamics.noise_level=0.5"], run=False)


def test_a_saved_config_is_the_class_path_form_and_builds_the_same_module(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    data = parsed_config(os.path.join(TOY, "nft.yaml"))
    assert data["model"]["class_path"] == "flowrl.algorithms.NFT"
    assert data["model"]["init_args"]["dynamics"]["class_path"] == "flowrl.dynamics.ODE"
    assert "clip_range" not in data["model"]["init_args"]  # only the options NFT takes
    for fit_only in ("ckpt_path", "weights_only"):  # Trainer.fit's, not the config's
        data.pop(fit_only, None)
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(data))
    cli = main(["--config", str(saved), "--trainer.logger=false"], run=False)
    assert type(cli.model) is NFT and cli.model.hparams["num_train_timesteps"] == 3


@pytest.mark.parametrize("option, value", [
    ("train_steps", [0, 1]), ("num_train_steps", 1), ("window_size", 2), ("window_shift_interval", 5),
])
@pytest.mark.parametrize("cls", [NFT, AWM])
def test_step_selection_under_ode_is_refused(tiny_sd3_path, cls, option, value):
    with pytest.raises(ConfigError, match=r"model\.step_selection.*ODE dynamics.*would do nothing"):
        make_module(cls, tiny_sd3_path, dynamics_type="ODE", **{option: value})


def test_noise_level_of_the_ode_is_refused():
    from flowrl.dynamics import ODE, build_dynamics

    with pytest.raises(TypeError):
        ODE(noise_level=0.5)
    with pytest.raises(ConfigError, match="noise_level does nothing for dynamics_type ODE"):
        build_dynamics("ODE", 0.5)


def test_sde_options_with_stochastic_decoupled_sampling_are_used(tiny_sd3_path):
    module = make_module(NFT, tiny_sd3_path, dynamics_type="CPS", noise_level=0.5, train_steps=[0, 1])
    assert module.step_selector.train_steps == [0, 1] and module.dynamics.noise_level == 0.5


def test_cli_refuses_train_steps_for_ode_nft():
    with pytest.raises(ConfigError, match="model.step_selection"):
        main(["--config", os.path.join(TOY, "nft.yaml"), "--model.train_steps=[0,1]"], run=False)


def test_same_initial_noise_under_ode_is_refused(tiny_sd3_path):
    with pytest.raises(ConfigError, match="same image"):
        make_module(NFT, tiny_sd3_path, dynamics_type="ODE", same_initial_noise=True)


# ------------------------------------------------------------------ clip ranges as c or [low, high]
def test_constructors_take_pairs_and_refuse_bad_ones(tiny_sd3_path):
    module = make_module(GRPO, tiny_sd3_path, clip_range=[-1e-4, 2e-4], adv_clip_range=[-3.0, 5.0])
    assert module.clip_range == [-1e-4, 2e-4] and module.adv_clip_range == [-3.0, 5.0]
    for bad in ([1e-4, 2e-4], [-1.0], [-1.0, 0.0, 1.0]):
        with pytest.raises(ConfigError, match="low < 0 < high"):
            make_module(GRPO, tiny_sd3_path, clip_range=bad)
    assert make_module(NFT, tiny_sd3_path, adv_clip_range=[-2.0, 5.0]).adv_clip_range == [-2.0, 5.0]


def test_cli_parses_a_pair():
    cli = main(["--config", os.path.join(TOY, "grpo.yaml"), "--trainer.logger=false",
                "--model.clip_range=[-0.001,0.002]", "--model.adv_clip_range=[-4,5]"], run=False)
    assert cli.model.clip_range == [-0.001, 0.002] and cli.model.adv_clip_range == [-4.0, 5.0]


# ------------------------------------------------------------------ every numeric option has a range
#: per option, a value out of its range (extra options it needs to be reached), the trainers it applies to
OUT_OF_RANGE = {
    "group_size": ({"group_size": 1}, None),
    "resolution": ({"resolution": 0}, None),
    "num_inference_steps": ({"num_inference_steps": 1}, None),
    "guidance_scale": ({"guidance_scale": 0.5}, None),
    "num_inner_epochs": ({"num_inner_epochs": 0}, None),
    "train_batch_size": ({"train_batch_size": 0}, None),
    "rollout_batch_size": ({"rollout_batch_size": 0}, None),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 0}, None),
    "max_grad_norm": ({"max_grad_norm": -1.0}, None),
    "clip_range": ({"clip_range": -0.1}, None),
    "adv_clip_range": ({"adv_clip_range": 0.0}, None),
    "noise_level": ({"noise_level": 1.5, "dynamics_type": "CPS"}, None),
    "train_steps": ({"train_steps": [99], "dynamics_type": "CPS"}, None),
    "num_train_steps": ({"num_train_steps": 0, "dynamics_type": "CPS"}, None),
    "window_size": ({"window_size": 0, "window_shift_interval": 1, "dynamics_type": "CPS"}, None),
    "window_shift_interval": ({"window_size": 2, "window_shift_interval": 0, "dynamics_type": "CPS"}, None),
    "window_stride": ({"window_size": 2, "window_shift_interval": 1, "window_stride": 0, "dynamics_type": "CPS"},
                      None),
    "eval": ({"eval": {"guidance_scale": 0.5}}, None),
    "num_train_timesteps": ({"num_train_timesteps": 0}, None),
    "time_shift": ({"time_shift": 0.0}, None),
    "timestep_fraction": ({"timestep_fraction": 1.5}, None),
    "train_guidance_scale": ({"train_guidance_scale": 0.5}, None),
    "nft_beta": ({"nft_beta": 0.0}, None),
    "ghuber_power": ({"ghuber_power": 0.0}, None),
    "ema_kl_beta": ({"ema_kl_beta": -0.1}, None),
    "kl_mask_threshold": ({"kl_mask_threshold": 0.0}, None),
    "dpo_beta": ({"dpo_beta": 0.0}, None),
    "crd_beta": ({"crd_beta": -1.0}, None),
    "kl_cfg": ({"kl_cfg": 0.5}, None),
    "weight_temp": ({"weight_temp": float("nan")}, None),
    "pathwise_coef": ({"pathwise_coef": 0.0}, None),
    "teachers": ({"teachers": [{"path": "any", "weight": -1.0}]}, None),
}
#: options without a numeric range (choices, booleans, objects, any integer seed)
NOT_NUMERIC = {"policy", "rewards", "eval_rewards", "dynamics", "step_selection", "global_std", "same_initial_noise",
               "optimizer", "lr_scheduler", "seed", "time_sampling_strategy", "awm_weighting", "guard_loss_weighting",
               "advantage_estimator", "on_reward_error", "async_rewards", "add_kl_coefficient", "clip_dsm",
               "use_ema_ref", "use_shared_noise", "adaptive_logp", "reward_adaptive_kl", "crd_loss_type",
               "ref_param_device", "latent_storage_dtype", "offload_rollout"}
MORE_OUT_OF_RANGE = [  # second values of options whose range has two ends, or depends on the schedule
    ("noise_level", {"noise_level": 1.5}),  # Flow-SDE: above sqrt(2)
    ("noise_level", {"noise_level": -0.1}),
    ("clip_range", {"clip_range": 0.0}),
    ("eval.num_inference_steps", {"eval": {"num_inference_steps": 0}}),
    ("eval.resolution", {"eval": {"resolution": 0}}),
    ("num_train_timesteps", {"num_train_timesteps": 9}),  # more than the steps in range
    ("timestep_fraction", {"timestep_fraction": 0.0}),
]


@pytest.mark.parametrize("trainer", sorted(ALGORITHMS))
def test_every_option_of_every_trainer_has_a_refused_out_of_range_value(tiny_sd3_path, trainer):
    cls = ALGORITHMS[trainer]
    options = options_of(cls) | set(COMPONENT_OPTIONS)  # the components' options by their seed names
    unlisted = options - set(OUT_OF_RANGE) - NOT_NUMERIC
    assert not unlisted, f"{trainer}: options without an out-of-range check in this test: {sorted(unlisted)}"
    base = {"dynamics_type": "Flow-SDE", "noise_level": 0.7} if cls.needs_log_prob else {}
    if cls is DiffusionOPD:  # a valid teacher (the tiny model's folder), so that the other checks are reached
        base["teachers"] = [{"path": tiny_sd3_path}]
    cases = [(name, OUT_OF_RANGE[name][0]) for name in sorted(options & set(OUT_OF_RANGE))]
    cases += [(name, bad) for name, bad in MORE_OUT_OF_RANGE if name.split(".")[0] in options]
    for name, bad in cases:
        kwargs = {**base, **bad}
        if cls is GRPOGuard and kwargs.get("dynamics_type") == "CPS":
            kwargs["dynamics_type"] = "Flow-SDE"  # grpo-guard takes Flow-SDE only (1.5 is above its sqrt(2) too)
        with pytest.raises(ConfigError) as info:
            make_module(cls, tiny_sd3_path, **kwargs)
        message = str(info.value)
        assert name.split(".")[-1] in message, f"{trainer} {bad}: the message does not name {name}: {message}"


@pytest.mark.parametrize("field, value", [("lora_rank", 0), ("lora_alpha", -1.0), ("lora_dropout", 1.0),
                                          ("max_sequence_length", 0)])
def test_policy_numbers_are_checked(tiny_sd3_path, field, value):
    with pytest.raises(ConfigError, match=field):
        PolicyConfig(tiny_sd3_path, **{field: value})


def test_noise_level_too_large_for_the_schedule_is_refused(tiny_sd3_path):
    """Below sqrt(2) but still too large for a later step of a coarse schedule: checked once the model loads."""
    with pytest.raises(ConfigError, match="mean coefficient on x"):
        make_module(GRPO, tiny_sd3_path, dynamics_type="Flow-SDE", noise_level=1.4, num_inference_steps=4)


# ------------------------------------------------------------------ the command line: one error line
def _flowrl(*args: str, env=None) -> subprocess.CompletedProcess:
    code = "import sys; from flowrl.cli import console_main; console_main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_flowrl_fit_prints_one_error_line_without_a_traceback():
    # a constructor's check (noise_level 0 for a coupled trainer): raised while the classes are built
    done = _flowrl("fit", "--config", os.path.join(TOY, "grpo.yaml"), "--model.noise_level=0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "noise_level > 0" in errors[0], done.stderr


def test_debug_flag_brings_the_exception_back():
    with pytest.raises(ConfigError, match="noise_level > 0"):
        console_main(["fit", "--config", os.path.join(TOY, "grpo.yaml"), "--model.noise_level=0", "--debug"])


def test_console_main_error_line_for_an_option_of_another_trainer(capsys):
    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", os.path.join(TOY, "nft.yaml"), "--model.clip_range=0.1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.clip_range does nothing for flowrl.algorithms.NFT") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
