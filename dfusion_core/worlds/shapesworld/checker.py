"""Ground-truth checker: parse a ShapesWorld image and decide whether it satisfies its caption.

It needs no world version: the background is estimated per image, so flat v1 scenes and v2 scenes
(gradients, faint texture, lighting tint) parse the same way.

Parsing: background per image (a smooth quadratic surface fitted robustly to the light pixels far from
every object colour) -> per pixel the nearest of that background and the six object colours, except that a
pixel lying on the blend of two other colours found next to it (a blurred edge) goes to the nearer end of
that blend, so blurred edges never form a third colour -> per colour, components after a small closing (so
a striped object's bands and a hollow outline's gaps join) -> fragments below MIN_AREA dropped -> per
object the filled silhouette (holes filled), its shape (the row-width profile - constant for a square,
linear for an upright triangle, a chord for a circle - that fits its rows best), its texture (colour
fraction of the silhouette's interior, ignoring pixels of objects drawn over it) and its centroid.
Verdicts per family, with sub-scores: objects found, colours, shapes, textures, relation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .world import BACKGROUND, COLOURS, SHAPES, PromptSpec, parse_prompt

PALETTE_NAMES = ["background"] + list(COLOURS)
OBJECT_COLOURS = np.array(list(COLOURS.values()), dtype=np.float32)
PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)  # v1's flat background first
MAX_COLOUR_DIST = 90.0  # pixels farther than this from every object colour count as background
BG_CANDIDATE_DIST = 70.0  # background fit starts from pixels this far from every object colour...
BG_MIN_LEVEL = 100.0  # ...and brighter than this (grey level, channel mean): background is light
BG_INLIER = 24.0  # refits keep pixels within this (RGB) of the current surface
BLEND_MARGIN = 0.5  # a blend of two other colours wins if its residual < this x the distance to the nearest
BLEND_REACH = 2  # ...and both of them label pixels within this many pixels
MIN_AREA = 16  # components smaller than this are fragments, not objects
TOUCH_GAP = 3  # pixels: objects closer than this touch ("stacked on")


@dataclass
class FoundObject:
    colour: str
    shape: str
    texture: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (inclusive)
    area: int  # pixels of its colour
    silhouette: np.ndarray = field(repr=False)  # filled region, HxW bool
    pixels: np.ndarray = field(repr=False)  # its colour pixels, HxW bool


@dataclass
class Verdict:
    correct: bool
    objects_found: bool  # exactly the requested objects (by colour), no extras
    colours_right: float  # fraction of requested colours present
    shapes_right: float  # fraction of requested objects found with the right shape
    textures_right: float  # attribute family: texture right (1.0 elsewhere when found)
    relation_right: bool | None  # two-object families
    n_found: int
    objects: list[FoundObject] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "objects"}


def _design(h: int, w: int) -> np.ndarray:
    """Quadratic surface basis over normalised pixel coordinates, (h*w) x 6."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys, xs = (ys / max(1, h - 1) * 2 - 1).ravel(), (xs / max(1, w - 1) * 2 - 1).ravel()
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], 1)


def estimate_background(image: np.ndarray) -> np.ndarray:
    """The background colour at every pixel, HxWx3 float32: a quadratic surface per channel, fitted to the
    light pixels far from every object colour, then refitted twice to the pixels close to it. Falls back
    to v1's flat BACKGROUND when too little of the image looks like background."""
    x = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = x.shape
    flat = x.reshape(-1, 3)
    A = _design(h, w)
    d_obj = np.linalg.norm(flat[:, None] - OBJECT_COLOURS[None], axis=-1).min(1)
    keep = (d_obj > BG_CANDIDATE_DIST) & (flat.mean(1) > BG_MIN_LEVEL)
    if keep.sum() < 0.1 * len(flat):
        return np.broadcast_to(np.array(BACKGROUND, np.float32), x.shape).copy()
    for _ in range(3):
        coef = np.linalg.lstsq(A[keep], flat[keep], rcond=None)[0]
        fit = A @ coef
        inl = np.linalg.norm(flat - fit, axis=1) < BG_INLIER
        if inl.sum() < 0.1 * len(flat):
            break
        keep = inl
    return fit.reshape(h, w, 3)


