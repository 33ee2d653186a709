"""Tests for flowrl.dynamics.sde: hand-computed steps and the properties of REFERENCE_MATH."""

import math

import numpy as np
import pytest
import torch

from flowrl.dynamics import CPS, DYNAMICS, ODE, DanceSDE, FlowSDE, StepOutput, build_dynamics

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

# tiny fixed tensors, shape (2, 3)
X = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
V = torch.tensor([[0.5, 1.0, -1.5], [2.0, -0.5, 0.25]])
EPS = torch.tensor([[0.1, -1.0, 2.0], [-0.5, 0.3, 1.2]])


def _sdes(noise_level):
    return [FlowSDE(noise_level), DanceSDE(noise_level), CPS(noise_level)]


# ---------------------------------------------------------------------------------------------
# hand-computed steps
# ---------------------------------------------------------------------------------------------
def test_flow_sde_hand_values():
    # a = 0.5, s = 0.5, s' = 0.25: std_dev_t = 0.5*sqrt(0.5/0.5) = 0.5, dt = -0.25
    # std^2/(2s) = 0.25, std^2 (1-s)/(2s) = 0.125
    # mean = x (1 - 0.25*0.25) + v (1.125)(-0.25) = 0.9375 x - 0.28125 v ; std = 0.5*sqrt(0.25) = 0.25
    out = FlowSDE(0.5).step(X, V, 0.5, 0.25, noise=EPS)
    expected_mean = 0.9375 * X - 0.28125 * V
    torch.testing.assert_close(out.mean, expected_mean)
    torch.testing.assert_close(out.std, torch.full((2, 1), 0.25))
    torch.testing.assert_close(out.prev_sample, expected_mean + 0.25 * EPS)
    e = EPS.numpy().astype(np.float64)
    expected_lp = (-(e**2) / 2 - math.log(0.25) - LOG_SQRT_2PI).mean(axis=1)
    torch.testing.assert_close(out.log_prob, torch.tensor(expected_lp, dtype=torch.float32))
    torch.testing.assert_close(FlowSDE(0.5).std_dev_t(0.5, 0.25), torch.tensor(0.5))


def test_flow_sde_log_prob_is_explicit_gaussian_density_mean_over_dims():
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    prev = torch.randn(3, 2, 4, 4)
    out = FlowSDE(0.7).step(x, v, 0.6, 0.5, prev_sample=prev)
    density = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(prev)
    torch.testing.assert_close(out.log_prob, density.mean(dim=(1, 2, 3)))
    assert out.std.shape == (3, 1, 1, 1)
    assert out.log_prob.shape == (3,)


def test_dance_sde_hand_values():
    eta, s, s_next = 0.5, 0.5, 0.25
    dt = s_next - s
    x, v = X.numpy().astype(np.float64), V.numpy().astype(np.float64)
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x + v * dt - 0.5 * eta**2 * score * dt
    std = eta * math.sqrt(-dt)  # 0.25
    out = DanceSDE(eta).step(X, V, s, s_next, noise=EPS)
    torch.testing.assert_close(out.mean, torch.tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(out.std, torch.full((2, 1), std))
    e = EPS.numpy().astype(np.float64)
    expected_lp = (-(e**2) / 2 - math.log(std) - LOG_SQRT_2PI).mean(axis=1)
    torch.testing.assert_close(out.log_prob, torch.tensor(expected_lp, dtype=torch.float32))
    torch.testing.assert_close(DanceSDE(eta).std_dev_t(s, s_next), torch.tensor(eta))


def test_cps_hand_values():
    a, s, s_next = 0.5, 0.5, 0.25
    std = s_next * math.sin(a * math.pi / 2)
    x, v = X.numpy().astype(np.float64), V.numpy().astype(np.float64)
    x0 = x - s * v
    x1 = x + (1 - s) * v
    mean = (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1
    out = CPS(a).step(X, V, s, s_next, noise=EPS)
    torch.testing.assert_close(out.mean, torch.tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(
        out.prev_sample, torch.tensor(mean + std * EPS.double().numpy(), dtype=torch.float32)
    )
    # no normaliser: -mean((prev - mean)^2) = -std^2 mean(eps^2)
    expected_lp = -(std**2) * (EPS.double().numpy() ** 2).mean(axis=1)
    torch.testing.assert_close(out.log_prob, torch.tensor(expected_lp, dtype=torch.float32))
    torch.testing.assert_close(CPS(a).std_dev_t(s, s_next), torch.tensor(std, dtype=torch.float32))


def test_ode_is_euler_without_log_prob():
    out = ODE().step(X, V, 0.5, 0.25)
    torch.testing.assert_close(out.prev_sample, X + V * (-0.25))
    assert torch.equal(out.mean, out.prev_sample)
    assert out.log_prob is None
    assert torch.all(out.std == 0)
    assert not ODE.is_stochastic and FlowSDE.is_stochastic


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.7, 0.55), (0.2, 0.0)])
def test_noise_level_zero_is_the_euler_step(sigma, sigma_next):
    euler = ODE().step(X, V, sigma, sigma_next).prev_sample
    torch.testing.assert_close(euler, X + V * (sigma_next - sigma))
    for dyn in _sdes(0.0):
        out = dyn.step(X, V, sigma, sigma_next, noise=EPS)
        if isinstance(dyn, CPS):  # (1-s')(x - s v) + s'(x + (1-s) v): equal up to rounding
            torch.testing.assert_close(out.prev_sample, euler, rtol=0, atol=1e-6)
        else:  # bit-exact
            assert torch.equal(out.prev_sample, euler), dyn
        assert torch.all(out.std == 0)
        assert torch.isfinite(out.log_prob).all()


