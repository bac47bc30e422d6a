"""World plug-ins: one entry point, `discover()`, that the CLI and the app call before they list prompt sets,
check images or evaluate. It imports the shipped worlds (ShapesWorld) and every module registered under the
entry-point group "dfusion_core.worlds" by an installed package; each registers itself with
dfusion_core.engine.worlds.register_world when imported."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

SHIPPED = ("dfusion_core.shapesworld",)


def discover() -> dict:
    """Import every world plug-in once; returns the registry {name: World}."""
    from ..engine.worlds import WORLDS

    for name in SHIPPED:
        importlib.import_module(name)
    for ep in entry_points(group="dfusion_core.worlds"):
        ep.load()
    return WORLDS
