"""A running fusion's progress, and how its caller stops it.

Why: an interactive caller (the app's live controls) wants to show the target forming while it is denoised, and to
drop a fusion that a newer request has made stale at its next step rather than after the whole run. Modelled on
diffusers' `callback_on_step_end`: a function called after every denoiser call with what that call produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class FusionStep:
    """What one denoiser call of a fusion produced, as its `on_step` callback sees it."""

    call: int  # 1-based denoiser call of this run
    calls: int  # calls the run makes in all (a cached re-fusion makes fewer than a fresh one)
    step: int | None  # 1-based sampler step the first target just took; None when the call advanced no target
    num_steps: int  # the sampler's steps
    x0_pred: torch.Tensor | None  # [C, h, w] that target's predicted clean latent (decode it for a preview)


class FusionCancelled(Exception):
    """Raised by an `on_step` callback to stop a fusion: the run ends at once, nothing is cached or returned."""


OnStep = Callable[[FusionStep], None]
