"""Pictures for the screen: heatmaps over the reference, mask overlays, captions. Presentation only."""
from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image

# Server-side drawing only. Fixing the backend once also keeps gradio's per-event backend switch cheap
# (it resolves and switches the backend around every event; measured ~50 ms a call when left unset).
matplotlib.use("Agg")
from matplotlib import colormaps  # noqa: E402

DISPLAY = 256  # small models draw 64 px images; show them larger with crisp pixels


# Shown under the candidates when the model's world has a ground-truth checker (its verdict follows each score).
CHECKER_LEGEND = ("✓ / ✗ after a candidate's score: the world's ground-truth checker, which reads the image and "
                  "says whether it shows what the caption asks for (✗: a shape, colour or relation is wrong). "
                  "BASE and REF mark the pair that Fuse uses.")
PAIR_MARKS = {"base": "BASE", "reference": "REF"}  # a candidate's role in the pair, as its caption starts


def candidate_caption(c, role: str | None = None) -> str:
    """`seed S · score · ✓/✗`, led by the candidate's role in the pair ('base' / 'reference') when it has one."""
    out = f"{PAIR_MARKS[role]} · seed {c.seed}" if role else f"seed {c.seed}"
    if c.score is not None:
        out += f" · {c.score:.3f}"
    if c.correct is not None:
        out += " · ✓" if c.correct else " · ✗"
    return out


def pick_note(candidates: dict, base: int, ref: int) -> str:
    """The status after Sample: the suggested pair and why, with a warning where the world's checker rejects the
    suggested reference (no candidate passed it) or passes the base (none failed it)."""
    b, r = candidates.get(base), candidates.get(ref)
    if b is None or r is None:
        return ""
    if r.score is None:
        return f"Suggested pair: BASE seed {base}, REF seed {ref} (no scorer: the first and last candidates)."
    if r.correct is None:
        return f"Suggested pair: BASE seed {base}, REF seed {ref} (the lowest and highest score)."
    out = (f"Suggested pair: BASE seed {base} (checker {'✓' if b.correct else '✗'}), REF seed {ref} (checker "
           f"{'✓' if r.correct else '✗'}): the best-scored candidate the checker passes and the lowest-scored it "
           "rejects.")
    if not r.correct:
        out += (f"\n\n⚠ The reference fails the checker: none of the {len(candidates)} candidates passes it. Sample "
                "more candidates (or other seeds) before labelling this pair.")
    elif b.correct:
        out += (f"\n\n⚠ The base passes the checker too: all {len(candidates)} candidates pass, so the pair differs "
                "by score only.")
    return out


def prompt_notes_text(notes: list[str]) -> str:
    """The warnings under the prompt (empty: nothing shown)."""
    return "\n\n".join(f"⚠ {n}" for n in notes)


def enlarge(im: Image.Image, size: int = DISPLAY) -> Image.Image:
    if im is None:
        return None
    scale = max(1, size // max(im.size))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def heat_overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """Colour a [h, w] map (any range) over the image."""
    h = np.asarray(heat, dtype=np.float32)
    lo, hi = float(h.min()), float(h.max())
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    rgb = (colormaps[cmap](h)[..., :3] * 255).astype(np.uint8)
    over = Image.fromarray(rgb).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), over, alpha)


MASK_COLOUR, MASK_ALPHA = (0, 200, 255), 0.6
# The mask overlay's legend: the tint runs from none (kept from the base) to full (taken from the reference).
MASK_LEGEND = (
    "<div id='mask-legend-body' style='font-size: 0.85em; line-height: 1.5'>"
    "<span style='display: inline-block; width: 9em; height: 0.9em; vertical-align: middle; border: 1px solid #888;"
    f" background: linear-gradient(to right, rgba(0,0,0,0), rgba{MASK_COLOUR + (MASK_ALPHA,)})'></span>"
    " &nbsp;<b>untinted</b>: the target keeps its own (the base's) keys and values there · <b>tinted</b>: it"
    " takes the reference's there; the stronger the tint, the more of the fused steps did</div>")


