import pytest
import torch

from flowrl.rewards import (
    JpegCompressibility,
    JpegIncompressibility,
    Reward,
    RewardSpec,
    WeightedReward,
    available_rewards,
    build_reward,
    register_reward,
)


def _images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noisy])


def test_jpeg_rewards_rank_flat_above_noise():
    images = _images()
    comp = JpegCompressibility()(images, ["a", "b"])
    incomp = JpegIncompressibility()(images, ["a", "b"])
    assert comp.dtype == torch.float32 and comp.shape == (2,)
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)
    assert isinstance(JpegCompressibility(), Reward)


def test_jpeg_reward_on_video_averages_frames():
    video = _images().unsqueeze(1).repeat(1, 3, 1, 1, 1)
    torch.testing.assert_close(JpegIncompressibility()(video, ["a", "b"]), JpegIncompressibility()(_images(), ["a", "b"]))


def test_weighted_sum_and_terms():
    reward = WeightedReward.from_specs(
        [RewardSpec("jpeg_compressibility", 0.5), {"name": "jpeg_incompressibility", "weight": 2.0}]
    )
    images = _images()
    total = reward(images, ["a", "b"])
    expected = 0.5 * JpegCompressibility()(images, ["a", "b"]) + 2.0 * JpegIncompressibility()(images, ["a", "b"])
    torch.testing.assert_close(total, expected)
    scores = reward.score(images, ["a", "b"])
    assert torch.equal(scores.total, total) and set(scores.terms) == {"jpeg_compressibility", "jpeg_incompressibility"}
    assert scores.weights == {"jpeg_compressibility": 0.5, "jpeg_incompressibility": 2.0}


def test_registry_errors_and_custom_reward():
    with pytest.raises(ValueError, match="registered rewards are"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="listed twice"):
        WeightedReward.from_specs([RewardSpec("jpeg_compressibility"), RewardSpec("jpeg_compressibility")])

    @register_reward("test_brightness")
    class Brightness:
        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    assert "test_brightness" in available_rewards()
    torch.testing.assert_close(build_reward("test_brightness")(_images(), ["a", "b"]), _images().mean(dim=(1, 2, 3)))


def test_non_finite_or_misshapen_reward_stops_training():
    reward = WeightedReward({"bad": lambda images, prompts: torch.tensor([1.0, float("nan")])}, {"bad": 1.0})
    with pytest.raises(FloatingPointError, match="non-finite"):
        reward(_images(), ["a", "b"])
    reward = WeightedReward({"bad": lambda images, prompts: torch.zeros(3)}, {"bad": 1.0})
    with pytest.raises(ValueError, match="shape"):
        reward(_images(), ["a", "b"])


OUTSIDE_MODULE = '''
import torch

class Brightness:
    """Mean pixel value, times scale: a user's reward in a package flowrl does not know."""
    def __init__(self, scale=1.0):
        self.scale = scale
    def __call__(self, images, prompts):
        return images.float().mean(dim=tuple(range(1, images.ndim))) * self.scale
'''


@pytest.fixture()
def outside_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg.py").write_text(OUTSIDE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_pkg.Brightness"


def test_a_users_reward_by_class_path_next_to_registered_names(outside_reward):
    reward = WeightedReward.from_specs([
        {"class_path": outside_reward, "init_args": {"scale": 2.0}, "weight": 0.5},
        {"name": "jpeg_compressibility"},
    ])
    images = _images()
    assert reward.weights == {"Brightness": 0.5, "jpeg_compressibility": 1.0}
    expected = 0.5 * 2.0 * images.mean(dim=(1, 2, 3)) + JpegCompressibility()(images, ["a", "b"])
    torch.testing.assert_close(reward(images, ["a", "b"]), expected)
    torch.testing.assert_close(reward.score(images, ["a", "b"]).terms["Brightness"], 2.0 * images.mean(dim=(1, 2, 3)))


