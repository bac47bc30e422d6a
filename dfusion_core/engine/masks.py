"""From recorded cross-attention maps to the fusion mask of each layer (docs/METHOD.md step 4).

maps (per layer, head-averaged softmax over 77 tokens)
  -> average over layers at the finest mask resolution
  -> one map per keyword (mean over the keyword's tokens)
  -> combine = mean: threshold the keywords' mean map | union: threshold per keyword, OR them (paper)
     (threshold: auto = Otsu | absolute | relative to max | area quantile; optionally OR the base's own mask)
  -> resized to each fusion layer (nearest, or bilinear + dilation + feathering)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import layer_hw
from .config import MaskParams
from .schema import shown


def aggregate_maps(maps: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Average head-averaged maps [N_l, T] of several layers into one [T, h, w] at the finest resolution."""
    if not maps:
        raise ValueError("no attention maps were recorded for the mask layers")
    grids = []
    for m in maps.values():
        h, w = layer_hw(m.shape[0], latent_hw)
        grids.append(m.float().T.reshape(1, -1, h, w))
    hh = max(g.shape[-2] for g in grids)
    ww = max(g.shape[-1] for g in grids)
    up = [g if g.shape[-2:] == (hh, ww) else F.interpolate(g, size=(hh, ww), mode="bilinear", align_corners=False)
          for g in grids]
    return torch.cat(up).mean(0)


def keyword_maps(agg: torch.Tensor, token_groups: list[tuple[int, ...]]) -> torch.Tensor:
    """[K, h, w]: for each keyword the mean map of its tokens."""
    return torch.stack([agg[list(g)].mean(0) for g in token_groups])


def otsu_threshold(x: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold: the cut maximising between-class variance (no per-prompt tuning needed)."""
    x = x.flatten().float()
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(x, bins=bins, min=lo, max=hi)
    p = hist / hist.sum()
    centers = torch.linspace(lo, hi, bins + 1)[:-1] + (hi - lo) / bins / 2
    w0 = torch.cumsum(p, 0)
    mu = torch.cumsum(p * centers, 0)
    mu_t = mu[-1]
    w1 = 1 - w0
    between = (mu_t * w0 - mu) ** 2 / (w0 * w1).clamp(min=1e-12)
    k = int(torch.argmax(between[:-1]))
    return float(lo + (hi - lo) * (k + 1) / bins)


def threshold_maps(kmaps: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """Binary [K, h, w] masks, one per keyword map."""
    out = []
    for m in kmaps:
        if mode == "absolute":
            cut = threshold
        elif mode == "relative":
            cut = threshold * float(m.max())
        elif mode == "area":
            keep = max(1, round(threshold * m.numel()))
            cut = float(torch.topk(m.flatten(), keep).values[-1])
        elif mode == "auto":
            cut = otsu_threshold(m)
        else:
            raise ValueError(f"unknown threshold mode {shown(mode)}")
        out.append(m >= cut if mode in ("area", "auto") else m > cut)
    return torch.stack(out)


def keyword_mask(kmaps: torch.Tensor, mode: str, threshold: float, combine: str = "mean") -> torch.Tensor:
    """Binary [h, w] mask of all keywords together: the mean map thresholded, or the union of each
    keyword's thresholded map (the paper's, which one diffuse keyword spreads over the whole image)."""
    if combine == "mean":
        return threshold_maps(kmaps.mean(0, keepdim=True), mode, threshold)[0]
    if combine == "union":
        return threshold_maps(kmaps, mode, threshold).any(0)
    raise ValueError(f"unknown combine mode {shown(combine)}")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def grow(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Mask [h, w] grown by `cells` in every direction (a square neighbourhood, as the grid's cells touch)."""
    x = mask.float()[None, None]
    return F.max_pool2d(x, 2 * cells + 1, stride=1, padding=cells)[0, 0] if cells > 0 else x[0, 0]


def resize_mask(mask: torch.Tensor, size: tuple[int, int], resize: str = "nearest", dilate: int = 0,
                feather: float = 0.0) -> torch.Tensor:
    """Mask [h, w] in [0, 1] -> [H, W] in [0, 1] for one fusion layer."""
    x = grow(mask, dilate)[None, None]
    if x.shape[-2:] != tuple(size):
        if resize == "nearest":
            x = F.interpolate(x, size=size, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if feather > 0:
        x = _gaussian_blur(x, feather)
    return x[0, 0].clamp(0, 1)


class FusionMasker:
    """Answers 'which positions of layer L does target (ref, base) take from its reference at step s'.

    Masks are built from the maps in the store at that step (or the running mean over steps) and memoised
    per step; None means the step is outside the fusion range.
    """

    def __init__(self, store, params: MaskParams, token_groups: list[tuple[int, ...]], latent_hw: tuple[int, int],
                 step_range: tuple[int, int], use_mask: bool = True, layers: frozenset[str] | None = None):
        self.store, self.params, self.groups = store, params, token_groups
        self.layers = layers  # fuse only these layers (a cached run may record more)
        self.latent_hw, self.use_mask = latent_hw, use_mask
        self.first, self.last = step_range[0] - 1, step_range[1] - 1  # 0-based inclusive
        self._combined: dict[tuple, torch.Tensor] = {}
        self._resized: dict[tuple, torch.Tensor] = {}

    def active(self, step: int) -> bool:
        return self.first <= step <= self.last

    def keyword_maps(self, role: str, ident: int, step: int) -> torch.Tensor:
        """[K, h, w] keyword maps of one image at one step (running mean if accumulate_steps)."""
        steps = range(0, step + 1) if self.params.accumulate_steps else (step,)
        mats = [keyword_maps(aggregate_maps(self.store.maps(role, ident, s), self.latent_hw), self.groups)
                for s in steps]
        return torch.stack(mats).mean(0)

    def combined_mask(self, ref: int, base: int, step: int) -> torch.Tensor:
        """[h, w] float mask at mask resolution (keywords combined, optionally OR the base's)."""
        key = (ref, base, step)
        if key not in self._combined:
            p = self.params
            m = keyword_mask(self.keyword_maps("ref", ref, step), p.threshold_mode, p.threshold, p.combine)
            if p.union_base:
                mb = keyword_mask(self.keyword_maps("base", base, step), p.threshold_mode, p.threshold, p.combine)
                m = m | (grow(mb, p.dilate_base) > 0.5 if p.dilate_base else mb)
            self._combined[key] = m.float()
        return self._combined[key]

    def mask(self, ref: int, base: int, step: int, layer: str, n_tokens: int) -> torch.Tensor | None:
        if not self.active(step) or (self.layers is not None and layer not in self.layers):
            return None
        key = (ref, base, step, n_tokens)
        if key not in self._resized:
            if not self.use_mask:
                m = torch.ones(n_tokens)
            else:
                p = self.params
                size = layer_hw(n_tokens, self.latent_hw)
                m = resize_mask(self.combined_mask(ref, base, step), size, p.resize, p.dilate, p.feather).flatten()
            self._resized[key] = m
        return self._resized[key]
