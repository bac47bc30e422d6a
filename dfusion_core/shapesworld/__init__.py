"""ShapesWorld, the embedded world, as a plug-in: importing this package registers its prompt lists
(`shapesworld:FAMILY:SPLIT`) with dfusion_core.prompt_sets."""
from __future__ import annotations

from ..loading import ASSETS
from ..prompt_sets import PromptEntry, _read_json, register_prompt_source

SHAPESWORLD_DIR = ASSETS / "prompts" / "shapesworld"


def shapesworld_prompts(family: str, split: str) -> list[PromptEntry]:
    """The shipped lists (assets/prompts/shapesworld), else the grammar's own split."""
    p = SHAPESWORLD_DIR / f"{family}_{split}.json"
    if not p.is_file():
        from .world import prompt_list

        specs = prompt_list(family, split)
        return [PromptEntry(s.text, tuple(dict.fromkeys(w for ws in s.object_words() for w in ws)), None, family)
                for s in specs]
    return [PromptEntry(e["prompt"], tuple(e["keywords"]), None, family) for e in _read_json(p)]


register_prompt_source("shapesworld", shapesworld_prompts)
