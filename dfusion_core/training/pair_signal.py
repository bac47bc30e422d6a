"""Pair-signal diagnostics: does a pair set carry a preference a model can learn, before any training?

For every labelled pair (ties skipped) the winner is the image its label prefers (label "target": the target;
"base": the base) and the loser the other. Three views:
- the ground-truth checker (a world's `check(images, prompt) -> list[bool] | None`, e.g. ShapesWorld's): P(winner
  correct) - P(loser correct), and the share of pairs whose winner is correct and loser wrong (and the reverse);
  pairs whose prompt the checker cannot read are left out of these numbers;
- the scorer: the score gap winner - loser, from the scores stored with the pair;
- visual consistency: the mean absolute pixel difference |winner - loser| (RGB in [0, 1], mean over channels)
  inside and outside the pair's fusion mask. The mask is the union over steps (max) of the per-step masks, resized
  to the image (nearest: each pixel takes its mask cell's value), and used as weights:
  in = sum(m d) / sum(m), out = sum((1 - m) d) / sum(1 - m).
  A D-Fusion pair should differ inside and match outside; a random pair has an empty mask (no "in" value).
Means are over the pairs that have the quantity (None when none has it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PairSignal:
    """One pair set's signal (None where the quantity is not available)."""

    pairs: int  # labelled pairs measured (ties not counted)
    ties: int  # pairs labelled tie (no preference: skipped)
    checked: int  # pairs whose prompt the checker reads (0: no checker)
    p_winner_correct: float | None  # checker: share of winners that satisfy the prompt
    p_loser_correct: float | None  # checker: share of losers that satisfy the prompt
    checker_gap: float | None  # P(winner correct) - P(loser correct)
    winner_only: float | None  # share of checked pairs whose winner is correct and loser wrong
    loser_only: float | None  # share of checked pairs whose loser is correct and winner wrong
    scored: int  # pairs with both scores
    score_gap: float | None  # scorer: mean (winner score - loser score)
    score_gap_std: float | None  # its standard deviation over pairs (population)
    score_gap_positive: float | None  # share of scored pairs whose winner scores higher
    masked: int  # pairs with a non-empty fusion mask
    mask_coverage: float | None  # mean share of the image under the (union) mask, over masked pairs
    diff_in_mask: float | None  # mean |winner - loser| inside the mask, over masked pairs
    diff_out_mask: float | None  # mean |winner - loser| outside the mask, over pairs with images

    def as_dict(self) -> dict:
        return asdict(self)


def winner_loser(record) -> tuple[str, str] | None:
    """(winner role, loser role) of a record by its label; None for a tie."""
    return {"target": ("target", "base"), "base": ("base", "target")}.get(record.label)


def _mean(xs: list[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def _image(im) -> torch.Tensor:
    """PIL image (or HxWx3 array) -> [H, W, 3] float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def mask_consistency(winner_img, loser_img, masks: torch.Tensor) -> tuple[float | None, float | None, float]:
    """(|w - l| inside the union mask, outside it, the mask's coverage) of one pair; inside is None (coverage 0)
    for an empty mask, outside None for a mask covering everything."""
    d = (_image(winner_img) - _image(loser_img)).abs()
    d = d.mean(dim=-1) if d.ndim == 3 else d  # [H, W]
    m = masks.float().reshape(-1, *masks.shape[-2:]).amax(dim=0).clamp(0, 1)  # union over steps
    if m.shape != d.shape:
        m = F.interpolate(m[None, None], size=tuple(d.shape), mode="nearest")[0, 0]
    w_in, w_out = float(m.sum()), float((1 - m).sum())
    inside = float((m * d).sum()) / w_in if w_in > 1e-9 else None
    outside = float(((1 - m) * d).sum()) / w_out if w_out > 1e-9 else None
    return inside, outside, float(m.mean())


def _checker_rows(pairs, check) -> list[tuple[bool, bool]]:
    """(winner correct, loser correct) of every pair whose prompt the checker reads, one check call per pair."""
    rows = []
    for rec, (w, l) in pairs:
        if w not in rec.images or l not in rec.images:
            continue
        verdicts = check([rec.images[w], rec.images[l]], rec.prompt)
        if verdicts is not None:
            rows.append((bool(verdicts[0]), bool(verdicts[1])))
    return rows


def pair_signal(records, check=None) -> PairSignal:
    """The signal of a pair set (PairRecords, with images for the checker and the consistency numbers);
    `check`: the world's checker ((images, prompt) -> list[bool] | None), or None."""
    pairs = [(r, wl) for r in records if (wl := winner_loser(r)) is not None]
    ties = sum(1 for r in records if r.label == "tie")
    rows = _checker_rows(pairs, check) if check is not None else []
    gaps = [float(r.scores[w]) - float(r.scores[l]) for r, (w, l) in pairs
            if r.scores.get(w) is not None and r.scores.get(l) is not None]
    ins, outs, cover = [], [], []
    for r, (w, l) in pairs:
        if w in r.images and l in r.images:
            i, o, c = mask_consistency(r.images[w], r.images[l], r.masks)
            if i is not None:
                ins.append(i)
                cover.append(c)
            if o is not None:
                outs.append(o)
    pw = _mean([float(a) for a, _ in rows])
    pl = _mean([float(b) for _, b in rows])
    g = np.asarray(gaps, dtype=np.float64)
    return PairSignal(
        pairs=len(pairs), ties=ties, checked=len(rows), p_winner_correct=pw, p_loser_correct=pl,
        checker_gap=None if pw is None else pw - pl,
        winner_only=_mean([float(a and not b) for a, b in rows]), loser_only=_mean([float(b and not a) for a, b in rows]),
        scored=len(gaps), score_gap=_mean(gaps), score_gap_std=float(g.std()) if len(g) else None,
        score_gap_positive=_mean([float(x > 0) for x in gaps]), masked=len(ins), mask_coverage=_mean(cover),
        diff_in_mask=_mean(ins), diff_out_mask=_mean(outs))


def load_records(source: str | Path, with_images: bool = True) -> list:
    """A pair folder's (pairs.jsonl) or a preference store's (store.sqlite) records."""
    p = Path(source).expanduser()
    if (p / "store.sqlite").is_file():
        from ..data.preference_store import PreferenceStore

        return PreferenceStore(p).records(with_images=with_images)
    from ..data.records import load_pairs

    if (p / "pairs.jsonl").is_file() or any(p.glob("pairs*.jsonl")):
        return load_pairs(p, with_images=with_images)
    raise ValueError(f"{p} is neither a preference store (store.sqlite) nor a pair folder (pairs.jsonl)")


def format_signal(sig: PairSignal, name: str = "") -> str:
    """A readable table of one pair set's signal."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [f"pair signal{f' of {name}' if name else ''}"]
    lines += [f"  {k:<20} {fmt(v)}" for k, v in sig.as_dict().items()]
    return "\n".join(lines)
