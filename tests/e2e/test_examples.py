"""Every file under examples/ runs: what the README points users to is kept working."""

import glob
import os

import pytest
import torch
from test_cli import tiny_overrides
from test_export import TOY_CONFIG, train_and_export

from flowrl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
NFT_CONFIG = os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)


def test_every_example_has_a_test():
    tested = {"own_trainer.py", "ema_classifier.py", "my_reward.py", "my_reward.yaml", "generate_with_diffusers.py",
              "new_algorithm.py", "new_algorithm.yaml", "new_model_family.py"}  # new_model_family.py: tests/families/test_example_model_family.py
    files = {os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.*"))}
    assert files == tested, f"examples without a test: {sorted(files - tested)}"


@pytest.mark.parametrize("algorithm", ["nft", "grpo"])
def test_own_trainer_with_own_datamodule_logger_and_checkpoint(algorithm, tmp_path):
    import own_trainer

    trainer = own_trainer.main(algorithm, steps=2, group_size=2, prompts_per_batch=2, out=str(tmp_path / "run"))
    assert trainer.global_step == 2
    assert "train/reward_mean" in trainer.logged_metrics
    if algorithm == "grpo":  # (NFT has no probability ratio)
        assert trainer.logged_metrics["train/ratio_first_update_max_abs_dev"] == 0  # on-policy first update
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert glob.glob(str(tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv"))


def test_ema_on_an_unrelated_classifier():
    import ema_classifier

    model, ema, averaged, accuracy = ema_classifier.main(epochs=3)
    assert accuracy > 0.85  # validation ran with the EMA weights swapped in
    live = [p.detach() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(averaged, live))  # the average is not the live weights
    assert ema.num_updates == 3 * 16


def test_my_reward_by_class_path_next_to_the_verifier(prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", NFT_CONFIG, "--config", os.path.join(EXAMPLES, "my_reward.yaml"),
                *tiny_overrides(NFT_CONFIG, None, prompt_file)])
    metrics = cli.trainer.logged_metrics
    assert {"train/reward_shapes", "train/reward_brightness"} <= set(metrics)
    assert 0 <= float(metrics["train/reward_brightness"]) <= 1


def test_my_reward_refuses_a_bad_target_before_work(prompt_file, tmp_path, monkeypatch):
    from flowrl.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="target must be in"):
        main(["fit", "--config", NFT_CONFIG, "--config", os.path.join(EXAMPLES, "my_reward.yaml"),
              '--model.rewards=[{class_path: my_reward.Brightness, init_args: {target: 2}}]',
              *tiny_overrides(NFT_CONFIG, None, prompt_file)])
    assert not os.path.exists(tmp_path / "runs")


def test_generate_with_stock_diffusers_from_an_export(prompt_file, tmp_path, monkeypatch):
    """The example's images are the ones flowrl sample draws from the same export (both stock pipelines)."""
    import generate_with_diffusers
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    run = train_and_export(TOY_CONFIG, None, prompt_file, tmp_path, "lora")
    images = generate_with_diffusers.generate(run.out, ["a red circle", "two blue squares"], num_inference_steps=4,
                                              guidance_scale=4.5)
    main(["sample", "--lora", run.out, "--prompt", "a red circle", "--prompt", "two blue squares",
          "--num_per_prompt", "1", "--num_inference_steps", "4", "--guidance_scale", "4.5", "--no_progress",
          "--out", "sampled"])
    for i, image in enumerate(images):
        ours = Image.open(os.path.join("sampled", "images", f"{i:04d}.png"))
        diff = (torch.tensor(list(image.getdata())) - torch.tensor(list(ours.getdata()))).abs().max()
        assert diff <= 1


def test_new_algorithm_dynamics_and_estimator_train_from_python():
    from flowrl.algorithms import ALGORITHMS

    before = dict(ALGORITHMS)
    import new_algorithm

    trainer = new_algorithm.main(steps=2)
    assert trainer.global_step == 2
    assert trainer.logged_metrics["train/ratio_first_update_max_abs_dev"] == 0
    assert ALGORITHMS == before  # nothing registered anywhere


BASE_CONFIG = os.path.join(ROOT, "lightning_configs", "toy", "base.yaml")


def test_new_algorithm_dynamics_and_estimator_by_class_path_from_yaml(prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import new_algorithm

    cli = main(["fit", "--config", BASE_CONFIG, "--config", os.path.join(EXAMPLES, "new_algorithm.yaml"),
                *tiny_overrides(BASE_CONFIG, None, prompt_file), "--trainer.logger=false"])
    model = cli.model
    assert type(model) is new_algorithm.Reinforce and isinstance(model.dynamics, new_algorithm.EulerMaruyama)
    assert model.advantage_estimator is new_algorithm.dr_grpo and model.step_selector.train_steps == [0, 1, 2]
    assert cli.trainer.global_step >= 1
    assert cli.trainer.logged_metrics["train/ratio_first_update_max_abs_dev"] == 0


def test_dr_grpo_centres_without_the_std():
    import new_algorithm

    total = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = new_algorithm.dr_grpo(total, total[None], torch.ones(1), groups)
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0, -2.0, 2.0]


def test_euler_maruyama_is_the_euler_step_plus_gaussian_noise():
    import new_algorithm

    dyn = new_algorithm.EulerMaruyama(0.5)
    x, v, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = dyn.step(x, v, 0.8, 0.6, noise=eps)
    torch.testing.assert_close(out.mean, x + v * (0.6 - 0.8))
    torch.testing.assert_close(out.prev_sample, out.mean + 0.5 * (0.2**0.5) * eps)
    assert out.log_prob.shape == (2,)
