"""Our DDIM step is diffusers' DDIMScheduler.step, plus the Gaussian it draws from."""
import pytest
import torch
from diffusers import DDIMScheduler

from dfusion_core.engine.ddim import ddim_step, make_schedule
from dfusion_core.engine.steps import mean_sq_residual, step_log_prob

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_step_equals_diffusers(prediction_type, spacing, eta):
    sched = DDIMScheduler(prediction_type=prediction_type, timestep_spacing=spacing, **BASE)
    sched.set_timesteps(10)
    ours = make_schedule(sched, 10)
    assert list(ours.timesteps) == [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        mine = ddim_step(ours, out, x, torch.full((2,), int(t)), eta, noise).prev_sample
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
        x = ref


def test_rows_at_different_timesteps_in_one_call():
    sched = DDIMScheduler(**BASE)
    s = make_schedule(sched, 20)
    x, out, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([s.timesteps[0], s.timesteps[5], s.timesteps[19]])
    together = ddim_step(s, out, x, t, 1.0, noise).prev_sample
    for i in range(3):
        alone = ddim_step(s, out[i:i + 1], x[i:i + 1], t[i:i + 1], 1.0, noise[i:i + 1]).prev_sample
        torch.testing.assert_close(together[i:i + 1], alone)


def test_log_prob_is_gaussian_density_and_peaks_at_mean():
    mean, std = torch.zeros(1, 2, 2), torch.full((1, 1, 1), 0.5)
    at_mean = step_log_prob(mean, mean, std)
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(torch.tensor(0.0))
    torch.testing.assert_close(at_mean, expected.view(1))
    assert step_log_prob(mean + 0.3, mean, std) < at_mean
    assert step_log_prob(mean + 0.3, mean, std * 0) == 0  # deterministic step (eta 0): defined as 0


def test_mean_sq_residual_inverts_the_log_prob():
    """The residual recovered from a step's log-prob is the mean of ((prev - mean) / std)^2: about 1 for a draw
    of the Gaussian, 9 for one shifted by 3 stds everywhere, 0 for a deterministic step."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 8, 8, generator=g)
    std = torch.tensor([0.5, 7e-4, 0.0]).view(3, 1, 1, 1)
    draw = mean + std * torch.randn(mean.shape, generator=g)
    r = mean_sq_residual(step_log_prob(draw, mean, std), std.flatten())
    want = ((draw[:2] - mean[:2]) / std[:2]) ** 2
    torch.testing.assert_close(r[:2], want.mean(dim=(1, 2, 3)), rtol=1e-3, atol=1e-3)
    assert abs(float(r[0]) - 1) < 0.2 and float(r[2]) == 0.0
    shifted = mean + 3 * std
    torch.testing.assert_close(mean_sq_residual(step_log_prob(shifted, mean, std), std.flatten())[:2],
                               torch.tensor([9.0, 9.0]), rtol=1e-3, atol=1e-2)
