"""Named prompt sets: the paper's three families and ShapesWorld's, as prompts with keyword WORDS.

Spec strings (CLI --prompt-set, app examples):
  paper:action:train    paper:attribute:test    paper:spatial:train     (the release's 40-prompt lists)
  WORLD:FAMILY:SPLIT                                                      (a registered world's lists,
                                                                           e.g. shapesworld:spatial:test)
  path/to/file.txt | .json                                                (one prompt a line / a JSON list)
Worlds are plug-ins: a world registers its source with `register_prompt_source` when its package is imported
(the CLI and the app import the worlds they ship), so this module never imports a world.
The release's *_item.json gives keyword positions as whitespace word indices; they are turned into the
words themselves here, and dfusion_core.engine.tokens maps words to ALL their BPE tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..engine.loading import ASSETS

PAPER_DIR = ASSETS / "prompts" / "paper"
PAPER_FAMILIES = {"action": "template1", "attribute": "template2", "spatial": "template3"}


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    keywords: tuple[str, ...] | None = None  # None = the prompt's content words
    thresholds: tuple[float, ...] | None = None  # the release's hand-tuned absolute thresholds, if any
    family: str | None = None


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read prompt file {p}: {e}") from None


def paper_prompts(family: str, split: str) -> list[PromptEntry]:
    if family not in PAPER_FAMILIES:
        raise ValueError(f"paper family must be one of {list(PAPER_FAMILIES)}, got {family!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    t = PAPER_FAMILIES[family]
    prompts = _read_json(PAPER_DIR / f"{t}_{split}.json")
    items = _read_json(PAPER_DIR / f"{t}_item.json")
    thresholds = _read_json(PAPER_DIR / f"{t}_mask.json")
    out = []
    for p in prompts:
        words = p.split()
        kw = tuple(words[i] for i in items[p]) if p in items else None
        th = tuple(float(x) for x in thresholds[p]) if p in thresholds else None
        out.append(PromptEntry(p, kw, th, family))
    return out


PROMPT_SOURCES: dict = {"paper": paper_prompts}  # name -> (family, split) -> list[PromptEntry]


def register_prompt_source(name: str, source) -> None:
    """Make NAME:FAMILY:SPLIT specs resolve through `source(family, split)` (a world plug-in's lists)."""
    if not name or ":" in name:
        raise ValueError(f"a prompt source needs a name without ':', got {name!r}")
    PROMPT_SOURCES[name] = source


def load_prompt_set(spec: str) -> list[PromptEntry]:
    """Prompts from a spec string (see the module docstring)."""
    parts = spec.split(":")
    if parts[0] in PROMPT_SOURCES and len(parts) == 3:
        return PROMPT_SOURCES[parts[0]](parts[1], parts[2])
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(f"{n}:FAMILY:SPLIT" for n in PROMPT_SOURCES)
        raise ValueError(f"prompt set {spec!r} is neither one of {names} nor a file")
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{path} must hold a JSON list of prompt strings")
        lines = data
    else:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    entries = [PromptEntry(p) for p in lines if p.strip()]
    if not entries:
        raise ValueError(f"{path} holds no prompt")
    return entries
