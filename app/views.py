"""Pictures for the screen: heatmaps over the reference, mask overlays, captions. Presentation only."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

DISPLAY = 256  # small models draw 64 px images; show them larger with crisp pixels


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
    rows = " | ".join(f"{k}: **{v:.3f}**" for k, v in scores.items())
    return f"CLIP score - {rows}"
