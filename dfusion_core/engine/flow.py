"""Flow-matching sampling steps with a likelihood, as small pure functions (the MMDiT counterpart of ddim.py).

Rectified flow (SD3, SD3.5): x_sigma = (1 - sigma) x0 + sigma * noise, and the model predicts the velocity
v = noise - x0. Its default sampler is the deterministic Euler ODE step x' = x + v (sigma' - sigma), which has
no likelihood, so trajectory methods (DDPO, DPOK, trajectory DPO) cannot use it. Two stochastic steps with the
ODE's marginals and a Gaussian transition are offered; both equal the Euler step exactly at noise level 0:

* "sde" (Flow-GRPO, arXiv 2505.05470): the reverse SDE
      dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s dW,   s = a * sqrt(sigma / (1 - sigma)),
  discretised with Euler-Maruyama; std = s * sqrt(sigma - sigma'). At sigma = 1 the ratio uses the
  schedule's second sigma (as Flow-GRPO does) so the first step stays finite. Default a = 0.7.
* "ddim": DDIM written for rectified flow (coefficient-preserving, as Flow-CPS arXiv 2509.05952 argues),
      x' = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) noise_hat + std * z,
      std = a * sigma' * sqrt(1 - ((1 - sigma) sigma' / ((1 - sigma') sigma))^2),
  i.e. a times the forward process's posterior std (a = 1 is ancestral sampling). Every x' keeps exactly the
  forward process's coefficients, and the std shrinks with the step, so the marginals match the ODE's as
  steps shrink. (Flow-CPS's own std = sigma' sin(a pi / 2) does not shrink with the step: measured on a
  Gaussian with its exact velocity, 400 steps end at std 0.335 for a true 0.4, so it is not offered.)
On x0 ~ N(1.5, 0.4^2) with the exact velocity field, 20 steps (shift 3) end at std 0.361 (sde 0.7), 0.317
(ddim 0.7), 0.296 (ddim 1.0); 1,000 steps at 0.400 / 0.398 / 0.397 (tests/test_flow.py): "sde" is the default.
All functions take per-row step indices, so rows at different steps can share one transformer call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FLOW_SAMPLERS
from .schema import shown
from .steps import StepOutput


@dataclass(frozen=True)
class FlowSchedule:
    """The numbers a flow step needs, read once from a diffusers FlowMatchEulerDiscreteScheduler."""

    sigmas: torch.Tensor  # [S + 1] float64: noisiest first, last = 0
    timesteps: tuple[float, ...]  # [S] what the transformer is given (sigma * num_train_timesteps)
    num_train_timesteps: int
    train_sigmas: torch.Tensor | None = None  # [num_train_timesteps] float64: the training sigmas, noisiest first

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def make_flow_schedule(scheduler, num_steps: int) -> FlowSchedule:
    """The scheduler's own sigmas (with its shift) for `num_steps` steps; dynamic shifting is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(scheduler.config)
    if cfg.get("use_dynamic_shifting"):
        raise ValueError("schedulers with resolution-dependent (dynamic) shifting are not supported yet")
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(num_steps)
    sigmas = sched.sigmas.double().cpu()
    if sigmas.shape[0] != num_steps + 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"unexpected flow schedule: {sigmas.shape[0]} sigmas ending at {float(sigmas[-1])}")
    train_sigmas = FlowMatchEulerDiscreteScheduler.from_config(cfg).sigmas.double().cpu()  # before set_timesteps
    return FlowSchedule(sigmas, tuple(float(t) for t in sched.timesteps), int(cfg.get("num_train_timesteps", 1000)),
                        train_sigmas)


def _sigmas(schedule: FlowSchedule, step: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma at each row's step and at its next step, shaped to broadcast over `like`."""
    idx = step.long().cpu()
    shape = (-1,) + (1,) * (like.ndim - 1)
    s, s_next = schedule.sigmas[idx], schedule.sigmas[idx + 1]
    return s.to(like.device, like.dtype).view(shape), s_next.to(like.device, like.dtype).view(shape)


def predict_x0_noise(velocity: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) implied by a velocity prediction at x = (1 - sigma) x0 + sigma noise."""
    return x - sigma * velocity, x + (1 - sigma) * velocity


def flow_step(schedule: FlowSchedule, velocity: torch.Tensor, x: torch.Tensor, step: torch.Tensor,
              noise_level: float, noise: torch.Tensor | None, sampler: str = "sde") -> StepOutput:
    """One step from sigma_step to sigma_{step+1}; noise = the step's N(0, I) draw (None: the mean)."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"flow sampler must be one of {', '.join(FLOW_SAMPLERS)}, got {shown(sampler)}")
    x, velocity = x.double(), velocity.double()
    sigma, sigma_next = _sigmas(schedule, step, x)
    x0, eps = predict_x0_noise(velocity, x, sigma)
    a = 0.0 if sampler == "ode" else float(noise_level)
    if sampler == "ddim":
        ratio = (1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)
        std = a * sigma_next * (1 - ratio ** 2).clamp(min=0).sqrt()
        mean = (1 - sigma_next) * x0 + (sigma_next ** 2 - std ** 2).clamp(min=0).sqrt() * eps
    else:
        dt = sigma_next - sigma  # negative: sigma decreases
        sigma_max = float(schedule.sigmas[1]) if schedule.num_steps > 1 else 0.5
        denom = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_max), sigma)
        s = a * (sigma / denom).sqrt()
        mean = x * (1 + s ** 2 / (2 * sigma) * dt) + velocity * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * (-dt).sqrt()
    prev = mean if noise is None or a == 0 else mean + std * noise.double()
    return StepOutput(prev.float(), mean.float(), std.float(), x0.float())


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, velocity target) for training: the flow-matching counterpart of DDPM noising + eps target."""
    s = sigma.view((-1,) + (1,) * (x0.ndim - 1)).to(x0)
    return (1 - s) * x0 + s * noise, noise - x0
