"""World plug-ins: one entry point, `discover()`, that the CLI and the app call before they list prompt sets,
check images or evaluate. It imports every module registered under the entry-point group "dfusion_core.worlds"
by an installed package (this one registers ShapesWorld in pyproject.toml); each registers itself with
dfusion_core.worlds.registry.register_world when imported. SHIPPED is imported too, so a checkout used without
`pip install -e .` still has its world."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

SHIPPED = ("dfusion_core.worlds.shapesworld",)


def discover() -> dict:
    """Import every world plug-in once; returns the registry {name: World}."""
    from .registry import WORLDS

    for name in SHIPPED:
        importlib.import_module(name)
    for ep in entry_points(group="dfusion_core.worlds"):
        ep.load()
    return WORLDS