def test_cps_preserves_the_noise_coefficient_with_exact_predictions():
    torch.manual_seed(0)
    s, s_next, a = 0.8, 0.6, 0.7
    x0, eps1, eps2 = torch.randn(3, 1, 20000).unbind(0)
    x = (1 - s) * x0 + s * eps1
    v = eps1 - x0  # exact: x0_pred = x0, x1_pred = eps1
    out = CPS(a).step(x, v, s, s_next, noise=eps2)
    std = s_next * math.sin(a * math.pi / 2)
    coeff1 = math.sqrt(s_next**2 - std**2)
    # by construction: prev = (1-s') x0 + sqrt(s'^2 - std^2) eps1 + std eps2
    torch.testing.assert_close(
        out.prev_sample, (1 - s_next) * x0 + coeff1 * eps1 + std * eps2, atol=1e-5, rtol=0
    )
    assert coeff1**2 + std**2 == pytest.approx(s_next**2)
    # statistically: the noise part has variance s'^2
    noise_part = out.prev_sample - (1 - s_next) * x0
    assert noise_part.var().item() == pytest.approx(s_next**2, rel=0.03)


@pytest.mark.parametrize("dyn", [FlowSDE(0.7), DanceSDE(0.3), CPS(0.7)], ids=lambda d: d.name)
def test_scoring_the_drawn_sample_reproduces_its_log_prob(dyn):
    torch.manual_seed(1)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    drawn = dyn.step(x, v, 0.75, 0.5, generator=torch.Generator().manual_seed(3))
    scored = dyn.step(x, v, 0.75, 0.5, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.prev_sample, drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)


@pytest.mark.parametrize("cls", [FlowSDE, DanceSDE, CPS, ODE])
def test_bf16_inputs_give_float32_outputs(cls):
    x, v = X.to(torch.bfloat16), V.to(torch.bfloat16)
    out = cls().step(x, v, torch.tensor(0.5, dtype=torch.bfloat16), 0.25, noise=EPS.to(torch.bfloat16))
    assert out.prev_sample.dtype == out.mean.dtype == out.std.dtype == torch.float32
    if out.log_prob is not None:
        assert out.log_prob.dtype == torch.float32
        # the training pass recomputes from the same bf16 inputs and the stored sample: same log-prob
        again = cls().step(x, v, 0.5, 0.25, prev_sample=out.prev_sample)
        assert torch.equal(again.log_prob, out.log_prob)


