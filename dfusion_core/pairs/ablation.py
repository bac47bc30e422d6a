"""Ablations of one pair: mask on/off x fusion step ranges (x thresholds), with scores and consistency.

Consistency is measured against the base: the mean absolute pixel change inside the reference's mask
versus outside it. D-Fusion should change the inside (where alignment lives) and keep the outside; global
fusion (no mask) changes both. All cells after the first come from the reference cache, and the cells that
differ from the first only in their end step reuse its leading target steps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.config import FusionParams, SamplingParams
from ..engine.fusion import fuse
from ..engine.loading import LoadedModel
from ..engine.reference_cache import ReferenceCache


@dataclass
class AblationCell:
    label: str
    fusion: FusionParams
    image: object
    change_inside: float  # mean |target - base| (0..255) inside the reference mask
    change_outside: float  # ... outside it
    score: float | None = None


def default_ranges(num_steps: int) -> list[tuple[str, int, int]]:
    """early / late / all, the paper's observation: early steps shape structure, late steps details."""
    half = max(3, num_steps // 2)
    return [("early", 3, half), ("late", min(half + 1, num_steps), num_steps), ("all", 3, num_steps)]


def mask_region(masks: torch.Tensor, first: int, last: int, size: tuple[int, int]) -> np.ndarray:
    """Pixels inside the mask on most of the fused steps first..last (1-based), at image size."""
    m = masks[first - 1:last].mean(0)[None, None].float()
    return (F.interpolate(m, size=size, mode="nearest")[0, 0] > 0.5).numpy()


def change_inside_outside(image, base_image, region: np.ndarray) -> tuple[float, float]:
    """Mean |image - base| (0..255) inside and outside `region` (nan where that part is empty)."""
    diff = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(base_image, dtype=np.float32)).mean(-1)
    return (float(diff[region].mean()) if region.any() else float("nan"),
            float(diff[~region].mean()) if (~region).any() else float("nan"))


def run_ablation(model: LoadedModel, prompt: str, base_seed: int, ref_seed: int, sampling: SamplingParams,
                 fusion: FusionParams, cache: ReferenceCache | None = None, base=None, base_image=None,
                 scorer=None, thresholds: list[tuple[str, float]] | None = None) -> list[AblationCell]:
    """Cells: for each step range, with and without the mask; then, optionally, relative thresholds; then the
    other way of combining keywords (mean map vs union of per-keyword masks)."""
    cache = cache or ReferenceCache()
    n = sampling.num_steps
    ref_run = fuse(model, prompt, base_seed, ref_seed, sampling, replace(fusion, start_step=3 if n >= 3 else 1,
                                                                          end_step=n, use_mask=True),
                   base=base, cache=cache, base_image=base_image, exact_log_probs=False)  # images only
    base = ref_run.base
    inside = mask_region(ref_run.masks, 3 if n >= 3 else 1, n, ref_run.base_image.size[::-1])
    variants = []
    for name, a, b in default_ranges(n):
        a, b = min(a, n), min(b, n)
        for use_mask in (True, False):
            variants.append((f"{name} {a}-{b} {'mask' if use_mask else 'no mask'}",
                             replace(fusion, start_step=a, end_step=b, use_mask=use_mask)))
    for name, t in thresholds or []:
        variants.append((f"threshold {name}", replace(fusion, mask=replace(fusion.mask, threshold_mode="relative",
                                                                              threshold=t))))
    other = "union" if fusion.mask.combine == "mean" else "mean"
    variants.append((f"keywords {other}", replace(fusion, mask=replace(fusion.mask, combine=other))))
    cells = []
    for label, f in variants:
        r = fuse(model, prompt, base_seed, ref_seed, sampling, f, base=base, cache=cache, base_image=ref_run.base_image,
                 previous=ref_run, exact_log_probs=False)  # cells differing only in the end step reuse its steps
        cells.append(AblationCell(label, f, r.target_image, *change_inside_outside(r.target_image, ref_run.base_image,
                                                                                   inside)))
    if scorer is not None:
        scores = scorer([c.image for c in cells], [prompt] * len(cells))
        for c, s in zip(cells, scores):
            c.score = float(s)
    return cells
