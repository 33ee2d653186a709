"""Tests for flowrl.advantages: group normalisation and cross-rank gathering."""

import numpy as np
import pytest
import torch

from flowrl.advantages import gather_groups, group_advantages


def test_hand_values_population_std():
    # group 0: rewards [1, 3] -> mean 2, population std 1 -> A = [-1, 1] / (1 + 1e-4)
    # group 1: rewards [0, 0, 6] -> mean 2, population std sqrt((4+4+16)/3) = sqrt(8)
    rewards = torch.tensor([1.0, 0.0, 3.0, 0.0, 6.0])
    groups = torch.tensor([7, 2, 7, 2, 2])
    adv = group_advantages(rewards, groups)
    s8 = np.sqrt(8.0)
    expected = torch.tensor(
        [-1 / (1 + 1e-4), -2 / (s8 + 1e-4), 1 / (1 + 1e-4), -2 / (s8 + 1e-4), 4 / (s8 + 1e-4)]
    )
    torch.testing.assert_close(adv, expected.float())
    assert adv.dtype == torch.float32


def test_matches_numpy_reference():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12)
    g = np.repeat(np.arange(3), 4)
    expected = np.empty_like(r)
    for k in range(3):
        m = g == k
        expected[m] = (r[m] - r[m].mean()) / (r[m].std() + 1e-4)  # numpy std: population
    torch.testing.assert_close(
        group_advantages(torch.tensor(r), torch.tensor(g)), torch.tensor(expected, dtype=torch.float32)
    )


def test_zero_mean_per_group():
    torch.manual_seed(0)
    rewards = torch.randn(16)
    groups = torch.arange(4).repeat_interleave(4)
    adv = group_advantages(rewards, groups)
    torch.testing.assert_close(adv.view(4, 4).mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)


def test_permutation_equivariance():
    torch.manual_seed(1)
    rewards = torch.randn(12)
    groups = torch.arange(3).repeat(4)
    perm = torch.randperm(12)
    for global_std in (False, True):
        adv = group_advantages(rewards, groups, global_std=global_std)
        permuted = group_advantages(rewards[perm], groups[perm], global_std=global_std)
        torch.testing.assert_close(permuted, adv[perm])


def test_constant_groups_give_zero_not_nan():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.isfinite(adv).all()
    # a one-sample group
    assert torch.equal(group_advantages(torch.tensor([3.0]), torch.tensor([0])), torch.zeros(1))


def test_global_std_uses_batch_std_with_group_means():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    batch_std = np.std([1.0, 3.0, 10.0, 14.0])  # population
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, groups, global_std=True), expected.float())


def test_shape_errors():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="one id per reward"):
        group_advantages(torch.zeros(3), torch.zeros(2))


def test_gather_groups_flattens_a_lightning_style_stack():
    # two ranks, rank-major stacking (W, N) as LightningModule.all_gather returns it
    rank_rewards = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])]
    rank_groups = [torch.tensor([0, 1]), torch.tensor([0, 1])]

    def fake_all_gather(t):
        src = rank_rewards if t.is_floating_point() else rank_groups
        return torch.stack(src)

    r, g = gather_groups(rank_rewards[0], rank_groups[0], fake_all_gather)
    assert torch.equal(r, torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert torch.equal(g, torch.tensor([0, 1, 0, 1]))
    adv = group_advantages(r, g)
    # group 0 = {1, 3}, group 1 = {2, 5}: each rank's own slice
    # rank 1 holds 3 (group 0: mean 2, std 1) and 5 (group 1: mean 3.5, std 1.5)
    torch.testing.assert_close(adv.view(2, 2)[1], torch.tensor([1.0 / (1.0 + 1e-4), 1.5 / (1.5 + 1e-4)]))


def test_gather_groups_single_process_identity():
    r, g = gather_groups(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), lambda t: t)
    assert torch.equal(r, torch.tensor([1.0, 2.0])) and torch.equal(g, torch.tensor([0, 0]))


def test_gdpo_normalises_each_reward_then_the_batch():
    from flowrl.advantages import gdpo_advantages

    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    big = torch.tensor([100.0, 300.0, 200.0, 0.0, 50.0, 100.0])  # a large-scale reward
    small = torch.tensor([0.0, 0.1, 0.2, 0.2, 0.1, 0.0])  # a small but discriminative one
    weights = torch.tensor([1.0, 0.5])
    adv = gdpo_advantages(torch.stack([big, small]), weights, groups)
    s = group_advantages(big, groups).double() + 0.5 * group_advantages(small, groups).double()
    expected = ((s - s.mean()) / (s.std(unbiased=False) + 1e-4)).float()
    torch.testing.assert_close(adv, expected)
    # each reward counts by its weight, not its scale: rescaling one reward changes nothing (sum normalisation does)
    torch.testing.assert_close(gdpo_advantages(torch.stack([big * 0.1, small]), weights, groups), adv, atol=1e-4, rtol=0)
    summed = group_advantages(big + 0.5 * small, groups)
    assert not torch.allclose(summed, group_advantages(big * 1e-3 + 0.5 * small, groups), atol=1e-2)
    assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std(unbiased=False)) - 1) < 1e-3
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        gdpo_advantages(big, weights, groups)