@pytest.mark.parametrize("cls", [FlowSDE, DanceSDE, CPS, ODE])
def test_per_sample_sigma_tensors_match_scalar_steps(cls):
    dyn = cls()
    sig, sig_next = torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.2])
    batched = dyn.step(X, V, sig, sig_next, noise=EPS)
    for i in range(2):
        single = dyn.step(X[i : i + 1], V[i : i + 1], float(sig[i]), float(sig_next[i]), noise=EPS[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.std[i : i + 1], single.std)
        if single.log_prob is not None:
            torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
    # 0-dim tensors and python floats agree
    a = dyn.step(X, V, torch.tensor(0.5), torch.tensor(0.25), noise=EPS)
    b = dyn.step(X, V, 0.5, 0.25, noise=EPS)
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_wrong_sigma_shape_is_an_error():
    with pytest.raises(ValueError, match="one value per sample"):
        FlowSDE().step(X, V, torch.tensor([0.5, 0.4, 0.3]), 0.2)


def test_per_sample_generators_make_noise_independent_of_batch():
    dyn = FlowSDE(0.7)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = dyn.step(x, v, 0.6, 0.5, generator=gens)
    alone = dyn.step(x[1:], v[1:], 0.6, 0.5, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch.prev_sample[1:], alone.prev_sample)
    single1 = dyn.step(x, v, 0.6, 0.5, generator=torch.Generator().manual_seed(5))
    single2 = dyn.step(x, v, 0.6, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(single1.prev_sample, single2.prev_sample)
    with pytest.raises(ValueError, match="one per sample"):
        dyn.step(x, v, 0.6, 0.5, generator=gens[:1])


def test_flow_sde_sigma_one_rule():
    a = 0.7
    # sigma_max given: std_dev_t = a sqrt(1 / (1 - sigma_max))
    torch.testing.assert_close(
        FlowSDE(a, sigma_max=0.96).std_dev_t(1.0, 0.9), torch.tensor(a * math.sqrt(1 / 0.04))
    )
    # default: sigma_next (= sigmas[1] on the first step) in the denominator
    torch.testing.assert_close(FlowSDE(a).std_dev_t(1.0, 0.9), torch.tensor(a * math.sqrt(1 / 0.1)))
    # mean at s = 1 uses the same std_dev_t: c = std^2/(2s) = a^2/(2*0.1), c(1-s) = 0
    out = FlowSDE(a).step(X, V, 1.0, 0.9, noise=EPS)
    c = a**2 / (2 * 0.1)
    torch.testing.assert_close(out.mean, X * (1 + c * -0.1) + V * -0.1)
    torch.testing.assert_close(out.std, torch.full((2, 1), a * math.sqrt(10.0) * math.sqrt(0.1)))
    # degenerate sigma = sigma_next = 1 stays finite
    out = FlowSDE(a).step(X, V, 1.0, 1.0, noise=EPS)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()
    with pytest.raises(ValueError, match="sigma_max"):
        FlowSDE(a, sigma_max=1.0)


@pytest.mark.parametrize("cls", [FlowSDE, DanceSDE, CPS, ODE])
def test_full_schedule_is_finite(cls):
    sigmas = torch.linspace(1, 0, 6)
    x = torch.randn(2, 1, 3, 3)
    dyn = cls()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        out = dyn.step(x, torch.randn_like(x), s, s_next, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.prev_sample).all()
        if out.log_prob is not None:
            assert torch.isfinite(out.log_prob).all()
        x = out.prev_sample


def test_last_step_std_zero_for_cps_gives_mean_and_zero_log_prob():
    out = CPS(0.7).step(X, V, 0.2, 0.0, noise=EPS)
    assert torch.all(out.std == 0)
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.log_prob, torch.zeros(2))
    # Flow-SDE keeps a positive std on the last step: a sqrt(s/(1-s)) sqrt(s)
    out = FlowSDE(0.7).step(X, V, 0.2, 0.0, noise=EPS)
    torch.testing.assert_close(out.std, torch.full((2, 1), 0.7 * math.sqrt(0.2 / 0.8) * math.sqrt(0.2)))
    # a Gaussian step with std 0 scores log_prob 0, never nan
    out = FlowSDE(0.0).step(X, V, 0.5, 0.25, prev_sample=X)
    assert torch.equal(out.log_prob, torch.zeros(2))


def test_registry_and_build_dynamics():
    assert list(DYNAMICS) == ["Flow-SDE", "Dance-SDE", "CPS", "ODE"]
    for name, cls in DYNAMICS.items():
        assert cls.name == name
        assert isinstance(build_dynamics(name), cls)
    assert build_dynamics("Flow-SDE").noise_level == 0.7
    assert build_dynamics("Dance-SDE").noise_level == 0.3
    assert build_dynamics("CPS", noise_level=0.5).noise_level == 0.5
    with pytest.raises(ValueError, match="Flow-SDE.*Dance-SDE.*CPS.*ODE"):
        build_dynamics("flow-sde")
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDE(-0.1)


def test_step_output_fields():
    out = FlowSDE().step(X, V, 0.5, 0.25, noise=EPS)
    assert isinstance(out, StepOutput)
    assert out.prev_sample.shape == X.shape and out.std.shape == (2, 1)
