"""ShapesWorld: the vocabulary, the caption grammar and the train/test split of combinations.

The world mirrors the paper's three prompt families (docs/METHOD.md) on flat shapes:
  action     "a red circle containing a blue triangle" / "a red square stacked on a blue circle"
  attribute  "a red and striped circle"     (colour + texture, like the paper's colour + material)
  spatial    "the red circle above the blue square" (above, below, on the left of, on the right of)
A fourth family, "simple" ("a red circle"), is used only while training the generator.

Test prompts use combinations never seen in training: attribute triples are held out as a whole, and
for the two-object families whole unordered object pairs are held out (so "the A above the B" in test
has no "the B below the A" in training either).

World versions (`SceneStyle`): version 1 draws the objects on one flat light-grey background (the world of
the shipped v1 models). Version 2 adds variation that no caption mentions: a light, low-saturation
background running linearly between two colours, faint cloudy texture and an optional faint weave, a global
lighting tint over the whole scene, and wider object size and position jitter that keeps every relation
true. A random pair of v2 scenes differs in all of it; a pair that keeps it differs only where the
caption's objects are. Version 3 is version 2 with objects at 3/4 of the size (a two-object scene covers far less
of the canvas, so a fusion mask on a 16x16 token grid can leave most of the image to the base). The caption
grammar, the families and the train/test split are the same in every version.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

# name -> sRGB; chosen at least 100 apart in RGB so nearest-palette segmentation is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "black": (35, 35, 35),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEXTURES: tuple[str, ...] = ("solid", "striped", "hollow")
RELATIONS: tuple[str, ...] = ("above", "below", "on the left of", "on the right of")
ACTIONS: tuple[str, ...] = ("containing", "stacked on")
FAMILIES: tuple[str, ...] = ("action", "attribute", "spatial")
TRAIN_ONLY_FAMILIES: tuple[str, ...] = ("simple",)
IMAGE_SIZE = 64


@dataclass(frozen=True)
class SceneStyle:
    """What a rendered scene varies beyond its caption; every range is used only when version >= 2."""

    version: int = 1  # 1 = flat BACKGROUND, v1 layout (shipped v1 models); 2 = the variation below
    bg_value: tuple[float, float] = (0.80, 0.96)  # background: a linear gradient between two colours of
    bg_saturation: float = 0.22  # any hue, HSV value in bg_value and saturation up to bg_saturation
    clouds: float = 6.0  # max amplitude of a smooth random texture (5x5 control grid, bicubic)
    weave: float = 4.0  # max amplitude of a faint diagonal sine pattern (present in half the scenes)
    weave_period: tuple[float, float] = (5.0, 11.0)  # its period, pixels
    brightness: tuple[float, float] = (0.94, 1.04)  # lighting: all channels, objects included, scaled
    cast: float = 0.04  # lighting colour cast: each channel further scaled by 1 +- this
    size_jitter: float = 0.1  # every object's radius scaled by 1 +- this
    lateral: float = 0.35  # spatial: offset across the relation axis, up to this x the offset along it
    stack_offset: float = 0.3  # stacked on: horizontal offset, up to this x the narrower half-width
    contain_offset: float = 0.5  # containing: inner object moved up to this x its free room
    min_bg_distance: float = 100.0  # every background pixel stays this far (RGB) from every lit object colour
    object_scale: float = 1.0  # every object's radius (and a spatial pair's gap) scaled by this; v3: 0.75

    def __post_init__(self):
        if self.version not in WORLD_VERSIONS:
            raise ValueError(f"world version must be one of {WORLD_VERSIONS}, got {self.version}")
        if not 0.3 <= self.object_scale <= 1.5:
            raise ValueError(f"object_scale must be in [0.3, 1.5], got {self.object_scale}")


WORLD_VERSIONS: tuple[int, ...] = (1, 2, 3)
V1 = SceneStyle(version=1)
V2 = SceneStyle(version=2)
# Version 3: version 2's scenes with objects at 3/4 of the size, so that the union of two scenes' keyword objects
# (what a union-base fusion mask covers) stays well under half of a 16x16 token grid.
V3 = SceneStyle(version=3, object_scale=0.75)
_STYLES = {1: V1, 2: V2, 3: V3}


def scene_style(version: int | SceneStyle) -> SceneStyle:
    """The default style of a world version (a SceneStyle passes through)."""
    if isinstance(version, SceneStyle):
        return version
    if int(version) not in _STYLES:
        raise ValueError(f"world version must be one of {WORLD_VERSIONS}, got {version}")
    return _STYLES[int(version)]


@dataclass(frozen=True)
class ObjectSpec:
    """One object a caption asks for."""

    colour: str
    shape: str
    texture: str = "solid"

    def words(self) -> tuple[str, ...]:
        """The caption words naming this object (its mask keywords)."""
        if self.texture != "solid":
            return (self.colour, self.texture, self.shape)
        return (self.colour, self.shape)


@dataclass(frozen=True)
class PromptSpec:
    """A caption with its meaning: what the ground-truth checker verifies."""

    family: str  # action | attribute | spatial | simple
    objects: tuple[ObjectSpec, ...]  # first = the caption's subject
    relation: str | None = None  # a RELATIONS or ACTIONS entry for two-object families

    @property
    def text(self) -> str:
        a = self.objects[0]
        if self.family == "simple":
            return f"a {a.colour} {a.shape}"
        if self.family == "attribute":
            return f"a {a.colour} and {a.texture} {a.shape}"
        b = self.objects[1]
        if self.family == "spatial":
            return f"the {a.colour} {a.shape} {self.relation} the {b.colour} {b.shape}"
        if self.family == "action":
            return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape}"
        raise ValueError(f"unknown family {self.family!r}")

    def object_words(self) -> list[tuple[str, ...]]:
        """Per object, the words that name it, in caption order."""
        if self.family == "attribute":
            a = self.objects[0]
            return [(a.colour, a.texture, a.shape)]
        return [(o.colour, o.shape) for o in self.objects]


def _held_out(key: str, fraction: float) -> bool:
    """Deterministic split: a stable hash of the combination decides, independent of Python's seed."""
    h = int(hashlib.sha256(("shapesworld-v1:" + key).encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000


def _solid_objects() -> list[ObjectSpec]:
    return [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]


def _pair_key(a: ObjectSpec, b: ObjectSpec) -> str:
    return "|".join(sorted([f"{a.colour} {a.shape}", f"{b.colour} {b.shape}"]))


def all_prompts(family: str) -> list[PromptSpec]:
    """Every caption of a family, in a fixed order."""
    if family == "simple":
        return [PromptSpec("simple", (o,)) for o in _solid_objects()]
    if family == "attribute":
        return [PromptSpec("attribute", (ObjectSpec(c, s, t),))
                for c in COLOURS for t in TEXTURES for s in SHAPES]
    objs = _solid_objects()
    pairs = [(a, b) for a, b in itertools.permutations(objs, 2) if a.colour != b.colour]
    relations = RELATIONS if family == "spatial" else ACTIONS if family == "action" else None
    if relations is None:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + TRAIN_ONLY_FAMILIES}")
    return [PromptSpec(family, (a, b), r) for a, b in pairs for r in relations]


def split_of(spec: PromptSpec) -> str:
    """'train' or 'test' for a caption; test combinations never appear in training."""
    if spec.family == "simple":
        return "train"
    if spec.family == "attribute":
        a = spec.objects[0]
        return "test" if _held_out(f"attr:{a.colour}:{a.texture}:{a.shape}", 1 / 3) else "train"
    return "test" if _held_out("pair:" + _pair_key(*spec.objects), 0.25) else "train"


def prompts(family: str, split: str) -> list[PromptSpec]:
    """All captions of a family in one split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [p for p in all_prompts(family) if split_of(p) == split]


def prompt_list(family: str, split: str, n: int = 40, seed: int = 0) -> list[PromptSpec]:
    """A fixed sample of n captions (all of them if fewer), like the paper's 40-prompt lists."""
    pool = prompts(family, split)
    if len(pool) <= n:
        return pool
    return random.Random(f"{family}:{split}:{seed}").sample(pool, n)


def stratified_prompt_list(family: str, split: str, n: int, offset: int = 0, seed: int = 0) -> list[PromptSpec]:
    """n captions dealt in turn from each relation (action, spatial) or texture (attribute), each group in a fixed
    shuffled order: any n >= the number of groups spans them all. `offset` skips the first `offset` of that order,
    so lists taken at successive offsets (training, then validation prompts) never share a caption."""
    pool = prompts(family, split)
    key = (lambda p: p.objects[0].texture) if family == "attribute" else (lambda p: p.relation)
    groups: dict = {}
    for p in pool:
        groups.setdefault(key(p), []).append(p)
    order = [random.Random(f"{family}:{split}:{seed}:{g}").sample(v, len(v)) for g, v in sorted(groups.items())]
    dealt = [grp[i] for i in range(max(map(len, order), default=0)) for grp in order if i < len(grp)]
    return dealt[offset:offset + n]


def parse_prompt(text: str) -> PromptSpec | None:
    """The PromptSpec whose caption is exactly `text` (normalised), or None outside the grammar."""
    norm = " ".join(text.lower().strip().rstrip(".").split())
    return _caption_index().get(norm)


def vocabulary() -> frozenset[str]:
    """Every word a ShapesWorld caption uses."""
    words = {"a", "the", "and", *COLOURS, *SHAPES, *TEXTURES}
    for phrase in RELATIONS + ACTIONS:
        words.update(phrase.split())
    return frozenset(words)


def explain_prompt(text: str) -> list[str]:
    """Why a ShapesWorld model cannot draw `text`: its words outside the vocabulary, else that it is not one of
    the grammar's captions; [] for a caption of the grammar (what parse_prompt reads)."""
    if parse_prompt(text) is not None:
        return []
    words = re.findall(r"[^\W_]+(?:['-][^\W_]+)*", text.lower())
    symbols = re.findall(r"[^\w\s.,;:!?'\"()-]+", text)  # emoji and other symbols are not words it knows either
    unknown = list(dict.fromkeys([w for w in words if w not in vocabulary()] + symbols))
    forms = ("'a red circle', 'a red and striped circle', 'the red circle above the blue square', "
             "'a red circle containing a blue square' (two objects differ in colour)")
    if unknown:
        shown = ", ".join(f"'{w}'" for w in unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        return [f"outside ShapesWorld's vocabulary: {shown}. The model knows the colours {', '.join(COLOURS)}; "
                f"the shapes {', '.join(SHAPES)}; the textures {', '.join(TEXTURES)}; the relations "
                f"{', '.join(RELATIONS + ACTIONS)}. It draws captions like {forms}; the checker cannot judge "
                "other prompts and the scores say little about them"]
    return [f"not a ShapesWorld caption (every word is known, the sentence is not one the model was trained on): "
            f"it draws captions like {forms}; the checker cannot judge other prompts and the scores say little"]


_INDEX: dict[str, PromptSpec] | None = None


def _caption_index() -> dict[str, PromptSpec]:
    global _INDEX
    if _INDEX is None:
        _INDEX = {p.text: p for fam in FAMILIES + TRAIN_ONLY_FAMILIES for p in all_prompts(fam)}
    return _INDEX


FLIP = {"above": "below", "below": "above", "on the left of": "on the right of", "on the right of": "on the left of",
        "containing": "stacked on", "stacked on": "containing"}


def perturbations(spec: PromptSpec, rng: random.Random) -> dict[str, PromptSpec]:
    """Captions that are wrong for an image of `spec`, one per kind: attribute swapped, relation flipped,
    object replaced (the checker must reject them; the CLIP scorer should rank the truth above them)."""
    from dataclasses import replace as _r

    objs = list(spec.objects)
    out: dict[str, PromptSpec] = {}
    k = rng.randrange(len(objs))
    o = objs[k]
    # object replaced: another shape for one object
    new = objs.copy()
    new[k] = _r(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
    out["object_replaced"] = _r(spec, objects=tuple(new))
    # attribute swapped: colours exchanged between the two objects, else another colour / texture
    if len(objs) == 2 and objs[0].shape != objs[1].shape:
        a, b = objs
        out["attribute_swapped"] = _r(spec, objects=(_r(a, colour=b.colour), _r(b, colour=a.colour)))
    else:
        new = objs.copy()
        if spec.family == "attribute" and rng.random() < 0.5:
            new[k] = _r(o, texture=rng.choice([t for t in TEXTURES if t != o.texture]))
        else:
            taken = {x.colour for x in objs}
            new[k] = _r(o, colour=rng.choice([c for c in COLOURS if c not in taken]))
        out["attribute_swapped"] = _r(spec, objects=tuple(new))
    if spec.relation is not None:
        out["relation_flipped"] = _r(spec, relation=FLIP[spec.relation])
    return out
