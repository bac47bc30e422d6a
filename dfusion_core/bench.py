"""Timing of plain sampling vs fused pairs vs cached re-fusion, on one model, steps and seeds.

`fused_pair_over_plain` compares fusing a pair (reference + target; the base's trajectory is known from
candidate sampling) with sampling one plain image: two images' compute is 2.0. `refuse_cached_over_plain`
compares a re-fusion from the reference cache (new threshold: target branch only) with one plain image:
the physical limit is 1.0.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from .config import FusionParams, SamplingParams
from .fusion import fuse
from .loading import LoadedModel
from .reference_cache import ReferenceCache
from .sampling import sample


def _sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(model: LoadedModel, fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GPU MiB or 0) over repeats after one warm-up run."""
    fn()
    times = []
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        fn()
        _sync(model)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if model.device.type == "cuda" else 0.0
    return statistics.median(times), peak


def run_bench(model: LoadedModel, prompt: str, sampling: SamplingParams, fusion: FusionParams | None = None,
              repeats: int = 5, base_seed: int = 1, ref_seed: int = 2) -> dict:
    fusion = fusion or FusionParams()
    first = sample(model, prompt, [base_seed], sampling)  # the base, as candidate sampling leaves it
    base, base_image = first.trajectories[0], first.images[0]
    plain_s, plain_mem = _timed(model, lambda: sample(model, prompt, [base_seed], sampling), repeats)
    pair_s, pair_mem = _timed(model, lambda: fuse(model, prompt, base_seed, ref_seed, sampling, fusion, base=base,
                                                         base_image=base_image),
                              repeats)
    cache = ReferenceCache(max_bytes=8 << 30)
    fuse(model, prompt, base_seed, ref_seed, sampling, fusion, base=base, cache=cache, base_image=base_image)
    thresholds = iter(0.2 + 0.6 * i / (repeats + 1) for i in range(repeats + 2))

    def refuse():
        f = replace(fusion, mask=replace(fusion.mask, threshold_mode="relative", threshold=next(thresholds)))
        r = fuse(model, prompt, base_seed, ref_seed, sampling, f, base=base, cache=cache, base_image=base_image)
        assert r.from_cache

    cached_s, cached_mem = _timed(model, refuse, repeats)
    return {
        "model": model.model_id, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale, "size": list(model.default_size()
                                                                                            if sampling.height is None else (sampling.height, sampling.width)),
        "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "plain_sample_s": round(plain_s, 4), "fused_pair_s": round(pair_s, 4), "refuse_cached_s": round(cached_s, 4),
        "fused_pair_over_plain": round(pair_s / plain_s, 3), "refuse_cached_over_plain": round(cached_s / plain_s, 3),
        "peak_mem_mib": {"plain": round(plain_mem), "fused_pair": round(pair_mem), "refuse_cached": round(cached_mem)},
        "cache_mib": round(cache.nbytes() / 2 ** 20, 1),
    }

