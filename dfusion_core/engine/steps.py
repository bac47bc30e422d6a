"""What every sampler step returns and the Gaussian step's log-likelihood, shared by the DDIM (ddim.py) and
flow (flow.py) samplers and by the trainers' trajectory losses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    mean: torch.Tensor  # mean of p(x_{t-1} | x_t)
    std: torch.Tensor  # its standard deviation, per row
    x0_pred: torch.Tensor


def step_log_prob(prev_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(prev | mean, std^2), averaged over a row's elements (the DDPO convention); 0 where std = 0."""
    std_safe = std.clamp(min=1e-20)
    lp = -((prev_sample.detach() - mean) ** 2) / (2 * std_safe ** 2) - torch.log(std_safe) - 0.5 * math.log(2 * math.pi)
    lp = lp.mean(dim=tuple(range(1, lp.ndim)))
    return torch.where(std.flatten(1)[:, 0] > 0, lp, torch.zeros_like(lp))


def mean_sq_residual(log_probs: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The mean over a row's elements of ((prev - mean) / std)^2, recovered from step_log_prob's value (its
    inverse): about 1 for a draw of the Gaussian itself (1 +/- sqrt(2 / elements)), far above 1 for a step the
    Gaussian would not draw. `std`: per row (broadcast to log_probs); 0 where std = 0 (a deterministic step)."""
    std = std.to(log_probs)
    std_safe = std.clamp(min=1e-20)
    r = -2 * (log_probs + torch.log(std_safe) + 0.5 * math.log(2 * math.pi))
    return torch.where(std > 0, r, torch.zeros_like(r))
