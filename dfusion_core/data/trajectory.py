"""One image's denoising path: a record of tensors, produced by the engine's sampler, stored by the data layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """One image's denoising path (docs/METHOD.md step 1 / 6), on the CPU."""

    seed: int
    latents: torch.Tensor  # [S+1, C, h, w]: x_T ... x_0
    timesteps: torch.Tensor  # [S] long
    log_probs: torch.Tensor  # [S]: log p(x_{t-1} | x_t) under the sampler that produced it
    x0_preds: torch.Tensor  # [S, C, h, w]: predicted clean latent at each step (trajectory viewer)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.latents": self.latents, f"{prefix}.timesteps": self.timesteps,
                f"{prefix}.log_probs": self.log_probs, f"{prefix}.x0_preds": self.x0_preds}

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], prefix: str, seed: int) -> "Trajectory":
        return cls(seed, d[f"{prefix}.latents"], d[f"{prefix}.timesteps"], d[f"{prefix}.log_probs"],
                   d[f"{prefix}.x0_preds"])
