"""ShapesWorld, the embedded world, as a plug-in: importing this package registers it (its prompt lists
`shapesworld:FAMILY:SPLIT`, its ground-truth checker for the app, its evaluation for `eval`) with
dfusion_core.worlds.registry; dfusion_core.worlds.discover() is the one entry point that imports it."""
from __future__ import annotations

from ...engine.loading import ASSETS
from ...pairs.prompt_sets import PromptEntry, _read_json
from ..registry import World, register_world

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


def check_images(images, prompt: str) -> list[bool] | None:
    """The checker's verdict per image, or None for a prompt outside ShapesWorld's grammar."""
    import numpy as np

    from .checker import check
    from .world import parse_prompt

    spec = parse_prompt(prompt)
    if spec is None:
        return None
    return [check(np.asarray(im), spec).correct for im in images]


def _evaluate(*args, **kwargs):
    from .evaluate import evaluate

    return evaluate(*args, **kwargs)


def explain_prompt(prompt: str) -> list[str]:
    """Why ShapesWorld's models cannot draw the prompt (words outside the vocabulary, not a caption); [] if they can."""
    from .world import explain_prompt as explain

    return explain(prompt)


register_world(World("shapesworld", shapesworld_prompts, check_images, _evaluate,
                     example_sets=("shapesworld:attribute:test", "shapesworld:spatial:test", "shapesworld:action:test"),
                     families=("action", "attribute", "spatial"), explain=explain_prompt))
