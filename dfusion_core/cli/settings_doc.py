"""docs/SETTINGS.md, generated from the settings' schema (engine/schema.setting): every field of the sampling,
mask, fusion, pairing and training settings with its default, CLI flag, app control and help.

    python -m dfusion_core.cli.settings_doc > docs/SETTINGS.md      (tests/test_structure.py checks it is current)
"""
from __future__ import annotations

from ..engine.config import FusionParams, MaskParams, SamplingParams
from ..engine.schema import markdown_table
from ..pairs.build import PairingParams

INTRO = """# Settings

Generated from the dataclasses' field metadata by `python -m dfusion_core.cli.settings_doc > docs/SETTINGS.md`;
do not edit by hand. Defaults are the paper's; a model folder's `dfusion.json` may set sampling, mask and
fusion fields for that model (the shipped ShapesWorld model's file does). A config JSON (`train --config`,
`train-on-policy --config`) holds fields of the training tables by name; flags override it."""


def settings_doc() -> str:
    from ..training.config import OnPolicyConfig, TrainConfig

    sections = [("Sampling (`SamplingParams`)", SamplingParams), ("Mask (`MaskParams`)", MaskParams),
                ("Fusion (`FusionParams`)", FusionParams), ("Pairing (`PairingParams`, build-pairs)", PairingParams),
                ("Training (`TrainConfig`, train)", TrainConfig),
                ("On-policy rounds (`OnPolicyConfig`, train-on-policy: TrainConfig's fields and these)", OnPolicyConfig)]
    parts = [INTRO]
    for title, cls in sections:
        parts.append(f"## {title}\n\n{markdown_table(cls, own_only=cls is OnPolicyConfig)}")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":  # pragma: no cover - exercised by the doc test
    print(settings_doc(), end="")
