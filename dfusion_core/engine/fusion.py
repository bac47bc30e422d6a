"""D-Fusion: denoise a target from the base's seed while borrowing the reference's self-attention K/V
inside the reference's keyword mask (docs/METHOD.md steps 4-6).

One batched UNet call per step: the reference runs one step ahead of the target, so the call that computes
the reference's step s+1 also computes the target's step s from the reference's step-s keys, values and
attention maps recorded one call earlier (exact, no stale masks). The base is never replayed unless its
trajectory is unknown or its own mask is wanted (union_base). With a ReferenceCache the reference's K/V
and maps are kept, and a new threshold / step range / layer choice re-runs the target branch alone. Given
the previous result of the same pair, a new end step re-runs only the steps after the two ranges part.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .attention import ROLE_BASE, ROLE_REF, ROLE_TARGET, RowInfo
from .config import FusionParams, MaskParams, SamplingParams
from .loading import LoadedModel
from .masks import FusionMasker, aggregate_maps, resize_mask, threshold_maps
from .reference_cache import CachedReference, ReferenceCache, ReferenceStore
from .progress import FusionStep, OnStep
from .sampling import (Stream, Trajectory, _size, check_pair_seeds, check_seed, denoise, recompute_log_probs,
                       validate_prompt)
from .schema import shown
from .tokens import default_keywords


@dataclass
class FusionResult:
    """A visually consistent pair: winner = target, loser = base (plus the reference it borrowed from)."""

    prompt: str
    base_seed: int
    ref_seed: int
    sampling: SamplingParams
    fusion: FusionParams
    keywords: list[str]
    token_groups: list[tuple[int, ...]]  # token positions of each keyword
    target_image: object
    reference_image: object
    base_image: object
    target: Trajectory
    reference: Trajectory
    base: Trajectory
    masks: torch.Tensor  # [S, h, w] union mask per step at mask resolution (0 where a step is not fused)
    token_maps: torch.Tensor  # [77, h, w] reference's cross-attention per token, mean over the steps
    keyword_masks: torch.Tensor  # [K, h, w] per-keyword thresholded mask, mean over the fused steps
    mask_factors: tuple[int, ...] = ()  # cross-attention downsampling factors the masks were read at
    from_cache: bool = False  # the reference came from the cache (target branch only)
    model_id: str = ""  # the weights it was computed with (a later LoRA makes it stale)
    steps_reused: int = 0  # target steps taken from a previous result instead of computed
    # False: the target was held outside its mask and its log-probs are still the fused sampler's, not yet
    # recomputed under the plain model (fuse(..., exact_log_probs=False); finish_log_probs makes them exact)
    log_probs_exact: bool = True

    @property
    def mask_coverage(self) -> float:
        """Fraction of the image the mask covers, averaged over the fused steps."""
        first, last = self.fusion.step_range(self.sampling.num_steps)
        return float(self.masks[first - 1:last].mean())


def shared_target_steps(previous: "FusionResult | None", model_id: str, prompt: str, base_seed: int, ref_seed: int,
                        sampling: SamplingParams, fusion: FusionParams) -> int:
    """How many leading target steps a new fusion shares with `previous`: the masks of a step do not depend
    on the range, so when only the end step moved, every step before the earlier of the two ends is the same."""
    if previous is None or (previous.model_id, previous.prompt, previous.base_seed, previous.ref_seed,
                            previous.sampling) != (model_id, prompt, base_seed, ref_seed, sampling):
        return 0
    n = sampling.num_steps
    if replace(previous.fusion, end_step=None) != replace(fusion, end_step=None):
        return 0
    return min(previous.fusion.step_range(n)[1], fusion.step_range(n)[1])


class _ChainStore:
    """Read view over several cached stores (target-only runs)."""

    def __init__(self, stores):
        self.stores = stores

    def get_kv(self, ref, step, layer, half):
        for s in self.stores:
            if (ref, step, layer, half) in s.kv:
                return s.kv[(ref, step, layer, half)]
        raise RuntimeError(f"no cached K/V for reference {ref} at step {step}, layer {layer}")

    def maps(self, role, ident, step):
        for s in self.stores:
            if s.has_maps(role, ident, step):
                return s.maps(role, ident, step)
        raise RuntimeError(f"no cached maps for {role} {ident} at step {step}")

    def put_kv(self, *a):  # target-only runs have no reference rows
        raise RuntimeError("read-only store")

    def put_map(self, *a):
        raise RuntimeError("read-only store")


def _cache_key(model: LoadedModel, prompt: str, ref_seed: int, sampling: SamplingParams, map_layers,
               map_softmax: str) -> tuple:
    return (model.model_id, prompt, ref_seed, sampling, tuple(sorted(map_layers)), map_softmax)


def resolve_keywords(model: LoadedModel, prompt: str, fusion: FusionParams) -> tuple[list[str], list[tuple[int, ...]]]:
    kws = list(fusion.mask.keywords) if fusion.mask.keywords else default_keywords(model.tokenizer, prompt)
    if not kws:
        raise ValueError(f"the prompt {shown(prompt)} has no content word to build a mask from; name keywords")
    return kws, model.family.token_groups(model, prompt, kws)


@dataclass
class _Plan:
    """What one fusion run computes, decided before any denoiser call."""

    sampling: SamplingParams
    fusion: FusionParams
    keywords: list[str]
    groups: list[tuple[int, ...]]
    map_layers: frozenset[str]
    factors: tuple[int, ...]
    fusion_layers: frozenset[str]
    schedule: object
    latent_hw: tuple[int, int]
    pairs: list[tuple[int, int]]
    ref_seeds: list[int]
    bases: dict[int, Trajectory]
    entries: dict[int, CachedReference]  # references found in the cache
    from_cache: bool  # every reference cached: the target branch alone runs
    replay_bases: list[int]  # bases denoised in this run (unknown, or their own mask is wanted)
    reused: dict[tuple[int, int], int]  # target steps taken from a previous result

    @property
    def n(self) -> int:
        return len(self.schedule.timesteps)


def _cached_entries(model, prompt, pairs, plan_bases, cache, sampling, map_layers, fusion_layers, mask: MaskParams):
    """References the cache holds with the layers and maps this run needs; fills in cached bases."""
    entries: dict[int, CachedReference] = {}
    if cache is None:
        return entries
    for r in dict.fromkeys(r for _, r in pairs):
        e = cache.get(_cache_key(model, prompt, r, sampling, map_layers, mask.map_softmax))
        if e is not None and fusion_layers <= e.store.kv_layers:
            entries[r] = e
    for b, r in pairs:
        if r in entries and mask.union_base and not entries[r].store.has_maps(ROLE_BASE, b, 0):
            entries.pop(r)
        elif r in entries and b not in plan_bases and entries[r].base is not None and entries[r].base.seed == b:
            plan_bases[b] = entries[r].base
    return entries


def plan_fusion(model: LoadedModel, prompt: str, pairs, sampling, fusion, bases, cache, previous) -> _Plan:
    """Validate, resolve keywords and layers, look up the cache and decide which steps each target computes."""
    sampling = (sampling or model.default_sampling()).validate()
    fusion = (fusion or model.default_fusion()).validate(sampling.num_steps)
    validate_prompt(prompt)
    if not pairs:
        raise ValueError("no (base_seed, ref_seed) pair given")
    for b, r in pairs:
        check_pair_seeds(b, r)
    keywords, groups = resolve_keywords(model, prompt, fusion)
    fam = model.family
    map_layers, factors = fam.map_layers(model.denoiser, model.layer_kinds, fusion.mask.layer_factors)
    fusion_layers = fam.fusion_layers(model.layer_kinds, fusion.layers)
    schedule = fam.schedule(model.pipe.scheduler, sampling.num_steps)
    _, lh, lw = model.latent_shape(sampling.height, sampling.width)
    bases = dict(bases or {})
    ref_seeds = list(dict.fromkeys(r for _, r in pairs))
    union_base = fusion.mask.union_base
    entries = _cached_entries(model, prompt, pairs, bases, cache, sampling, map_layers, fusion_layers, fusion.mask)
    from_cache = cache is not None and len(entries) == len(ref_seeds) and all(b in bases for b, _ in pairs)
    replay = [] if from_cache else list(dict.fromkeys(b for b, _ in pairs if union_base or b not in bases))
    plan = _Plan(sampling, fusion, keywords, groups, map_layers, factors, fusion_layers, schedule, (lh, lw),
                 list(pairs), ref_seeds, bases, entries, from_cache, replay, {})
    for b, r in pairs:
        shared = shared_target_steps((previous or {}).get((b, r)), model.model_id, prompt, b, r, sampling,
                                     fusion) if from_cache else 0
        plan.reused[(b, r)] = shared if shared > _steps_from_base(plan, b) else 0
    return plan


def _steps_from_base(plan: _Plan, b: int) -> int:
    """Before the first fused step the target IS its base: with the base's trajectory known, the target
    starts there (same latent, generator advanced past those steps' noise) instead of recomputing them."""
    skip = plan.fusion.step_range(plan.n)[0] - 1
    return skip if b in plan.bases and b not in plan.replay_bases else 0


def _streams(plan: _Plan, previous) -> list[Stream]:
    """Reference streams start at call 0, targets one call later (they read the reference's step-s K/V)."""
    def target(b, r, lagged: bool):
        k = plan.reused[(b, r)]
        k, prefix = (k, previous[(b, r)].target) if k else (_steps_from_base(plan, b), plan.bases.get(b))
        return Stream(seed=b, role=ROLE_TARGET, ref=r, base=b, offset=k + 1 if lagged else 0, first_step=k,
                      prefix=prefix)

    if plan.from_cache:
        return [target(b, r, False) for b, r in plan.pairs]
    streams = [Stream(seed=r, role=ROLE_REF, ref=r) for r in plan.ref_seeds]
    streams += [Stream(seed=b, role=ROLE_BASE, base=b) for b in plan.replay_bases]
    return streams + [target(b, r, True) for b, r in plan.pairs]


def run_fusion(model: LoadedModel, prompt: str, plan: _Plan, cache, previous, exact_log_probs: bool = False,
               on_step: OnStep | None = None):
    """Denoise every stream of the plan with the controller set up; returns (streams, trajectories, store, masker).
    exact_log_probs: held targets also run the plain model in the same calls (Stream.plain_shadow), so their
    log-probs come out exact without a second loop. on_step: called after every call (progress.FusionStep); it
    may raise FusionCancelled, which ends the run before anything is cached."""
    if plan.from_cache:
        store = _ChainStore([plan.entries[r].store for r in plan.ref_seeds])
    else:
        store = ReferenceStore(device=cache.device if cache is not None else None, keep_all=cache is not None)
    streams = _streams(plan, previous)
    fusion = plan.fusion
    if exact_log_probs and fusion.hold_outside and fusion.use_mask:
        for s in streams:
            s.plain_shadow = s.role == ROLE_TARGET
    masker = FusionMasker(store, fusion.mask, plan.groups, plan.latent_hw, fusion.step_range(plan.n),
                          fusion.use_mask, layers=plan.fusion_layers)
    keep_all = not plan.from_cache and cache is not None and cache.all_layers
    # a cached run keeps every fusion-capable layer, so a later layer change is a cache hit
    layers = model.family.all_fusion_layers(model.layer_kinds) if keep_all else plan.fusion_layers
    h, w = _size(model, plan.sampling)
    cond = model.encode([prompt], plan.sampling.negative_prompt, plan.sampling.uses_cfg, h, w)

    replayed = {s.base: s for s in streams if s.role == ROLE_BASE}  # bases denoised alongside
    calls = max(s.offset + plan.n - s.first_step for s in streams)  # as denoise counts them

    def on_call(call, active, steps):
        if fusion.hold_outside and fusion.use_mask:
            _hold_outside(plan, masker, replayed, active, steps)
        done = [k for s, k in zip(active, steps) if s.role == ROLE_TARGET]
        if done and isinstance(store, ReferenceStore):
            store.finish_step(min(done))
        if on_step is not None:
            on_step(_progress(call, calls, plan.n, active, steps))

    with model.controller.configured(store, masker, frozenset() if plan.from_cache else plan.map_layers, layers,
                                     {ROLE_REF, ROLE_BASE}, fusion.mask.map_softmax):
        trajs = denoise(model, cond, streams, plan.sampling, plan.schedule, on_call=on_call,
                        row_info=lambda s, k: RowInfo(s.role, k, s.ref, s.base))
    return streams, trajs, store, masker


def _progress(call: int, calls: int, n: int, active, steps) -> FusionStep:
    """The call's FusionStep: the first target it advanced (after holding), if any."""
    first = next(((s, k) for s, k in zip(active, steps) if s.role == ROLE_TARGET), None)
    if first is None:
        return FusionStep(call + 1, calls, None, n, None)
    return FusionStep(call + 1, calls, first[1] + 1, n, first[0].x0s[-1])


def _hold_outside(plan: _Plan, masker: FusionMasker, replayed: dict[int, Stream], active, steps) -> None:
    """Targets that just took fused step k: outside the step's mask (at latent resolution), the base's latent."""
    p = plan.fusion.mask
    for s, k in zip(active, steps):
        if s.role != ROLE_TARGET or not masker.active(k):
            continue
        base = plan.bases[s.base].latents if s.base in plan.bases else replayed[s.base].latents
        m = resize_mask(masker.combined_mask(s.ref, s.base, k), plan.latent_hw, p.resize, p.dilate, p.feather)
        m = m.to(s.latent.device, s.latent.dtype)
        s.latent = torch.lerp(base[k + 1].to(s.latent), s.latent, m)
        s.latents[-1] = s.latent.cpu()


def fuse_batch(model: LoadedModel, prompt: str, pairs: list[tuple[int, int]], sampling: SamplingParams | None = None,
               fusion: FusionParams | None = None, bases: dict[int, Trajectory] | None = None,
               cache: ReferenceCache | None = None, base_images: dict | None = None,
               previous: dict[tuple[int, int], FusionResult] | None = None,
               exact_log_probs: bool = True, on_step: OnStep | None = None) -> list[FusionResult]:
    """Fuse several (base_seed, ref_seed) pairs of one prompt in one batched run: plan, run, assemble.

    bases / base_images: trajectories and images of bases already sampled (not replayed, not re-decoded).
    previous: earlier results of these pairs; on a cached run the steps a target shares with its previous
    result (same everything but the end step) are taken from it, not computed.
    exact_log_probs=False: a target held outside its mask keeps the fused sampler's log-probs (flagged), for a
    view that shows images only (the app's live controls); finish_log_probs recomputes them before storing.
    """
    plan = plan_fusion(model, prompt, pairs, sampling, fusion, bases, cache, previous)
    streams, trajs, store, masker = run_fusion(model, prompt, plan, cache, previous, exact_log_probs, on_step)
    by_role = {(s.role, s.seed if s.role != ROLE_TARGET else (s.base, s.ref)): t for s, t in zip(streams, trajs)}
    refs = {r: (plan.entries[r].reference if plan.from_cache else by_role[(ROLE_REF, r)]) for r in plan.ref_seeds}
    for b in plan.replay_bases:
        plan.bases.setdefault(b, by_role[(ROLE_BASE, b)])
    targets = [by_role[(ROLE_TARGET, pair)] for pair in plan.pairs]
    held = plan.fusion.hold_outside and plan.fusion.use_mask  # the held latents are not the sampler's draws
    if held and exact_log_probs:  # computed in the fused run's calls; steps reused from a previous result may not be
        for pair, t in zip(plan.pairs, targets):
            if plan.reused[pair]:
                t.log_probs = recompute_log_probs(model, prompt, t, plan.sampling)
    ref_images, base_images, target_images = _decode_new(model, plan, refs, targets, dict(base_images or {}))
    if cache is not None and not plan.from_cache:
        _cache_references(model, prompt, plan, cache, store, refs, ref_images, base_images)
    results = [_result(model, prompt, plan, store, masker, pair, refs, tgt, timg, ref_images, base_images)
               for pair, tgt, timg in zip(plan.pairs, targets, target_images)]
    for res in results:
        res.log_probs_exact = exact_log_probs or not held
    return results


def finish_log_probs(model: LoadedModel, res: FusionResult) -> FusionResult:
    """Make a result's target log-probs exact (recomputed under the plain model, as fuse does by default) when
    fuse ran with exact_log_probs=False; `model` must carry the weights the result was fused with."""
    if not res.log_probs_exact:
        if model.model_id != res.model_id:
            raise ValueError(f"the pair was fused with {res.model_id}, not {model.model_id}: fuse it again")
        res.target.log_probs = recompute_log_probs(model, res.prompt, res.target, res.sampling)
        res.log_probs_exact = True
    return res


def _decode_new(model, plan: _Plan, refs, targets, base_images):
    """One VAE call for every image not known yet; returns (reference, base, target) images."""
    ref_images = {r: plan.entries[r].reference_image for r in plan.ref_seeds} if plan.from_cache else {}
    if plan.from_cache:
        for e in plan.entries.values():
            if e.base is not None and e.base_image is not None:
                base_images.setdefault(e.base.seed, e.base_image)
    base_seeds = list(dict.fromkeys(b for b, _ in plan.pairs))
    todo = [("ref", r, refs[r].final) for r in plan.ref_seeds if r not in ref_images]
    todo += [("base", b, plan.bases[b].final) for b in base_seeds if b not in base_images]
    todo += [("tgt", i, t.final) for i, t in enumerate(targets)]
    decoded = model.decode(torch.stack([z for _, _, z in todo]))
    target_images = [None] * len(targets)
    for (kind, key, _), im in zip(todo, decoded):
        if kind == "ref":
            ref_images[key] = im
        elif kind == "base":
            base_images[key] = im
        else:
            target_images[key] = im
    return ref_images, base_images, target_images


def _cache_references(model, prompt, plan: _Plan, cache, store, refs, ref_images, base_images) -> None:
    for r in plan.ref_seeds:
        b0 = next((b for b, rr in plan.pairs if rr == r), None)
        sub = _substore(store, r, [b for b, rr in plan.pairs if rr == r])
        cache.put(_cache_key(model, prompt, r, plan.sampling, plan.map_layers, plan.fusion.mask.map_softmax),
                  CachedReference(sub, refs[r], ref_images[r], plan.bases.get(b0), base_images.get(b0)))


def _result(model, prompt, plan: _Plan, store, masker, pair, refs, tgt, timg, ref_images, base_images):
    """The FusionResult of one pair: images, trajectories, the masks each fused step used, the token maps."""
    b, r = pair
    n, fusion = plan.n, plan.fusion
    first, last = fusion.step_range(n)
    mh, mw = masker.combined_mask(r, b, first - 1).shape
    masks = torch.zeros(n, mh, mw)
    kw_masks = torch.zeros(len(plan.groups), mh, mw)
    grow = fusion.mask.dilate
    for k in range(first - 1, last):  # each step's mask as the fusion used it: combined, grown by the dilation
        m = masker.combined_mask(r, b, k)
        masks[k] = (resize_mask(m, (mh, mw), "nearest", grow) if grow else m) if fusion.use_mask else 1.0
        kw_masks += threshold_maps(masker.keyword_maps(ROLE_REF, r, k), fusion.mask.threshold_mode,
                                   fusion.mask.threshold).float()
    kw_masks /= (last - first + 1)
    token_maps = torch.stack([aggregate_maps(store.maps(ROLE_REF, r, k), plan.latent_hw) for k in range(n)]).mean(0)
    return FusionResult(
        prompt=prompt, base_seed=b, ref_seed=r, sampling=plan.sampling, fusion=fusion, keywords=plan.keywords,
        token_groups=plan.groups, target_image=timg, reference_image=ref_images[r], base_image=base_images[b],
        target=tgt, reference=refs[r], base=plan.bases[b], masks=masks, token_maps=token_maps.cpu(),
        keyword_masks=kw_masks, mask_factors=plan.factors, from_cache=plan.from_cache, model_id=model.model_id,
        steps_reused=plan.reused[pair])


def _substore(store: ReferenceStore, ref: int, base_seeds: list[int]) -> ReferenceStore:
    sub = ReferenceStore(device=store.device, keep_all=True)
    sub.kv = {k: v for k, v in store.kv.items() if k[0] == ref}
    sub._maps = {k: v for k, v in store._maps.items()
                 if (k[0] == ROLE_REF and k[1] == ref) or (k[0] == ROLE_BASE and k[1] in base_seeds)}
    sub.kv_layers, sub.map_layers = set(store.kv_layers), set(store.map_layers)
    return sub


def fuse(model: LoadedModel, prompt: str, base_seed: int, ref_seed: int, sampling: SamplingParams | None = None,
         fusion: FusionParams | None = None, base: Trajectory | None = None,
         cache: ReferenceCache | None = None, base_image=None, previous: FusionResult | None = None,
         exact_log_probs: bool = True, on_step: OnStep | None = None) -> FusionResult:
    """Fuse one pair: the target starts from base_seed and borrows from the reference drawn with ref_seed.
    previous: this pair's last result, whose leading steps a new end step can reuse (with a cache)."""
    bases = {base_seed: base} if base is not None else None
    images = {base_seed: base_image} if base is not None and base_image is not None else None
    prev = {(base_seed, ref_seed): previous} if previous is not None else None
    return fuse_batch(model, prompt, [(base_seed, ref_seed)], sampling, fusion, bases, cache, images, prev,
                      exact_log_probs, on_step)[0]


@dataclass
class AttentionRecording:
    """Plain samples with their cross-attention: per image, token maps averaged over layers and steps."""

    seeds: list[int]
    images: list
    trajectories: list[Trajectory]
    token_maps: torch.Tensor  # [N, 77, h, w]
    mask_factors: tuple[int, ...]


def record_attention(model: LoadedModel, prompt: str, seeds: list[int], sampling: SamplingParams | None = None,
                     layer_factors: tuple[int, ...] | None = None, steps: tuple[int, int] | None = None,
                     map_softmax: str | None = None) -> AttentionRecording:
    """Sample `seeds` while recording their cross-attention maps (no fusion): for mask inspection and the
    localisation metrics. `steps` (1-based, inclusive) limits the steps averaged (default: all). Mask settings
    left None are the model's (model.default_fusion().mask), as fuse reads them."""
    sampling = (sampling or model.default_sampling()).validate()
    mask = model.default_fusion().mask
    layer_factors = mask.layer_factors if layer_factors is None else layer_factors
    map_softmax = mask.map_softmax if map_softmax is None else map_softmax
    validate_prompt(prompt)
    for s in seeds:
        check_seed(s)
    map_layers, factors = model.family.map_layers(model.denoiser, model.layer_kinds, layer_factors)
    h, w = _size(model, sampling)
    _, lh, lw = model.latent_shape(sampling.height, sampling.width)
    n = sampling.num_steps
    first, last = steps or (1, n)
    store = ReferenceStore(keep_all=True)
    streams = [Stream(seed=s, role=ROLE_REF, ref=s) for s in seeds]
    with model.controller.configured(store, map_layers=map_layers, map_roles={ROLE_REF}, map_softmax=map_softmax):
        trajs = denoise(model, model.encode([prompt], sampling.negative_prompt, sampling.uses_cfg, h, w), streams,
                        sampling, row_info=lambda s, k: RowInfo(s.role, k, s.ref, s.base))
    maps = torch.stack([torch.stack([aggregate_maps(store.maps(ROLE_REF, s, k), (lh, lw))
                                     for k in range(first - 1, last)]).mean(0) for s in seeds])
    images = model.decode(torch.stack([t.final for t in trajs]))
    return AttentionRecording(list(seeds), images, trajs, maps.cpu(), factors)
