"""Stochastic DDIM as small pure functions, with the log-probability of each step.

diffusers' DDIMScheduler.step returns the next latent but not the Gaussian it was drawn from; trajectory
methods (DDPO, DPOK, trajectory DPO) need log p(x_{t-1} | x_t, c), so the step is written out here with the
scheduler's own alphas and timestep spacing. With the same noise it equals DDIMScheduler.step (tested).
All functions take per-row timesteps, so rows at different steps can share one UNet call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .steps import StepOutput


@dataclass(frozen=True)
class DDIMSchedule:
    """The numbers a DDIM step needs, read once from a diffusers scheduler config."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps], float64 on CPU
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str  # epsilon | v_prediction | sample
    clip_sample: bool
    clip_sample_range: float
    timesteps: tuple[int, ...]  # the inference timesteps, noisiest first

    @property
    def step_size(self) -> int:
        return self.num_train_timesteps // len(self.timesteps)


def make_schedule(scheduler, num_steps: int) -> DDIMSchedule:
    """Build the schedule from any diffusers scheduler with DDPM betas (SD's PNDM/DDIM/Euler configs)."""
    from diffusers import DDIMScheduler

    cfg = dict(scheduler.config)
    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(num_steps)
    set_one = cfg.get("set_alpha_to_one", False)
    ac = ddim.alphas_cumprod.double()
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {pred!r}")
    return DDIMSchedule(
        alphas_cumprod=ac, final_alpha_cumprod=1.0 if set_one else float(ac[0]),
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)), prediction_type=pred,
        clip_sample=bool(cfg.get("clip_sample", False)), clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        timesteps=tuple(int(t) for t in ddim.timesteps),
    )


def _alphas(schedule: DDIMSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at t and at the previous (less noisy) timestep, shaped to broadcast over `like`."""
    ac = schedule.alphas_cumprod
    prev = t - schedule.step_size
    a_t = ac[t.cpu()]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0).cpu()], torch.full_like(a_t, schedule.final_alpha_cumprod))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (a_t.to(like.device, like.dtype).view(shape), a_prev.to(like.device, like.dtype).view(shape))


def predict_x0_eps(schedule: DDIMSchedule, model_output: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model output, whatever the prediction type."""
    a_t, _ = _alphas(schedule, t, x_t)
    sa, s1a = a_t.sqrt(), (1 - a_t).sqrt()
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s1a * eps) / sa
    elif schedule.prediction_type == "v_prediction":
        x0 = sa * x_t - s1a * model_output
        eps = sa * model_output + s1a * x_t
    else:
        x0 = model_output
        eps = (x_t - sa * x0) / s1a
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def ddim_step(schedule: DDIMSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              eta: float, noise: torch.Tensor | None) -> StepOutput:
    """One DDIM step (Song et al. eq. 12) with variance eta^2 * sigma_t^2; noise = the step's N(0, I) draw."""
    x0, eps = predict_x0_eps(schedule, model_output, x_t, t)
    a_t, a_prev = _alphas(schedule, t, x_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    prev = mean if noise is None or eta == 0 else mean + std * noise
    return StepOutput(prev, mean, std, x0)