def mask_overlay(image: Image.Image, mask: np.ndarray, colour=MASK_COLOUR) -> Image.Image:
    """Tint the masked region of the image (mask in [0, 1]; MASK_LEGEND explains it)."""
    m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, colour)
    a = (np.asarray(m, dtype=np.float32) / 255 * MASK_ALPHA)[..., None]
    out = np.asarray(image.convert("RGB"), dtype=np.float32) * (1 - a) + np.asarray(tint, dtype=np.float32) * a
    return Image.fromarray(out.astype(np.uint8))


PREVIEW_STATUS = "fusing · step {step} of {n} · preview of the target"  # the status while a target forms
SUPERSEDED_STATUS = "superseded by a newer setting: fusing that one"
ROLES = ("base", "reference", "target")  # the order of the images on the Fuse tab


def pair_notes(coverage: float | None, base_image, target_image) -> list[str]:
    """Warnings about a fused pair that leave nothing to prefer: an empty mask (`coverage` 0; None when the
    mask is off) or a target identical to the base."""
    same = base_image is not None and target_image is not None and (
        np.array_equal(np.asarray(base_image), np.asarray(target_image)))
    if coverage == 0:
        return ["the mask is empty: nothing was fused, so the target is the base"
                + (" (identical images)" if same else "") + " - nothing to prefer; lower the threshold or skip [4]"]
    if same:
        return ["the target is identical to the base: nothing to prefer; skip [4] or change the fusion"]
    return []


def _verdicts(scores: dict) -> list[str]:
    """One neutral line each for the scorer and the checker on target against base."""
    out = []
    t, b = scores.get("target checker"), scores.get("base checker")
    if "base" in scores and "target" in scores:
        d = scores["target"] - scores["base"]
        higher = "target" if d > 0 else "base"
        verdict_of = {"target": t, "base": b}[higher]
        rejected = verdict_of is not None and not verdict_of  # the scorer's favourite fails the checker: say so
        out.append("scorer: target and base score the same" if abs(d) < 5e-4 else
                   f"scorer: {higher} higher by {abs(d):.3f}"
                   + (f", though the checker rejects the {higher}" if rejected else ""))
    if t is not None and b is not None:
        out.append("checker: " + ("both pass" if t and b else "neither passes" if not (t or b) else
                                  f"only the {'target' if t else 'base'} passes"))
    return out


def score_text(scores: dict, notes: list[str] | tuple = ()) -> str:
    """What the scorer and the checker say about base, reference and target, side by side (a table), then
    which of target and base each prefers - neither image is called the winner; `notes` (warnings) first."""
    parts = [f"⚠ **{n}**" for n in notes]
    roles = [r for r in ROLES if r in scores or f"{r} checker" in scores]
    if not roles:
        return "\n\n".join(parts + ["_no scorer loaded_"])
    rows = ["| | " + " | ".join(r.capitalize() for r in roles) + " |", "|---" * (len(roles) + 1) + "|"]
    if any(r in scores for r in roles):
        rows.append("| CLIP score | " + " | ".join(f"{scores[r]:.3f}" if r in scores else "-" for r in roles) + " |")
    if any(f"{r} checker" in scores for r in roles):
        marks = [scores.get(f"{r} checker") for r in roles]
        rows.append("| ground-truth checker | " + " | ".join("-" if m is None else "✓" if m else "✗" for m in marks)
                    + " |")
    return "\n\n".join(parts + ["\n".join(rows)] + [" · ".join(_verdicts(scores))])


# The threshold slider of each mode: what it means, and where it lies before a fusion gives a map to measure.
THRESHOLD_LABELS = {
    "auto": "Threshold - auto: Otsu's cut, chosen per map and step (the slider is off; pick a mode to set it)",
    "absolute": "Threshold - absolute: attention probability (spans this map's values)",
    "relative": "Threshold - relative: fraction of the map's maximum (spans where the mask changes)",
    "area": "Threshold - area: fraction of the image the mask keeps",
}
THRESHOLD_OFF = "Threshold (off: the mask is not used)"


