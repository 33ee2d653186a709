"""Tests for flowrl.dynamics.timesampling."""

import math

import pytest
import torch

from flowrl.dynamics import TIME_SAMPLING_STRATEGIES, sample_train_times, shift_sigma

SIGMAS = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])  # N = 10


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shift_sigma_hand_values_and_direction():
    # shift 3 at 0.5: 1.5 / 2 = 0.75 (towards high noise)
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigma(0.25, 2.0) == pytest.approx(0.5 / 1.25)
    assert shift_sigma(0.3, 1.0) == pytest.approx(0.3)
    s = torch.tensor([0.0, 0.2, 1.0])
    torch.testing.assert_close(shift_sigma(s, 3.0), torch.tensor([0.0, 0.6 / 1.4, 1.0]))
    with pytest.raises(ValueError, match="time_shift"):
        shift_sigma(0.5, 0.0)


@pytest.mark.parametrize("strategy", ["uniform", "logit_normal"])
def test_continuous_range_shape_dtype_and_stratification(strategy):
    k, f = 4, 0.6
    t = sample_train_times(strategy, 256, k, timestep_fraction=f, generator=_gen())
    assert t.shape == (256, k) and t.dtype == torch.float32
    assert (t >= 1 - f - 1e-6).all() and (t <= 1).all()
    # strata of the base law: uniform -> equal slices of [1 - f, 1], column 0 the noisiest
    if strategy == "uniform":
        for j in range(k):
            hi = 1 - f * j / k
            lo = 1 - f * (j + 1) / k
            assert (t[:, j] >= lo - 1e-6).all() and (t[:, j] <= hi + 1e-6).all()
    else:
        # logit-normal strata: sigmoid(ndtri(q)) quantile boundaries
        for j in range(k):
            q_hi, q_lo = 1 - j / k, 1 - (j + 1) / k
            bound = lambda q: 1 - f + f * torch.sigmoid(torch.special.ndtri(torch.tensor(q).double())).item()  # noqa: E731
            lo = bound(q_lo) if q_lo > 0 else 1 - f
            hi = bound(q_hi) if q_hi < 1 else 1.0
            assert (t[:, j] >= lo - 1e-5).all() and (t[:, j] <= hi + 1e-5).all()
    # columns strictly decrease within a row
    assert (t[:, :-1] > t[:, 1:]).all()


def test_uniform_shift_is_applied_after_the_fraction_range():
    f, shift = 0.5, 3.0
    t = sample_train_times("uniform", 512, 2, time_shift=shift, timestep_fraction=f, generator=_gen(1))
    lo = shift_sigma(1 - f, shift)  # 0.75
    assert lo == pytest.approx(0.75)
    assert (t >= lo - 1e-6).all() and (t <= 1).all()
    # the stratum edge tau = 0.75 maps to shift(0.75) = 2.25/2.5 = 0.9
    assert (t[:, 0] >= 0.9 - 1e-6).all() and (t[:, 1] <= 0.9 + 1e-6).all()
    # mean of stratum 0 of uniform: E[shift(tau)], tau ~ U[0.75, 1]; check the warp raises it
    unshifted = sample_train_times("uniform", 512, 2, timestep_fraction=f, generator=_gen(1))
    assert (t >= unshifted - 1e-6).all()


def test_continuous_is_in_open_closed_unit_interval_and_deterministic():
    a = sample_train_times("uniform", 64, 8, generator=_gen(5))
    b = sample_train_times("uniform", 64, 8, generator=_gen(5))
    assert torch.equal(a, b)
    assert (a > 0).all() and (a <= 1).all()


def test_discrete_all_steps_in_range_when_k_is_none():
    t = sample_train_times("discrete", 3, None, sigmas=SIGMAS, timestep_fraction=0.3)
    # ceil(0.3 * 10) = 3 steps: sigmas 1.0, 0.9, 0.8 (0.3 * 10 = 3.0000000000000004 must not give 4)
    torch.testing.assert_close(t, torch.tensor([[1.0, 0.9, 0.8]] * 3))
    t = sample_train_times("discrete", 2, None, sigmas=SIGMAS, timestep_fraction=0.25)  # ceil(2.5) = 3
    assert t.shape == (2, 3)


