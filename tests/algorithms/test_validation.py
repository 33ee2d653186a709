import lightning as L
import pytest
import torch

from flowrl.algorithms import GRPO, EvalConfig
from flowrl.data import PromptDataModule
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec
from flowrl.toy.shapes import CATEGORIES


@pytest.fixture()
def module(tiny_sd3_path):
    return GRPO(
        policy=PolicyConfig(tiny_sd3_path, lora_rank=2),
        rewards=[RewardSpec("shapes"), RewardSpec("jpeg_compressibility", weight=0.0)],
        group_size=2,
        resolution=8,  # train small ...
        num_inference_steps=3,
        eval=EvalConfig(resolution=16, num_inference_steps=4, guidance_scale=2.0),  # ... evaluate at full size
    )


def test_validation_uses_eval_resolution_ode_and_logs_categories(module):
    prompts = ["a red circle", "two blue squares", "a circle left of a square", "a photo of a square",
               "a red circle and a blue square"]
    module.dynamics.step = lambda *a, **k: pytest.fail("validation must sample with the ODE")
    out = module.validation_step({"prompt": prompts}, 0)
    assert out["images"].shape == (5, 3, 16, 16)
    module.on_validation_epoch_end()
    metrics = module.last_validation_metrics
    for category in CATEGORIES:
        assert f"val/shapes_acc_{category}" in metrics
    assert "val/reward" in metrics and "val/shapes_acc_overall" in metrics
    per_category = [metrics[f"val/shapes_acc_{c}"] for c in CATEGORIES]
    assert all(0.0 <= v <= 1.0 for v in per_category)
    assert metrics["val/shapes_acc_overall"] == pytest.approx(sum(per_category) / len(per_category))


def test_validation_logs_the_diversity_of_each_prompts_samples(module):
    """Diversity among the samples of one prompt (a collapse shows there while accuracy may rise): the mean over
    the prompts with two or more samples, as flowrl.diversity computes it; a prompt sampled once adds nothing."""
    from flowrl.diversity import colour_entropy, pairwise_distance

    prompts = ["a red circle"] * 3 + ["two blue squares"] * 2 + ["a green triangle"]
    images = module.validation_step({"prompt": prompts}, 0)["images"]
    metrics = module.val_metrics.compute()
    expected_pixel = (pairwise_distance(images[:3]) + pairwise_distance(images[3:5])) / 2
    expected_colour = (colour_entropy(images[:3]) + colour_entropy(images[3:5])) / 2
    assert float(metrics["val/diversity_pixel"]) == pytest.approx(float(expected_pixel), rel=1e-5)
    assert float(metrics["val/diversity_colour"]) == pytest.approx(float(expected_colour), rel=1e-5)
    assert float(metrics["val/diversity_pixel"]) > 0  # different noise per sample: different images
    module.validation_step({"prompt": ["a red circle"]}, 0)
    assert "val/diversity_pixel" not in module.val_metrics.compute()  # one sample: no figure rather than a 0


def test_validation_is_deterministic_across_calls(module):
    prompts = ["a red circle", "a red circle"]
    a = module.validation_step({"prompt": prompts}, 0)["images"]
    b = module.validation_step({"prompt": prompts}, 0)["images"]
    assert torch.equal(a, b)


def test_fit_with_validation_logs_overall_accuracy(module, tmp_path):
    dm = PromptDataModule(["a red circle", "two blue squares"], val_prompts=["a green triangle", "a red circle left of a blue square"],
                          group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        val_check_interval=1, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    assert "val/shapes_acc_overall" in trainer.logged_metrics
    assert "val/shapes_acc_position" in trainer.logged_metrics


def test_sample_plots_write_curves_and_grids_at_every_validation(module, tmp_path):
    import json

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from callbacks import SamplePlots

    class Recording(SamplePlots):
        def write(self, trainer, out, latest_grid=True):
            super().write(trainer, out, latest_grid)
            history = json.loads((tmp_path / "plots" / "history.json").read_text())
            self.written.append((trainer.global_step, len(history["val"])))

    plots = Recording(num_samples=2, dirpath=str(tmp_path / "plots"))
    plots.written = []
    dm = PromptDataModule(["a red circle", "two blue squares"], val_prompts=["a green triangle", "a red circle"],
                          group_size=2, batch_size=4)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=-1,
                        val_check_interval=1, check_val_every_n_epoch=None, callbacks=[plots])
    trainer.fit(module, datamodule=dm)
    # The sanity-check run is the "before" evaluation (step 0), then one after each training step.
    assert [row["step"] for row in plots.val_history] == [0, 1, 2]
    assert "val/shapes_acc_overall" in plots.val_history[0]
    assert len(plots.train_history) == 2
    # Files are rewritten at every validation, not only at the end (then once more at fit end).
    assert plots.written == [(0, 1), (1, 2), (2, 3), (2, 3)]
    for name in ("curves.png", "samples_before_after.png", "history.json"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "plots" / "samples").iterdir()) == [
        "step_000000.png", "step_000001.png", "step_000002.png"]
    events = EventAccumulator(logger.log_dir, size_guidance={IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Images("val/samples")] == [0, 1, 2]


class Brightness:
    def __call__(self, images, prompts):
        return images.float().reshape(images.shape[0], -1).mean(1)


def test_eval_rewards_score_validation_only(tiny_sd3_path):
    """Training scores with ``rewards``; validation with ``eval_rewards`` (weighted sum and each term, the verifier's
    categories), and the training reward is not called at validation."""
    from flowrl.rewards import WeightedReward

    module = GRPO(policy=PolicyConfig(tiny_sd3_path, lora_rank=2), rewards=[RewardSpec("jpeg_incompressibility")],
                  eval_rewards=[RewardSpec("shapes", weight=2.0),
                                {"class_path": f"{__name__}.Brightness", "weight": 0.5, "label": "bright"}],
                  group_size=2, resolution=16, num_inference_steps=3)
    assert list(module.reward_fn.rewards) == ["jpeg_incompressibility"]
    module.reward_fn.rewards["jpeg_incompressibility"] = lambda *a: pytest.fail("validation used the training reward")
    prompts = ["a red circle", "two blue squares"]
    out = module.validation_step({"prompt": prompts}, 0)
    module.on_validation_epoch_end()
    metrics = module.last_validation_metrics
    shapes = WeightedReward.from_specs([RewardSpec("shapes")])(out["images"], prompts)
    bright = Brightness()(out["images"], prompts)
    assert metrics["val/reward_shapes"] == pytest.approx(float(shapes.mean()), abs=1e-6)
    assert metrics["val/reward_bright"] == pytest.approx(float(bright.mean()), abs=1e-6)
    assert metrics["val/reward"] == pytest.approx(float((2.0 * shapes + 0.5 * bright).mean()), abs=1e-6)
    assert "val/shapes_acc_overall" in metrics
    assert module.hparams["eval_rewards"][0]["name"] == "shapes"  # plain data in checkpoints