def test_class_path_reward_from_a_config(outside_reward, tmp_path, monkeypatch):
    import os

    from flowrl.cli import main

    monkeypatch.chdir(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli = main(["--config", os.path.join(root, "lightning_configs", "toy", "nft.yaml"), "--trainer.logger=false",
                f"--model.rewards=[{{name: shapes}}, {{class_path: {outside_reward}, init_args: {{scale: 3.0}}, "
                "weight: 0.25, label: bright}]"], run=False)
    fn = cli.model.reward_fn
    assert set(fn.rewards) == {"shapes", "bright"} and fn.weights["bright"] == 0.25 and fn.rewards["bright"].scale == 3.0


def test_any_callable_is_a_reward_term():
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    reward = WeightedReward.from_specs([brightness, RewardSpec("jpeg_compressibility", 2.0)])
    assert reward.weights == {"brightness": 1.0, "jpeg_compressibility": 2.0}
    assert reward(_images(), ["a", "b"]).shape == (2,)


@pytest.mark.parametrize("entry, match", [
    ({"name": "shapes", "class_path": "x.Y"}, "not both"),
    ({"name": "shapes", "init_args": {"a": 1}}, "init_args belongs to a class_path"),
    ({"class_path": "x.Y", "args": {"a": 1}}, "go in init_args"),
    ({"name": "shapes", "wieght": 2.0}, "unknown keys"),
    ({"weight": 2.0}, "exactly one of name"),
    ({"class_path": "no_such_package_xyz.Reward"}, "cannot import 'no_such_package_xyz'"),
    ({"class_path": "flowrl.rewards.NoSuchReward"}, "has no 'NoSuchReward'"),
    ({"class_path": "Reward"}, "needs a module"),
])
def test_bad_reward_entries_say_what_to_write(entry, match):
    with pytest.raises(ValueError, match=match):
        WeightedReward.from_specs([entry])


def test_class_path_with_wrong_init_args(outside_reward):
    with pytest.raises(ValueError, match="unexpected keyword"):
        WeightedReward.from_specs([{"class_path": outside_reward, "init_args": {"sclae": 2.0}}])


def test_frame_reward_scores_every_kth_frame_and_averages():
    from flowrl.rewards.video import FrameReward

    seen = []

    def per_frame(images, prompts):
        seen.append((images.shape[0], list(prompts)))
        return images.mean(dim=(1, 2, 3))

    videos = torch.rand(2, 7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = FrameReward(per_frame, every=3)(videos, ["a", "b"])  # frames 0, 3, 6
    torch.testing.assert_close(scores, videos[:, ::3].mean(dim=(2, 3, 4)).mean(1))
    assert seen == [(6, ["a"] * 3 + ["b"] * 3)]
    torch.testing.assert_close(FrameReward(per_frame)(videos[:, 0], ["a", "b"]), videos[:, 0].mean(dim=(1, 2, 3)))
    built = build_reward("frames", reward={"name": "jpeg_compressibility"}, every=2)
    torch.testing.assert_close(built(videos, ["a", "b"]),
                               torch.stack([JpegCompressibility()(v[::2], ["a"] * 4).mean() for v in videos]))
    with pytest.raises(ValueError, match="every must be >= 1"):
        FrameReward(per_frame, every=0)


def test_gdpo_aggregation_in_the_module(tiny_sd3_path):
    from tiny import make_module

    from flowrl.advantages import gdpo_advantages
    from flowrl.algorithms import GRPO

    module = make_module(GRPO, tiny_sd3_path, advantage_aggregation="gdpo",
                         rewards=[RewardSpec("jpeg_compressibility", 1.0), RewardSpec("jpeg_incompressibility", 0.3)])
    images, groups = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 1, 1])
    scores = module.reward_fn.score(images, ["a"] * 4)
    terms = scores.terms
    expected = gdpo_advantages(torch.stack([terms["jpeg_compressibility"], terms["jpeg_incompressibility"]]),
                               torch.tensor([1.0, 0.3]), groups)
    torch.testing.assert_close(module.compute_advantages(scores, groups), expected)