def test_discrete_stratified_draw():
    # 10 steps, K = 5 -> strata {0,1}, {2,3}, ... of step indices; values are sigmas[index]
    t = sample_train_times("discrete", 400, 5, sigmas=SIGMAS, generator=_gen(2))
    idx = torch.round((1 - t) * 10).long()
    for j in range(5):
        assert set(idx[:, j].tolist()) == {2 * j, 2 * j + 1}
    assert (t > 0).all()


def test_discrete_with_init_always_includes_step_zero():
    t = sample_train_times(
        "discrete_with_init", 200, 3, sigmas=SIGMAS, timestep_fraction=0.5, generator=_gen(3)
    )
    assert (t[:, 0] == 1.0).all()
    idx = torch.round((1 - t[:, 1:]) * 10).long()
    # the other two stratify steps 1..4: {1, 2} and {3, 4}
    assert set(idx[:, 0].tolist()) == {1, 2} and set(idx[:, 1].tolist()) == {3, 4}
    t1 = sample_train_times("discrete_with_init", 4, 1, sigmas=SIGMAS)
    assert torch.equal(t1, torch.ones(4, 1))
    assert sample_train_times("discrete_with_init", 2, None, sigmas=SIGMAS, timestep_fraction=0.5).shape == (
        2,
        5,
    )


def test_discrete_wo_init_never_includes_step_zero():
    t = sample_train_times(
        "discrete_wo_init", 300, 2, sigmas=SIGMAS, timestep_fraction=0.5, generator=_gen(4)
    )
    assert (t < 1.0).all()
    idx = torch.round((1 - t) * 10).long()
    assert set(idx.flatten().tolist()) == {1, 2, 3, 4}
    t_all = sample_train_times("discrete_wo_init", 1, None, sigmas=SIGMAS, timestep_fraction=0.5)
    torch.testing.assert_close(t_all, torch.tensor([[0.9, 0.8, 0.7, 0.6]]))


def test_shifted_sampler_schedule_is_used_as_is():
    shifted = shift_sigma(torch.linspace(1, 0, 5), 3.0)  # 1, 0.9, 0.75, 0.5, 0
    t = sample_train_times("discrete", 1, None, sigmas=shifted, time_shift=5.0)
    torch.testing.assert_close(t, shifted[:4].unsqueeze(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="gaussian", batch_size=2, num_train_timesteps=2), "uniform.*discrete_wo_init"),
        (dict(strategy="uniform", batch_size=2, num_train_timesteps=None), "needs num_train_timesteps"),
        (dict(strategy="discrete", batch_size=2, num_train_timesteps=11, sigmas=SIGMAS), "at most 10"),
        (
            dict(
                strategy="discrete", batch_size=2, num_train_timesteps=4, sigmas=SIGMAS, timestep_fraction=0.3
            ),
            "at most 3",
        ),
        (
            dict(
                strategy="discrete_wo_init",
                batch_size=2,
                num_train_timesteps=3,
                sigmas=SIGMAS,
                timestep_fraction=0.3,
            ),
            "at most 2",
        ),
        (
            dict(
                strategy="discrete_wo_init",
                batch_size=2,
                num_train_timesteps=None,
                sigmas=SIGMAS,
                timestep_fraction=0.1,
            ),
            "none left",
        ),
        (dict(strategy="uniform", batch_size=2, num_train_timesteps=2, timestep_fraction=0.0), r"\(0, 1\]"),
        (dict(strategy="uniform", batch_size=2, num_train_timesteps=2, timestep_fraction=1.5), r"\(0, 1\]"),
        (dict(strategy="discrete", batch_size=2, num_train_timesteps=2), "sigmas"),
        (dict(strategy="discrete", batch_size=2, num_train_timesteps=2, sigmas=SIGMAS.flip(0)), "descending"),
        (dict(strategy="uniform", batch_size=2, num_train_timesteps=0), ">= 1"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_train_times(**kwargs)


def test_strategies_tuple():
    assert TIME_SAMPLING_STRATEGIES == (
        "uniform",
        "logit_normal",
        "discrete",
        "discrete_with_init",
        "discrete_wo_init",
    )
    assert math.ceil(round(0.3 * 10, 9)) == 3
