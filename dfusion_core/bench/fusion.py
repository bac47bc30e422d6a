"""Timing of plain sampling vs fused pairs vs cached re-fusion, on one model, steps and seeds.

`fused_pair_over_plain` compares fusing a pair (reference + target; the base's trajectory is known from
candidate sampling) with sampling one plain image: two images' compute is 2.0, one more with a mask that takes
the base's maps too (union_base: the base is replayed) and one more for a target held on its base (its exact
log-probs come from plain-model rows in the same calls); `limit_passes` says which. `refuse_cached_over_plain`
compares a re-fusion from the reference cache (new threshold: target branch only) with one plain image: the
limit is 1.0, 2.0 for a held target (`refuse_limit_passes`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from ..engine.config import FusionParams, SamplingParams
from ..engine.fusion import fuse
from ..engine.loading import LoadedModel
from ..engine.reference_cache import ReferenceCache
from ..engine.sampling import sample


def _sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _timed_rounds(model: LoadedModel, fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, peak GPU MiB or 0). One warm-up each, then the functions take turns in every
    round, so a slow spell of the machine affects all of them alike."""
    times = {k: [] for k in fns}
    peaks = {k: 0.0 for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(model)
            t0 = time.perf_counter()
            fn()
            _sync(model)
            times[name].append(time.perf_counter() - t0)
            if model.device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2 ** 20)
    return {k: (statistics.median(v), peaks[k]) for k, v in times.items()}


def run_bench(model: LoadedModel, prompt: str, sampling: SamplingParams, fusion: FusionParams | None = None,
              repeats: int = 5, base_seed: int = 1, ref_seed: int = 2) -> dict:
    fusion = fusion or model.default_fusion()
    first = sample(model, prompt, [base_seed], sampling)  # the base, as candidate sampling leaves it
    base, base_image = first.trajectories[0], first.images[0]
    cache = ReferenceCache(max_bytes=8 << 30)
    fuse(model, prompt, base_seed, ref_seed, sampling, fusion, base=base, cache=cache, base_image=base_image)

    def refuse():
        f = replace(fusion, mask=replace(fusion.mask, threshold_mode="relative", threshold=next(thresholds)))
        r = fuse(model, prompt, base_seed, ref_seed, sampling, f, base=base, cache=cache, base_image=base_image)
        assert r.from_cache

    def refuse_from_step1():  # every target step computed: the one-target-pass cost
        f = replace(fusion, start_step=1, mask=replace(fusion.mask, threshold_mode="relative", threshold=next(thresholds)))
        assert fuse(model, prompt, base_seed, ref_seed, sampling, f, base=base, cache=cache, base_image=base_image).from_cache

    thresholds = iter([0.2 + 0.6 * i / (2 * repeats + 4) for i in range(2 * repeats + 4)])
    res = _timed_rounds(model, {
        "plain": lambda: sample(model, prompt, [base_seed], sampling),
        "fused_pair": lambda: fuse(model, prompt, base_seed, ref_seed, sampling, fusion, base=base, base_image=base_image),
        "refuse_cached": refuse, "refuse_cached_from_step1": refuse_from_step1}, repeats)
    (plain_s, plain_mem), (pair_s, pair_mem), (cached_s, cached_mem) = res["plain"], res["fused_pair"], res["refuse_cached"]
    held = float(fusion.hold_outside and fusion.use_mask)
    return {
        "model": model.model_id, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "steps": sampling.num_steps, "guidance_scale": sampling.guidance_scale, "size": list(model.default_size()
                                                                                            if sampling.height is None else (sampling.height, sampling.width)),
        "repeats": repeats, "torch_threads": torch.get_num_threads(),
        "plain_sample_s": round(plain_s, 4), "fused_pair_s": round(pair_s, 4), "refuse_cached_s": round(cached_s, 4),
        "fused_pair_over_plain": round(pair_s / plain_s, 3), "refuse_cached_over_plain": round(cached_s / plain_s, 3),
        "refuse_cached_from_step1_s": round(res["refuse_cached_from_step1"][0], 4),
        "refuse_cached_from_step1_over_plain": round(res["refuse_cached_from_step1"][0] / plain_s, 3),
        "target_steps_computed": sampling.num_steps - fusion.start_step + 1,
        # the fusion form timed: holding the base outside the mask adds the plain model's rows to every call
        "form": {"start_step": fusion.start_step, "layers": fusion.layers if isinstance(fusion.layers, str)
                 else list(fusion.layers), "use_mask": fusion.use_mask, "union_base": fusion.mask.union_base,
                 "dilate": fusion.mask.dilate, "hold_outside": fusion.hold_outside},
        # plain passes a fused pair cannot go below: reference and target; the base again when the mask takes the
        # base's own maps (candidate sampling records none); a held target's plain-model rows for its log-probs
        "limit_passes": 2.0 + fusion.mask.union_base * fusion.use_mask + held,
        "refuse_limit_passes": 1.0 + held,
        "peak_mem_mib": {"plain": round(plain_mem), "fused_pair": round(pair_mem), "refuse_cached": round(cached_mem)},
        "cache_mib": round(cache.nbytes() / 2 ** 20, 1),
    }


def format_report(res: dict) -> str:
    """The bench result for a reader: one `key  value` line each (`--json` prints the dict itself)."""
    def show(v):
        return "  ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v)
    width = max(map(len, res), default=0)
    return "\n".join(f"{k:<{width}}  {show(v)}" for k, v in res.items())
