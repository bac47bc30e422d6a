"""The flow-matching steps (dfusion_core/flow.py): Euler at noise 0, a Gaussian with the stated mean and std,
and the ODE's marginals, checked on a data distribution whose exact velocity field is known."""
import math

import pytest
import torch

from dfusion_core.engine.steps import step_log_prob
from dfusion_core.engine.flow import FlowSchedule, flow_noised, flow_step, make_flow_schedule


def _schedule(n=20, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return make_flow_schedule(FlowMatchEulerDiscreteScheduler(shift=shift), n)


def test_schedule_is_the_schedulers_own():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    fs = _schedule(10)
    assert torch.allclose(fs.sigmas.float(), s.sigmas.float())
    assert fs.timesteps == tuple(float(t) for t in s.timesteps)
    assert fs.sigmas[0] == 1.0 and fs.sigmas[-1] == 0.0


@pytest.mark.parametrize("sampler", ["sde", "ddim"])
def test_noise_level_zero_is_the_euler_ode_step(sampler):
    sch = _schedule(8)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    step = torch.tensor([0, 3, 7])
    out = flow_step(sch, v, x, step, 0.0, torch.randn(3, 4, 5, 5, generator=g), sampler)
    dt = (sch.sigmas[step + 1] - sch.sigmas[step]).float().view(-1, 1, 1, 1)
    assert torch.allclose(out.prev_sample, x + v * dt, atol=1e-6)
    assert torch.equal(out.prev_sample, out.mean)


def test_sde_step_matches_the_hand_computed_gaussian():
    sch = _schedule(10)
    x, v, z = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.5), torch.full((1, 1, 2, 2), 1.2)
    k, a = 4, 0.7
    s, s1 = float(sch.sigmas[k]), float(sch.sigmas[k + 1])
    dt = s1 - s
    sd = a * math.sqrt(s / (1 - s))
    mean = 0.3 * (1 + sd ** 2 / (2 * s) * dt) + (-0.5) * (1 + sd ** 2 * (1 - s) / (2 * s)) * dt
    std = sd * math.sqrt(-dt)
    out = flow_step(sch, v, x, torch.tensor([k]), a, z, "sde")
    assert out.mean.flatten()[0].item() == pytest.approx(mean, abs=1e-6)
    assert out.std.flatten()[0].item() == pytest.approx(std, abs=1e-6)
    assert out.prev_sample.flatten()[0].item() == pytest.approx(mean + std * 1.2, abs=1e-6)
    expected_lp = -(std * 1.2) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert step_log_prob(out.prev_sample, out.mean, out.std).item() == pytest.approx(expected_lp, abs=1e-5)


def test_ddim_step_keeps_the_forward_coefficients():
    sch = _schedule(10)
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(2, 1, 3, 3, generator=g) for _ in range(3))
    k = 3
    s = sch.sigmas[k].float()
    x = (1 - s) * x0 + s * eps
    out = flow_step(sch, eps - x0, x, torch.tensor([k, k]), 0.8, z, "ddim")  # the exact velocity
    s1 = float(sch.sigmas[k + 1])
    s_ = float(s)
    std = 0.8 * s1 * math.sqrt(1 - ((1 - s_) * s1 / ((1 - s1) * s_)) ** 2)
    expect = (1 - s1) * x0 + math.sqrt(s1 ** 2 - std ** 2) * eps + std * z
    assert torch.allclose(out.prev_sample, expect, atol=1e-5)


def test_first_step_at_sigma_one_is_finite():
    sch = _schedule(20, shift=1.0)
    assert float(sch.sigmas[0]) == 1.0
    out = flow_step(sch, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([0]), 0.7, torch.ones(1, 1, 2, 2))
    assert torch.isfinite(out.prev_sample).all() and float(out.std.flatten()[0]) > 0


def _exact_velocity(x, sigma, mu, s0):
    """E[noise - x0 | x] for x0 ~ N(mu, s0^2), noise ~ N(0, 1), x = (1 - sigma) x0 + sigma noise."""
    var = (1 - sigma) ** 2 * s0 ** 2 + sigma ** 2
    r = x - (1 - sigma) * mu
    return sigma / var * r - (mu + (1 - sigma) * s0 ** 2 / var * r)


@pytest.mark.parametrize("sampler,level", [("ode", 0.0), ("sde", 0.7), ("ddim", 0.7), ("ddim", 1.0), ("sde", 1.0)])
def test_samplers_reach_the_data_distribution(sampler, level):
    """With the exact velocity field and small steps, every sampler keeps the ODE's marginals: N(mu, s0^2)."""
    mu, s0, n = 1.5, 0.4, 8000
    sch = _schedule(600)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, 1, generator=g)
    for k in range(sch.num_steps):
        sigma = sch.sigmas[k].float()
        v = _exact_velocity(x, sigma, mu, s0)
        x = flow_step(sch, v, x, torch.full((n,), k), level, torch.randn(n, 1, 1, 1, generator=g), sampler).prev_sample
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s0, abs=0.012)


def test_flow_noised_and_velocity_target():
    x0, noise = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    xt, target = flow_noised(x0, noise, torch.tensor([0.25, 1.0]))
    assert xt.flatten().tolist() == [0.25, 1.0] and target.flatten().tolist() == [1.0, 1.0]


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="flow sampler"):
        flow_step(_schedule(4), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]), 0.7, None, "heun")