def _blend_labels(x: np.ndarray, colours: np.ndarray, near: np.ndarray, label: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For pixels x (N x 3) with per-pixel colours (N x K x 3), the colours present nearby (N x K bool)
    and their current labels (N): the residual of the best blend of two nearby colours other than the
    label, and the nearer end of that blend (N each; residual inf where no such pair is nearby)."""
    n, k, _ = colours.shape
    best = np.full(n, np.inf, np.float32)
    end = label.copy()
    for i in range(k):
        for j in range(i + 1, k):
            ok = near[:, i] & near[:, j] & (label != i) & (label != j)
            if not ok.any():
                continue
            seg = colours[ok, j] - colours[ok, i]
            rel = x[ok] - colours[ok, i]
            t = np.clip((rel * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-6), 0, 1)
            res = np.full(n, np.inf, np.float32)
            res[ok] = np.linalg.norm(rel - t[:, None] * seg, axis=1)
            better = res < best
            best[better] = res[better]
            end[better] = np.where(t > 0.5, j, i)[better[ok]]
    return best, end


def segment(image: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Palette index per pixel (0 = background or unknown, 1.. = COLOURS in order)."""
    x = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = x.shape
    bg = estimate_background(x) if background is None else np.asarray(background, np.float32)
    flat = x.reshape(-1, 3)
    colours = np.concatenate([bg.reshape(-1, 1, 3), np.broadcast_to(OBJECT_COLOURS, (len(flat), 6, 3))], 1)
    d = np.linalg.norm(flat[:, None] - colours, axis=-1)
    idx = d.argmin(1)
    idx[d[:, 1:].min(1) > MAX_COLOUR_DIST] = 0
    # a pixel labelled an object colour that lies on the blend of two other colours found within
    # BLEND_REACH pixels is a blurred edge between them: it goes to the nearer end of the blend
    cand = np.nonzero(idx > 0)[0]
    if len(cand):
        lab = idx.reshape(h, w)
        near = np.stack([ndimage.maximum_filter(lab == c, size=2 * BLEND_REACH + 1) for c in range(7)], -1)
        res, end = _blend_labels(flat[cand], colours[cand], near.reshape(-1, 7)[cand], idx[cand])
        blend = res < BLEND_MARGIN * d[cand, idx[cand]]
        idx[cand[blend]] = end[blend]
    return idx.reshape(h, w)


TRIANGLE_SLOPE = 2 * math.tan(math.pi / 6)  # an upright equilateral triangle widens this much per row
PROFILE_KEEP = 0.8  # shape fits score the best-fitting 80% of rows (blurred contact rows, a faint band)


def _profile_fit(shape: str, rows: np.ndarray, w: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Predicted width at `rows` of the shape's profile fitted to rows[fit_rows]: a square keeps one width,
    an upright triangle widens by TRIANGLE_SLOPE per row, a circle's width is a chord 2 sqrt(r^2 - (y-cy)^2)."""
    y, v = rows[fit_rows], w[fit_rows]
    if shape == "square":
        return np.full_like(rows, np.median(v))
    if shape == "triangle":
        return np.clip(TRIANGLE_SLOPE * (rows - np.median(y - v / TRIANGLE_SLOPE)), 0, None)
    slope, icpt = np.polyfit(y, (v / 2) ** 2 + y ** 2, 1)  # (w/2)^2 + y^2 = r^2 - cy^2 + 2 cy y
    cy = slope / 2
    return 2 * np.sqrt(np.clip(icpt + cy * cy - (rows - cy) ** 2, 0, None))


def _shape_of(sil: np.ndarray) -> str:
    """The shape whose row-width profile fits the silhouette's best: each profile is fitted, refitted to
    its best PROFILE_KEEP of rows and scored by their mean squared error. Only the rows the silhouette has
    count, so a striped object whose top or bottom band falls between stripes keeps its shape."""
    rows = np.nonzero(sil.any(1))[0]
    if len(rows) < 4:
        return "circle"
    cols = np.arange(sil.shape[1])
    occupied = sil[rows]
    w = (np.where(occupied, cols, -1).max(1) - np.where(occupied, cols, sil.shape[1]).min(1) + 1).astype(float)
    rows = rows.astype(float)
    n_keep = max(3, int(round(PROFILE_KEEP * len(rows))))
    scores = {}
    for shape in SHAPES:
        err = (_profile_fit(shape, rows, w, np.ones(len(rows), bool)) - w) ** 2
        keep = np.zeros(len(rows), bool)
        keep[np.argsort(err)[:n_keep]] = True
        err = (_profile_fit(shape, rows, w, keep) - w) ** 2
        scores[shape] = float(np.sort(err)[:n_keep].mean())
    return min(SHAPES, key=scores.get)


def _texture_of(pixels: np.ndarray, sil: np.ndarray, others: np.ndarray) -> str:
    interior = ndimage.binary_erosion(sil, iterations=3) & ~others
    if interior.sum() < 6:
        interior = sil & ~others
    frac = (pixels & interior).sum() / max(1, interior.sum())
    if frac > 0.8:
        return "solid"
    if frac < 0.2:
        return "hollow"
    return "striped"


def parse_image(image: np.ndarray) -> list[FoundObject]:
    seg = segment(image)
    comps = []
    for ci, name in enumerate(PALETTE_NAMES[1:], start=1):
        m = seg == ci
        if m.sum() < MIN_AREA:
            continue
        closed = (ndimage.binary_closing(m, structure=np.ones((7, 1), bool))  # join a striped object's bands
                  | ndimage.binary_closing(m, structure=np.ones((3, 3), bool)) | m)  # and a thin outline's gaps
        lab, n = ndimage.label(closed, structure=np.ones((3, 3), bool))
        for k in range(1, n + 1):
            region = lab == k
            pix = m & region
            if pix.sum() < MIN_AREA:
                continue
            comps.append((name, pix, ndimage.binary_fill_holes(region)))
    found = []
    all_pixels = np.zeros(seg.shape, bool)
    for _, pix, _ in comps:
        all_pixels |= pix
    for name, pix, sil in comps:
        others = all_pixels & ~pix
        ys, xs = np.nonzero(sil)
        found.append(FoundObject(
            colour=name, shape=_shape_of(sil), texture=_texture_of(pix, sil, others),
            cx=float(xs.mean()), cy=float(ys.mean()), bbox=(int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())),
            area=int(pix.sum()), silhouette=sil, pixels=pix))
    return found


def _relation(a: FoundObject, b: FoundObject, relation: str) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    if relation == "on the left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "on the right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "containing":  # b lies inside a's silhouette
        inside = (b.pixels & a.silhouette).sum() / max(1, b.area)
        return inside > 0.9 and a.silhouette.sum() > 2 * b.silhouette.sum()
    if relation == "stacked on":  # a rests on b: above it, touching, overlapping horizontally
        near = ndimage.binary_dilation(b.silhouette, iterations=TOUCH_GAP)
        touching = (a.silhouette & near).any()
        overlap_x = min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1]) > 0
        not_inside = (a.pixels & b.silhouette).sum() < 0.2 * a.area and (b.pixels & a.silhouette).sum() < 0.2 * b.area
        return dy < 0 and touching and overlap_x and not_inside
    raise ValueError(f"unknown relation {relation!r}")


