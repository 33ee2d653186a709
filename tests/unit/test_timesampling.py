"""Tests for flowrl.dynamics.timesampling."""

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


def test_continuous_warps_then_maps_into_the_sigma_range():
    """REFERENCE_MATH order: draw u in (0, 1), warp it with the SD3 shift, then map it into [1 - f, 1]."""
    f, shift = 0.3, 3.0
    t = sample_train_times("uniform", 4096, 2, time_shift=shift, timestep_fraction=f, generator=_gen(1))
    assert (t >= 0.7 - 1e-6).all() and (t <= 1).all()
    assert t.min() < 0.71 and t.max() > 0.99  # spans [0.7, 1], not [shift(0.7), 1] = [0.875, 1]
    # the stratum edge u = 0.5 warps to shift(0.5) = 0.75, then maps to 0.7 + 0.3 * 0.75 = 0.925
    assert (t[:, 0] >= 0.925 - 1e-6).all() and (t[:, 1] <= 0.925 + 1e-6).all()
    u = sample_train_times("uniform", 4096, 2, timestep_fraction=1.0, generator=_gen(1))  # same draws, unmapped
    torch.testing.assert_close(t, 1 - f + f * shift_sigma(u.double(), shift).float(), atol=1e-6, rtol=0)
    # logit_normal follows the same order
    ln = sample_train_times("logit_normal", 4096, 2, time_shift=shift, timestep_fraction=f, generator=_gen(1))
    assert (ln >= 0.7 - 1e-6).all() and ln.min() < 0.75


def test_continuous_is_in_open_closed_unit_interval_and_deterministic():
    a = sample_train_times("uniform", 64, 8, generator=_gen(5))
    b = sample_train_times("uniform", 64, 8, generator=_gen(5))
    assert torch.equal(a, b)
    assert (a > 0).all() and (a <= 1).all()


def test_discrete_all_steps_in_range_when_k_is_none():
    t = sample_train_times("discrete", 3, None, sigmas=SIGMAS, timestep_fraction=0.3)
    # the steps at sigma >= 0.7: 1.0, 0.9, 0.8 and 0.7 (float32 0.7 sits just below 0.7: the tolerance keeps it)
    torch.testing.assert_close(t, torch.tensor([[1.0, 0.9, 0.8, 0.7]] * 3))
    t = sample_train_times("discrete", 2, None, sigmas=SIGMAS, timestep_fraction=0.25)  # sigma >= 0.75
    assert t.shape == (2, 3)


def test_discrete_fraction_is_a_sigma_range_on_a_shifted_schedule():
    """SD3's 10-step schedule shifted by 3: timestep_fraction 0.3 keeps the steps at sigma >= 0.7, steps 0-5
    (sigma 1 .. 0.75), as the guide users migrate from does, not the first ceil(0.3 * 10) = 3 steps."""
    shifted = shift_sigma(torch.linspace(1, 0, 11, dtype=torch.float64), 3.0).float()
    t = sample_train_times("discrete", 1, None, sigmas=shifted, timestep_fraction=0.3)
    torch.testing.assert_close(t, shifted[:6].unsqueeze(0))
    assert shifted[5] >= 0.7 > shifted[6]
    t = sample_train_times("discrete_wo_init", 1, None, sigmas=shifted, timestep_fraction=0.3)
    torch.testing.assert_close(t, shifted[1:6].unsqueeze(0))


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
    # sigma >= 0.5 keeps steps 0..5; the other two stratify steps 1..5: {1, 2} and {3, 4, 5}
    assert set(idx[:, 0].tolist()) == {1, 2} and set(idx[:, 1].tolist()) == {3, 4, 5}
    t1 = sample_train_times("discrete_with_init", 4, 1, sigmas=SIGMAS)
    assert torch.equal(t1, torch.ones(4, 1))
    assert sample_train_times("discrete_with_init", 2, None, sigmas=SIGMAS, timestep_fraction=0.5).shape == (2, 6)


def test_discrete_wo_init_never_includes_step_zero():
    t = sample_train_times(
        "discrete_wo_init", 300, 2, sigmas=SIGMAS, timestep_fraction=0.5, generator=_gen(4)
    )
    assert (t < 1.0).all()
    idx = torch.round((1 - t) * 10).long()
    assert set(idx.flatten().tolist()) == {1, 2, 3, 4, 5}
    t_all = sample_train_times("discrete_wo_init", 1, None, sigmas=SIGMAS, timestep_fraction=0.5)
    torch.testing.assert_close(t_all, torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]]))


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
                strategy="discrete", batch_size=2, num_train_timesteps=5, sigmas=SIGMAS, timestep_fraction=0.3
            ),
            "at most 4",
        ),
        (
            dict(
                strategy="discrete_wo_init",
                batch_size=2,
                num_train_timesteps=4,
                sigmas=SIGMAS,
                timestep_fraction=0.3,
            ),
            "at most 3",
        ),
        (
            dict(
                strategy="discrete_wo_init",
                batch_size=2,
                num_train_timesteps=None,
                sigmas=SIGMAS,
                timestep_fraction=0.05,
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


@pytest.mark.parametrize("name", ["nft", "awm"])
def test_shipped_decoupled_configs_train_the_noisiest_six_steps(name):
    """The toy NFT/AWM configs were tuned on steps 0-5 of the toy sampler's schedule (shift 3, 10 steps);
    under the sigma-range meaning of timestep_fraction they still train exactly those steps."""
    import os

    from conftest import parsed_config

    from flowrl.toy import TOY_CHECKPOINT

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    model = parsed_config(os.path.join(root, "lightning_configs", "toy", f"{name}.yaml"))["model"]["init_args"]
    shift = __import__("json").load(open(TOY_CHECKPOINT / "scheduler" / "scheduler_config.json"))["shift"]
    n = model["num_inference_steps"]
    sigmas = shift_sigma(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift).float()
    t = sample_train_times("discrete", 1, None, sigmas=sigmas, timestep_fraction=model["timestep_fraction"])
    torch.testing.assert_close(t, sigmas[:6].unsqueeze(0))
