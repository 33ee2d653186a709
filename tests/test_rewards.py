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
    assert set(reward.last_terms) == {"jpeg_compressibility", "jpeg_incompressibility"}


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
