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


def candidate_caption(c) -> str:
    out = f"seed {c.seed}"
    if c.score is not None:
        out += f" · {c.score:.3f}"
    if c.correct is not None:
        out += " · ✓" if c.correct else " · ✗"
    return out


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


def mask_overlay(image: Image.Image, mask: np.ndarray, colour=(0, 200, 255)) -> Image.Image:
    """Tint the masked region of the image (mask in [0, 1])."""
    m = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    tint = Image.new("RGB", image.size, colour)
    a = (np.asarray(m, dtype=np.float32) / 255 * 0.6)[..., None]
    out = np.asarray(image.convert("RGB"), dtype=np.float32) * (1 - a) + np.asarray(tint, dtype=np.float32) * a
    return Image.fromarray(out.astype(np.uint8))


def score_text(scores: dict) -> str:
    if not scores:
        return "_no scorer loaded_"
    clip = [f"{k}: **{v:.3f}**" for k, v in scores.items() if not k.endswith("checker")]
    checker = [f"{k.replace(' checker', '')}: {'✓' if v else '✗'}" for k, v in scores.items() if k.endswith("checker")]
    out = ("CLIP score - " + " | ".join(clip)) if clip else ""
    if checker:
        out += ("  \n" if out else "") + "ground-truth checker - " + " | ".join(checker)
    return out


def ablation_plot(cells):
    """Bar chart: pixel change inside vs outside the mask per cell (+ score line when scored)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(cells))
    ax.bar(x - 0.2, [c.change_inside for c in cells], 0.4, label="change inside mask")
    ax.bar(x + 0.2, [c.change_outside for c in cells], 0.4, label="change outside mask")
    ax.set_xticks(x, [c.label for c in cells], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean |target - base| (0-255)")
    if all(c.score is not None for c in cells):
        ax2 = ax.twinx()
        ax2.plot(x, [c.score for c in cells], "k.-", label="score")
        ax2.set_ylabel("score")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def training_plot(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("loss", "implicit_acc", "reward_margin")):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, [np.nan if v is None else v for v in vals])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return fig
