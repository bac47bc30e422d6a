"""The world registry: what a synthetic world plug-in offers the faces (CLI, app) beyond prompt lists.

A world (e.g. the embedded ShapesWorld) knows its prompt grammar and has a ground-truth checker; a model
folder names the world it was trained on in its dfusion.json ("world": NAME). The engine never imports a
world: a world registers itself here when its package is imported, and `dfusion_core.worlds.discover()`
(called by the CLI and the app) imports the shipped worlds and any installed under the entry-point group
"dfusion_core.worlds".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..pairs.prompt_sets import register_prompt_source


@dataclass(frozen=True)
class World:
    name: str
    prompt_source: Callable  # (family, split) -> list[PromptEntry]
    check: Callable | None = None  # (images, prompt) -> list[bool] | None (None: the prompt is outside the grammar)
    evaluate: Callable | None = None  # (model, scorer, split, n_prompts, seeds, sampling, **kw) -> report dict
    example_sets: tuple[str, ...] = ()  # prompt-set specs whose first prompts the app offers as examples
    families: tuple[str, ...] = field(default_factory=tuple)
    explain: Callable | None = None  # (prompt) -> list[str]: why the world's models cannot draw it ([] = they can)


WORLDS: dict[str, World] = {}


def register_world(world: World) -> World:
    WORLDS[world.name] = world
    register_prompt_source(world.name, world.prompt_source)
    return world


def world_of(defaults: dict) -> World | None:
    """The world a model was trained on (its dfusion.json "world"), if that world is registered."""
    return WORLDS.get(defaults.get("world")) if defaults else None


def explain_prompt(defaults: dict, prompt: str) -> list[str]:
    """Why a model trained on a world cannot draw `prompt` (words outside its vocabulary, a sentence outside its
    grammar), one message each; [] when it can, or when the model names no world or its world has no grammar."""
    world = world_of(defaults)
    if world is None or world.explain is None:
        return []
    return list(world.explain(prompt))