def check(image, prompt: PromptSpec | str) -> Verdict:
    """Does `image` (HxWx3 uint8 array or PIL image) satisfy `prompt`?"""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if spec is None:
        raise ValueError(f"{prompt!r} is not a ShapesWorld caption")
    found = parse_image(np.asarray(image))
    want = list(spec.objects)
    by_colour: dict[str, list[FoundObject]] = {}
    for o in found:
        by_colour.setdefault(o.colour, []).append(o)
    colours_present = [bool(by_colour.get(w.colour)) for w in want]
    objects_found = len(found) == len(want) and all(len(by_colour.get(w.colour, [])) == 1 for w in want)
    match = [by_colour[w.colour][0] if len(by_colour.get(w.colour, [])) == 1 else None for w in want]
    shapes = [m is not None and m.shape == w.shape for m, w in zip(match, want)]
    textures = [m is not None and m.texture == w.texture for m, w in zip(match, want)]
    relation = None
    if spec.relation is not None:
        relation = bool(objects_found and _relation(match[0], match[1], spec.relation))
    texture_ok = all(textures) if spec.family == "attribute" else True
    correct = objects_found and all(shapes) and texture_ok and (relation is None or relation)
    return Verdict(correct=bool(correct), objects_found=bool(objects_found),
                   colours_right=float(np.mean(colours_present)), shapes_right=float(np.mean(shapes)),
                   textures_right=float(np.mean(textures)), relation_right=relation, n_found=len(found), objects=found)
