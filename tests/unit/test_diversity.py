"""The diversity figures of a prompt's samples, on images whose values are worked out by hand."""

import math

import pytest
import torch

from flowrl.diversity import colour_entropy, diversity_by_prompt, pairwise_distance


def flat(value, n=1, size=4):
    return torch.full((n, 3, size, size), float(value))


def test_pairwise_distance_is_the_mean_rms_difference_over_pairs():
    assert float(pairwise_distance(torch.cat([flat(0), flat(0)]))) == 0.0  # alike: no diversity
    assert float(pairwise_distance(torch.cat([flat(0), flat(1)]))) == pytest.approx(1.0)
    # pairs (0, 1): 1, (0, 2): 0, (1, 2): 1 -> 2/3
    assert float(pairwise_distance(torch.cat([flat(0), flat(1), flat(0)]))) == pytest.approx(2 / 3)
    half = flat(0)
    half[..., :2, :] = 1.0  # half the pixels differ by 1: RMS sqrt(1/2)
    assert float(pairwise_distance(torch.cat([flat(0), half]))) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_distance(flat(0))


def test_colour_entropy_counts_the_colours_in_bits():
    assert float(colour_entropy(torch.cat([flat(0.9), flat(0.9)]))) == 0.0  # one colour
    assert float(colour_entropy(torch.cat([flat(0.1), flat(0.9)]))) == pytest.approx(1.0)  # two, equally often
    eight = torch.stack([torch.tensor([r, g, b], dtype=torch.float32)[:, None, None].expand(3, 2, 2)
                         for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)])
    assert float(colour_entropy(eight)) == pytest.approx(3.0)
    # shades within one quantisation level are one colour
    assert float(colour_entropy(torch.cat([flat(0.01), flat(0.2)]))) == 0.0
    assert float(colour_entropy(torch.cat([flat(0.01), flat(0.2)]), levels=8)) == pytest.approx(1.0)


def test_by_prompt_groups_the_samples_and_skips_single_ones():
    images = torch.cat([flat(0), flat(1), flat(0.5), flat(0.5), flat(0.2)])
    out = diversity_by_prompt(images, ["a", "a", "b", "b", "c"])
    assert set(out) == {"a", "b"}  # "c" has one sample: nothing to compare
    assert float(out["a"][0]) == pytest.approx(1.0) and float(out["a"][1]) == pytest.approx(1.0)
    assert float(out["b"][0]) == 0.0 and float(out["b"][1]) == 0.0


def test_video_samples_are_compared_over_all_frames():
    video = torch.zeros(2, 3, 3, 4, 4)  # (N, F, C, H, W)
    video[1, 2] = 1.0  # the second clip differs in its last frame only
    assert float(pairwise_distance(video)) == pytest.approx(math.sqrt(1 / 3))
    assert float(colour_entropy(video)) == pytest.approx(-(5 / 6 * math.log2(5 / 6) + 1 / 6 * math.log2(1 / 6)))
