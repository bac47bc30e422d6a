"""Ground-truth checker: parse a ShapesWorld image and decide whether it satisfies its caption.

Parsing: nearest-palette colour per pixel -> per colour, components after a small vertical closing (so a
striped object's bands form one object) -> fragments below MIN_AREA dropped -> per object the filled
silhouette (holes filled), its shape (bounding-box fill and top/bottom width ratio), its texture (colour
fraction of the silhouette's interior, ignoring pixels of objects drawn over it) and its centroid.
Verdicts per family, with sub-scores: objects found, colours, shapes, textures, relation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .world import BACKGROUND, COLOURS, PromptSpec, parse_prompt

PALETTE_NAMES = ["background"] + list(COLOURS)
PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)
MAX_COLOUR_DIST = 90.0  # pixels farther than this from every palette colour count as background
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


def segment(image: np.ndarray) -> np.ndarray:
    """Palette index per pixel (0 = background or unknown)."""
    x = np.asarray(image, dtype=np.float32)[..., :3]
    d = np.linalg.norm(x[:, :, None, :] - PALETTE[None, None], axis=-1)
    idx = d.argmin(-1)
    idx[d.min(-1) > MAX_COLOUR_DIST] = 0
    return idx


def _shape_of(sil: np.ndarray) -> str:
    ys, xs = np.nonzero(sil)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = sil.sum() / float(h * w)
    rows = sil[y0:y1 + 1, x0:x1 + 1].sum(1)
    top = rows[: max(1, h // 4)].mean()
    bottom = rows[-max(1, h // 4):].mean()
    taper = top / max(bottom, 1e-6)
    if fill > 0.88 and taper > 0.75:
        return "square"
    if taper < 0.6 and fill < 0.7:
        return "triangle"
    return "circle"


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
        closed = ndimage.binary_closing(m, structure=np.ones((7, 1), bool)) | m  # join a striped object's bands
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
