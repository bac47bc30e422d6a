"""dfusion_core: D-Fusion (ICML 2025) on stock diffusers - sampling with trajectories, attention masks,
masked self-attention K/V fusion, scoring and preference-pair building. Never imports a UI toolkit.

Typical use:
    from dfusion_core import load_model, sample, fuse
    model = load_model()                       # the embedded ShapesWorld model, or a folder / hub id
    res = fuse(model, "a red circle above a blue square", base_seed=1, ref_seed=2)
    res.target_image, res.base_image           # the visually consistent (winner, loser) pair
"""
from .engine import offline  # noqa: F401  (no network, before any HF import)
from .engine.config import FusionParams, MaskParams, SamplingParams
from .engine.fusion import FusionResult, fuse, fuse_batch
from .engine.loading import LoadedModel, ModelLoadError, load_model
from .engine.reference_cache import ReferenceCache
from .engine.sampling import Trajectory, recompute_log_probs, sample

__all__ = ["FusionParams", "MaskParams", "SamplingParams", "FusionResult", "fuse", "fuse_batch", "LoadedModel",
           "ModelLoadError", "load_model", "ReferenceCache", "Trajectory", "recompute_log_probs", "sample"]
