"""Render a ShapesWorld caption into a 64x64 image whose layout satisfies it.

Objects are drawn with hard edges on a flat background so the ground-truth checker can parse them
exactly; stripes run on a fixed 8-pixel grid of the canvas (4 on, 4 off), which an f4 autoencoder keeps.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, COLOURS, IMAGE_SIZE, ObjectSpec, PromptSpec

HOLLOW_WIDTH = 3  # outline thickness of hollow objects, pixels
STRIPE_PERIOD = 8  # stripes: rows with (y mod 8) < 4 carry the colour
MARGIN = 2  # objects keep this far from the border


@dataclass
class PlacedObject:
    """An object as drawn: its spec, centre, size and pixel mask."""

    spec: ObjectSpec
    cx: float
    cy: float
    radius: float
    mask: np.ndarray = field(repr=False)  # HxW bool, the pixels this object covers (outline included)


@dataclass
class Scene:
    prompt: PromptSpec
    image: np.ndarray  # HxWx3 uint8
    objects: list[PlacedObject]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape of nominal radius r (comparable areas across shapes)."""
    if shape == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.2 * r  # circumradius; the centre is the centroid
        return [(cx + R * math.cos(a), cy + R * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    raise ValueError(f"unknown shape {shape!r}")


def extents(shape: str, r: float) -> tuple[float, float, float, float]:
    """(up, down, left, right) distances from the centre to the shape's bounding box."""
    pts = np.array(shape_polygon(shape, 0.0, 0.0, r))
    return -pts[:, 1].min(), pts[:, 1].max(), -pts[:, 0].min(), pts[:, 0].max()


def _fill_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    img = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
    ImageDraw.Draw(img).polygon(shape_polygon(shape, cx, cy, r), fill=1)
    return np.array(img, dtype=bool)


def object_mask(spec: ObjectSpec, cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels carrying the object's colour."""
    full = _fill_mask(spec.shape, cx, cy, r)
    if spec.texture == "hollow":
        inner = _fill_mask(spec.shape, cx, cy, r - HOLLOW_WIDTH * (1.7 if spec.shape == "triangle" else 1.0))
        return full & ~inner
    if spec.texture == "striped":
        rows = (np.arange(IMAGE_SIZE) % STRIPE_PERIOD) < STRIPE_PERIOD // 2
        return full & rows[:, None]
    return full


def _fits(shape: str, cx: float, cy: float, r: float) -> bool:
    up, down, left, right = extents(shape, r)
    lo, hi = MARGIN, IMAGE_SIZE - 1 - MARGIN
    return cy - up >= lo and cy + down <= hi and cx - left >= lo and cx + right <= hi


def _layout(prompt: PromptSpec, rng: random.Random) -> list[tuple[ObjectSpec, float, float, float]]:
    """Sample centres and radii that satisfy the caption; retried until everything fits the canvas."""
    fam = prompt.family
    for _ in range(1000):
        if fam in ("simple", "attribute"):
            o = prompt.objects[0]
            r = rng.uniform(12, 18) if fam == "attribute" else rng.uniform(9, 15)
            cx, cy = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
            placed = [(o, cx, cy, r)]
        elif fam == "spatial":
            a, b = prompt.objects
            ra, rb = rng.uniform(9, 13), rng.uniform(9, 13)
            ua, da, la, ria = extents(a.shape, ra)
            ub, db, lb, rib = extents(b.shape, rb)
            gap = rng.uniform(4, 12)
            jitter = rng.uniform(-4, 4)
            if prompt.relation == "above":
                dx, dy = jitter, -(da + ub + gap)
            elif prompt.relation == "below":
                dx, dy = jitter, db + ua + gap
            elif prompt.relation == "on the left of":
                dx, dy = -(ria + lb + gap), jitter
            else:
                dx, dy = rib + la + gap, jitter
            bx, by = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
            placed = [(a, bx + dx, by + dy, ra), (b, bx, by, rb)]
        elif fam == "action" and prompt.relation == "containing":
            a, b = prompt.objects
            ra = rng.uniform(21, 26)
            rb = rng.uniform(6, 8) if a.shape == "triangle" else rng.uniform(7, 10)
            cx, cy = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
            placed = [(a, cx, cy, ra), (b, cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5), rb)]
        elif fam == "action" and prompt.relation == "stacked on":
            a, b = prompt.objects  # a rests on top of b, touching
            ra, rb = rng.uniform(9, 12), rng.uniform(10, 13)
            da = extents(a.shape, ra)[1]
            ub = extents(b.shape, rb)[0]
            bx, by = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
            placed = [(a, bx + rng.uniform(-2, 2), by - (ub + da), ra), (b, bx, by, rb)]
        else:
            raise ValueError(f"cannot lay out {prompt}")
        if all(_fits(o.shape, x, y, r) for o, x, y, r in placed):
            return placed
    raise RuntimeError(f"no layout found for {prompt.text!r}")


def render(prompt: PromptSpec, rng: random.Random) -> Scene:
    """Draw one random scene satisfying `prompt` (the subject drawn first, the second object on top)."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    objects = []
    for spec, cx, cy, r in _layout(prompt, rng):
        mask = object_mask(spec, cx, cy, r)
        image[mask] = COLOURS[spec.colour]
        objects.append(PlacedObject(spec, cx, cy, r, mask))
    # a later object hides what it covers of an earlier one
    for i, o in enumerate(objects):
        for later in objects[i + 1:]:
            o.mask = o.mask & ~_fill_mask(later.spec.shape, later.cx, later.cy, later.radius)
    return Scene(prompt, image, objects)