def _threshold_map(kmaps: np.ndarray, combine: str, mode: str) -> np.ndarray:
    """The one map whose cut at t gives the mask (as dfusion_core.engine.masks cuts it): the keywords' mean
    map, or for a union of per-keyword masks their maximum (m_1 > t or m_2 > t <=> max(m_1, m_2) > t); in
    relative mode each thresholded map is first divided by its maximum."""
    m = np.asarray(kmaps, dtype=np.float64)
    if combine == "mean":
        m = m.mean(0, keepdims=True)
    if mode == "relative":
        m = m / np.maximum(m.reshape(len(m), -1).max(1), 1e-12)[:, None, None]
    return m.max(0)


def threshold_slider(mode: str, value: float, kmaps: np.ndarray | None = None, combine: str = "mean",
                     use_mask: bool = True, coverage: float | None = None) -> dict:
    """The threshold slider's settings (label, range, step, value, interactive) for a mode, over the fused
    pair's keyword maps [K, h, w] when there are: the range is where the cut changes the mask (the map's
    values; for area, one position to the whole image). The value is kept (the range grows to hold it) or,
    with `coverage`, is the one giving about that mask coverage (switching modes keeps the mask). The range
    comes from the maps averaged over the steps: single steps reach a little beyond its ends."""
    if not use_mask or mode == "auto":
        return {"label": THRESHOLD_OFF if not use_mask else THRESHOLD_LABELS["auto"], "interactive": False}
    lo, hi = (0.0, 1.0) if mode == "absolute" else (0.01, 1.0)
    m = None if kmaps is None or len(kmaps) == 0 else _threshold_map(kmaps, combine, mode)
    if m is not None and mode in ("absolute", "relative"):
        lo, hi = float(m.min()), float(m.max())
    elif m is not None:
        lo = 1.0 / m.size
    if coverage is not None and m is not None:
        value = coverage if mode == "area" else float(np.quantile(m, 1.0 - coverage))
    step = float(10.0 ** np.floor(np.log10(max(hi - lo, 1e-6) / 100)))  # 100 to 1000 steps over the range
    least = 0.0 if mode == "absolute" else step  # relative and area cuts are in (0, 1]
    value = min(max(round(float(value) / step) * step, least), 1.0)
    lo = max(min(np.floor(lo / step) * step, value), least)  # the range holds the value the mask was cut at
    hi = min(max(np.ceil(hi / step) * step, value), 1.0)
    out = {"label": THRESHOLD_LABELS[mode], "interactive": True, "minimum": round(float(lo), 6),
           "maximum": round(float(hi), 6), "step": step}
    if coverage is not None or m is None:  # a new value; else the value stays as the user left it (no race)
        out["value"] = round(value, 6)
    return out


ABLATION_TITLE = "How much each variant changes the base, inside vs outside the mask"


def ablation_plot(cells):
    """Bar chart: pixel change inside vs outside the mask per cell (+ score line when scored)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")  # room for everything outside the axes
    x = np.arange(len(cells))
    ax.bar(x - 0.2, [c.change_inside for c in cells], 0.4, label="change inside mask")
    ax.bar(x + 0.2, [c.change_outside for c in cells], 0.4, label="change outside mask")
    ax.set_xticks(x, [c.label for c in cells], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean |target - base| (0-255)")
    if all(c.score is not None for c in cells):
        ax2 = ax.twinx()
        ax2.plot(x, [c.score for c in cells], "k.-", label="score")
        ax2.set_ylabel("score")
    ax.set_title(ABLATION_TITLE + (" (dots: score)" if all(c.score is not None for c in cells) else ""), fontsize=10,
                 loc="left")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)  # under the labels: it clipped the title
    return fig


def progress_bar(fraction: float) -> str:
    """A fine-tune's progress as a read-only bar with its percentage (HTML: progress, not a control)."""
    f = min(max(float(fraction), 0.0), 1.0)
    return (f"<div id='train-progress-body'><progress value='{f:.3f}' max='1' style='width: 100%; height: 1em'>"
            f"</progress> <span>{f:.0%} done</span></div>")


def training_plot(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8), layout="constrained")
    steps = [r["step"] for r in rows]
    # offline DPO logs its implicit accuracy and reward margin; on-policy rounds their ratio's KL and clipping
    keys = ("loss", "approx_kl", "clipfrac") if any("approx_kl" in r for r in rows) else \
        ("loss", "implicit_acc", "reward_margin")
    for ax, key in zip(axes, keys):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, [np.nan if v is None else v for v in vals])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    return fig
