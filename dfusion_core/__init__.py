"""dfusion_core: D-Fusion (ICML 2025) on stock diffusers - sampling with trajectories, attention masks,
masked self-attention K/V fusion, scoring and preference-pair building. Never imports a UI toolkit.

Typical use:
    from dfusion_core import load_model, sample, fuse
    model = load_model()                       # the embedded ShapesWorld model, or a folder / hub id
    res = fuse(model, "a red circle above a blue square", base_seed=1, ref_seed=2)
    res.target_image, res.base_image           # the visually consistent (winner, loser) pair
"""
from .engine import offline  # noqa: F401  (telemetry off, before any HF import)
from .engine.config import FusionParams, MaskParams, SamplingParams

# the torch-backed names load on first use, so `python -m dfusion_core --help` and its argument errors answer at once
_LAZY = {"FusionResult": "fusion", "fuse": "fusion", "fuse_batch": "fusion", "LoadedModel": "loading",
         "ModelLoadError": "loading", "load_model": "loading", "ReferenceCache": "reference_cache",
         "Trajectory": "sampling", "recompute_log_probs": "sampling", "sample": "sampling"}

__all__ = ["FusionParams", "MaskParams", "SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".engine.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
