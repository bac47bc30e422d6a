"""Render a ShapesWorld caption into a 64x64 image whose layout satisfies it.

Objects are drawn with hard edges so the ground-truth checker can parse them exactly; stripes run on a
fixed 8-pixel grid of the canvas (4 on, 4 off), which an f4 autoencoder keeps. World version 1 draws them
on one flat background. Version 2 (world.SceneStyle) draws them on a `Backdrop` - a background running
between two light, low-saturation colours with faint texture, and a lighting tint over everything - and
jitters sizes and offsets more, within what keeps the caption's relation true. The backdrop is drawn from
the scene's own random stream after its layout, so a seed reproduces the whole scene, and a Backdrop can
be passed back in to draw other captions on the same background and light.
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, COLOURS, IMAGE_SIZE, V1, ObjectSpec, PromptSpec, SceneStyle

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


@dataclass(frozen=True)
class Backdrop:
    """The prompt-irrelevant part of a v2 scene: background and lighting, reusable across captions."""

    colours: tuple[tuple[float, float, float], tuple[float, float, float]]  # RGB 0-255; the background runs between them
    angle: float  # direction of that run, radians (0 = left to right)
    clouds: float  # amplitude of the smooth texture, grey levels
    weave: float  # amplitude of the diagonal sine pattern (0 = none)
    weave_period: float  # pixels
    weave_angle: float  # radians
    gain: tuple[float, float, float]  # lighting: per-channel factor over the whole scene, objects included
    seed: int  # of the texture's control grid

    def field(self) -> np.ndarray:
        """The unlit background, HxWx3 float32 grey levels."""
        ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1) * 2 - 1
        ramp = (xs * math.cos(self.angle) + ys * math.sin(self.angle)) / math.sqrt(2) * 0.5 + 0.5
        a, b = (np.array(c, np.float32) for c in self.colours)
        bg = a + ramp[..., None] * (b - a)
        grid = np.random.default_rng(self.seed).uniform(-1, 1, (5, 5)).astype(np.float32)
        clouds = np.asarray(Image.fromarray(grid, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        px = np.arange(IMAGE_SIZE, dtype=np.float32)
        u = px[None, :] * math.cos(self.weave_angle) + px[:, None] * math.sin(self.weave_angle)
        weave = self.weave * np.sin(2 * math.pi * u / self.weave_period)
        return bg + (self.clouds * np.clip(clouds, -1, 1) + weave)[..., None]

    def light(self, image: np.ndarray) -> np.ndarray:
        """Lit uint8 image of an unlit float one."""
        return np.clip(np.rint(image * np.array(self.gain, np.float32)), 0, 255).astype(np.uint8)

    def image(self) -> np.ndarray:
        """The lit background alone, HxWx3 uint8."""
        return self.light(self.field())


def _bg_colour(style: SceneStyle, rng: random.Random) -> tuple[float, float, float]:
    h, s, v = rng.random(), rng.uniform(0, style.bg_saturation), rng.uniform(*style.bg_value)
    return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h, s, v))


def _far_from_objects(backdrop: Backdrop, min_dist: float) -> bool:
    """Every lit background pixel at least min_dist (RGB) from every lit object colour."""
    bg = backdrop.image().reshape(-1, 1, 3).astype(np.float32)
    objs = np.array(list(COLOURS.values()), np.float32) * np.array(backdrop.gain, np.float32)
    return bool(np.linalg.norm(bg - objs[None], axis=-1).min() >= min_dist)


def draw_backdrop(style: SceneStyle, rng: random.Random) -> Backdrop:
    """A random background and lighting of a v2 style; redrawn until it keeps clear of the object colours."""
    for _ in range(100):
        brightness = rng.uniform(*style.brightness)
        weave = rng.uniform(1.0, style.weave) if rng.random() < 0.5 else 0.0
        bd = Backdrop(
            colours=(_bg_colour(style, rng), _bg_colour(style, rng)), angle=rng.uniform(0, 2 * math.pi),
            clouds=rng.uniform(0, style.clouds), weave=weave, weave_period=rng.uniform(*style.weave_period),
            weave_angle=rng.uniform(0, math.pi),
            gain=tuple(brightness * (1 + rng.uniform(-style.cast, style.cast)) for _ in range(3)),
            seed=rng.getrandbits(32))
        if _far_from_objects(bd, style.min_bg_distance):
            return bd
    raise RuntimeError("no backdrop keeps clear of the object colours; loosen the SceneStyle")


@dataclass
class Scene:
    prompt: PromptSpec
    image: np.ndarray  # HxWx3 uint8
    objects: list[PlacedObject]
    style: SceneStyle = V1  # the world version and ranges it was drawn with
    backdrop: Backdrop | None = None  # v2: background and lighting (None = v1's flat BACKGROUND, unlit)


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


Placement = list[tuple[ObjectSpec, float, float, float]]  # (object, cx, cy, radius), in drawing order


def _size(r: float, rng: random.Random, style: SceneStyle) -> float:
    """v2+: a radius scaled by the style's object_scale and jittered by 1 +- size_jitter (v1: unchanged, no draw)."""
    if style.version < 2:
        return r
    return r * style.object_scale * (1 + rng.uniform(-style.size_jitter, style.size_jitter))


def _single(prompt: PromptSpec, rng: random.Random, style: SceneStyle) -> Placement:
    o = prompt.objects[0]
    r = rng.uniform(12, 18) if prompt.family == "attribute" else rng.uniform(9, 15)
    cx, cy = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
    return [(o, cx, cy, _size(r, rng, style))]


def _spatial(prompt: PromptSpec, rng: random.Random, style: SceneStyle) -> Placement:
    """b at a random point, a beside it along the relation's axis with a gap; v2 also moves a across the
    axis by up to `lateral` x the distance along it, so the centroid test (|along| > |across|) still holds."""
    a, b = prompt.objects
    ra, rb = rng.uniform(9, 13), rng.uniform(9, 13)
    ra, rb = _size(ra, rng, style), _size(rb, rng, style)
    ua, da, la, ria = extents(a.shape, ra)
    ub, db, lb, rib = extents(b.shape, rb)
    gap = rng.uniform(4, 12) * (style.object_scale if style.version >= 2 else 1.0)
    jitter = rng.uniform(-4, 4)
    along = {"above": -(da + ub + gap), "below": db + ua + gap,
             "on the left of": -(ria + lb + gap), "on the right of": rib + la + gap}[prompt.relation]
    if style.version >= 2:
        jitter = rng.uniform(-style.lateral, style.lateral) * abs(along)
    dx, dy = (jitter, along) if prompt.relation in ("above", "below") else (along, jitter)
    bx, by = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
    return [(a, bx + dx, by + dy, ra), (b, bx, by, rb)]


INRADIUS = {"circle": 1.0, "square": 0.85, "triangle": 0.6}  # largest centred circle, in units of r
CIRCUMRADIUS = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.2}  # smallest enclosing one


def _containing(prompt: PromptSpec, rng: random.Random, style: SceneStyle) -> Placement:
    """b inside a; v2 moves b off a's centre by up to `contain_offset` x the room b has there."""
    a, b = prompt.objects
    ra = rng.uniform(21, 26)
    rb = rng.uniform(6, 8) if a.shape == "triangle" else rng.uniform(7, 10)
    cx, cy = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
    ox, oy = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)
    if style.version >= 2:
        ra, rb = _size(ra, rng, style), _size(rb, rng, style)
        room = max(0.0, INRADIUS[a.shape] * ra - CIRCUMRADIUS[b.shape] * rb)
        dist, ang = style.contain_offset * room * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        ox, oy = dist * math.cos(ang), dist * math.sin(ang)
    return [(a, cx, cy, ra), (b, cx + ox, cy + oy, rb)]


def _stacked(prompt: PromptSpec, rng: random.Random, style: SceneStyle) -> Placement:
    """a rests on top of b, touching; v2 shifts a sideways by up to `stack_offset` x the narrower
    half-width (every shape pair then still touches within a pixel: flat bottoms and tops, or a round or
    pointed contact that moves less than a pixel for such an offset)."""
    a, b = prompt.objects
    ra, rb = rng.uniform(9, 12), rng.uniform(10, 13)
    ra, rb = _size(ra, rng, style), _size(rb, rng, style)
    da = extents(a.shape, ra)[1]
    ub = extents(b.shape, rb)[0]
    bx, by = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
    off = rng.uniform(-2, 2)
    if style.version >= 2:
        half = min(extents(a.shape, ra)[3], extents(b.shape, rb)[3])
        off = rng.uniform(-style.stack_offset, style.stack_offset) * half
    return [(a, bx + off, by - (ub + da), ra), (b, bx, by, rb)]


def _layout(prompt: PromptSpec, rng: random.Random, style: SceneStyle = V1) -> Placement:
    """Sample centres and radii that satisfy the caption; retried until everything fits the canvas."""
    fam = prompt.family
    if fam in ("simple", "attribute"):
        propose = _single
    elif fam == "spatial":
        propose = _spatial
    elif fam == "action" and prompt.relation in ("containing", "stacked on"):
        propose = _containing if prompt.relation == "containing" else _stacked
    else:
        raise ValueError(f"cannot lay out {prompt}")
    for _ in range(1000):
        placed = propose(prompt, rng, style)
        if all(_fits(o.shape, x, y, r) for o, x, y, r in placed):
            return placed
    raise RuntimeError(f"no layout found for {prompt.text!r}")


def render(prompt: PromptSpec, rng: random.Random, style: SceneStyle = V1, backdrop: Backdrop | None = None) -> Scene:
    """Draw one random scene satisfying `prompt` (the subject drawn first, the second object on top).

    Version 1 (default): the shipped world, byte for byte. Version 2: on `backdrop`, or on one drawn from
    `rng` after the layout."""
    layout = _layout(prompt, rng, style)
    if style.version >= 2 and backdrop is None:
        backdrop = draw_backdrop(style, random.Random(rng.getrandbits(64)))
    if backdrop is None:
        canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        canvas[:] = BACKGROUND
    else:
        canvas = backdrop.field()
    objects = []
    for spec, cx, cy, r in layout:
        mask = object_mask(spec, cx, cy, r)
        canvas[mask] = COLOURS[spec.colour]
        objects.append(PlacedObject(spec, cx, cy, r, mask))
    # a later object hides what it covers of an earlier one
    for i, o in enumerate(objects):
        for later in objects[i + 1:]:
            o.mask = o.mask & ~_fill_mask(later.spec.shape, later.cx, later.cy, later.radius)
    image = canvas.astype(np.uint8) if backdrop is None else backdrop.light(canvas)
    return Scene(prompt, image, objects, style, backdrop)
