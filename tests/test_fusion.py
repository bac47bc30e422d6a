"""D-Fusion read as a specification (docs/METHOD.md steps 4-6)."""
from dataclasses import replace

import pytest
import torch

from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams
from dfusion_core.engine.fusion import fuse, fuse_batch
from dfusion_core.engine.reference_cache import ReferenceCache
from dfusion_core.engine.sampling import recompute_log_probs, sample

SP = SamplingParams(num_steps=6)
PROMPT = "a red and woolen bus"
NOTHING = MaskParams(threshold_mode="absolute", threshold=1.0)  # no attention prob exceeds 1: empty mask


@pytest.fixture(scope="module")
def plain(every_family):
    res = sample(every_family, PROMPT, [11, 22], SP)
    return dict(zip([11, 22], res.trajectories))


@pytest.mark.slow
def test_empty_mask_gives_the_base(every_family, plain):
    r = fuse(every_family, PROMPT, 11, 22, SP, FusionParams(mask=NOTHING), base=plain[11])
    assert r.masks.sum() == 0
    torch.testing.assert_close(r.target.latents, plain[11].latents, atol=1e-4, rtol=0)


def test_target_starts_from_the_base_noise_and_differs_where_fused(every_family, plain):
    r = fuse(every_family, PROMPT, 11, 22, SP, FusionParams(), base=plain[11])
    assert torch.equal(r.target.latents[0], plain[11].latents[0])  # same x_T
    assert 0 < r.masks[2:].mean() < 1
    assert (r.target.final - plain[11].final).abs().max() > 1e-3
    torch.testing.assert_close(r.reference.latents, plain[22].latents, atol=1e-4, rtol=0)  # reference replayed


def test_steps_outside_the_range_are_unchanged(sd1, plain_sd1=None):
    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    r = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(start_step=4, end_step=4), base=base)
    # steps 1-3 (latents x_T..x_3) equal the base; step 4 is the first to change
    torch.testing.assert_close(r.target.latents[:4], base.latents[:4], atol=1e-4, rtol=0)
    assert (r.target.latents[4] - base.latents[4]).abs().max() > 1e-3
    assert r.masks[3].sum() > 0 and r.masks[:3].sum() == 0 and r.masks[4:].sum() == 0


def test_global_fusion_changes_more_than_masked(sd1):
    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    masked = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(), base=base)
    glob = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(use_mask=False), base=base)
    assert glob.masks[2:].min() == 1
    d_masked = (masked.target.final - base.final).abs().mean()
    d_global = (glob.target.final - base.final).abs().mean()
    assert d_global > d_masked


@pytest.mark.slow
def test_cached_refusion_equals_a_full_run(every_family, plain):
    cache = ReferenceCache()
    first = fuse(every_family, PROMPT, 11, 22, SP, FusionParams(), base=plain[11], cache=cache)
    assert not first.from_cache and len(cache) == 1
    for params in (FusionParams(mask=MaskParams(threshold_mode="relative", threshold=0.3)),
                   FusionParams(start_step=2, end_step=5), FusionParams(layers="up")):
        cached = fuse(every_family, PROMPT, 11, 22, SP, params, base=plain[11], cache=cache)
        full = fuse(every_family, PROMPT, 11, 22, SP, params, base=plain[11])
        assert cached.from_cache
        torch.testing.assert_close(cached.target.latents, full.target.latents, atol=1e-4, rtol=0)
        torch.testing.assert_close(cached.masks, full.masks)
    assert cache.hits == 3


@pytest.mark.slow
def test_cache_is_bounded_and_evicts_oldest(sd1, plain_sd1=None):
    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    probe = ReferenceCache()
    fuse(sd1, PROMPT, 11, 22, SP, base=base, cache=probe)
    one = probe.nbytes()
    cache = ReferenceCache(max_bytes=int(one * 1.5))
    fuse(sd1, PROMPT, 11, 22, SP, base=base, cache=cache)
    fuse(sd1, PROMPT, 11, 33, SP, base=base, cache=cache)
    assert len(cache) == 1 and cache.nbytes() <= cache.max_bytes
    assert fuse(sd1, PROMPT, 11, 33, SP, base=base, cache=cache).from_cache
    assert not fuse(sd1, PROMPT, 11, 22, SP, base=base, cache=cache).from_cache


@pytest.mark.slow
def test_batched_pairs_share_references(sd2):
    res = fuse_batch(sd2, PROMPT, [(1, 5), (2, 5), (3, 6)], SP)
    single = fuse(sd2, PROMPT, 2, 5, SP)
    assert [(r.base_seed, r.ref_seed) for r in res] == [(1, 5), (2, 5), (3, 6)]
    torch.testing.assert_close(res[1].target.latents, single.target.latents, atol=1e-4, rtol=0)
    assert torch.equal(res[0].reference.latents, res[1].reference.latents)


def test_union_with_base_mask_covers_at_least_the_reference_mask(sd1):
    ref_only = fuse(sd1, PROMPT, 11, 22, SP, FusionParams())
    union = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(mask=MaskParams(union_base=True)))
    assert torch.all(union.masks >= ref_only.masks)


def test_fused_log_probs_recomputed_under_the_plain_model(sd1):
    r = fuse(sd1, PROMPT, 11, 22, SP)
    plain_lp = recompute_log_probs(sd1, PROMPT, r.target, SP)
    assert plain_lp.shape == (6,)
    # outside the fusion range (steps 1-2) the fused sampler is the plain model
    torch.testing.assert_close(plain_lp[:2], r.target.log_probs[:2], atol=2e-3, rtol=1e-4)
    assert (plain_lp[2:] - r.target.log_probs[2:]).abs().max() > 1e-4


def test_keywords_masks_and_maps_are_reported(sd1):
    r = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(mask=MaskParams(keywords=("woolen", "bus"))))
    assert r.keywords == ["woolen", "bus"] and r.token_groups == [(4, 5), (6,)]
    assert r.token_maps.shape[0] == 77 and r.keyword_masks.shape[0] == 2
    assert r.target_image.size == r.base_image.size == r.reference_image.size


@pytest.mark.parametrize("fusion,msg", [
    (FusionParams(start_step=5, end_step=2), "after end_step"),
    (FusionParams(start_step=0), "start_step"),
    (FusionParams(end_step=7), "end_step"),
    (FusionParams(layers="sideways"), "layers must be"),
    (FusionParams(mask=MaskParams(threshold_mode="magic")), "threshold_mode"),
    (FusionParams(mask=MaskParams(threshold_mode="relative", threshold=0)), "relative threshold"),
    (FusionParams(mask=MaskParams(threshold_mode="absolute", threshold=2)), "absolute threshold"),
    (FusionParams(mask=MaskParams(keywords=("horse",))), "'horse' is not in the prompt"),
    (FusionParams(mask=MaskParams(layer_factors=(3,))), "layer_factors"),
])
def test_invalid_fusion_params_get_clear_errors(sd1, fusion, msg):
    with pytest.raises(ValueError, match=msg):
        fuse(sd1, PROMPT, 1, 2, SP, fusion)


def test_prompt_without_content_words(sd1):
    with pytest.raises(ValueError, match="no content word"):
        fuse(sd1, "the of a", 1, 2, SP)


@pytest.mark.slow
def test_target_reuses_the_known_base_before_the_first_fused_step(sd1):
    """Before start_step the target is its base: it starts from the base's latent, with the base's later noise."""
    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    fused = FusionParams(start_step=4)
    skipping = fuse(sd1, PROMPT, 11, 22, SP, fused, base=base)
    computing = fuse(sd1, PROMPT, 11, 22, SP, fused)  # base unknown: replayed, every target step computed
    assert torch.equal(skipping.target.latents[:4], base.latents[:4])
    torch.testing.assert_close(skipping.target.latents, computing.target.latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(skipping.target.log_probs, computing.target.log_probs, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_ablation_grid_global_fusion_changes_the_outside_more(sd1):
    from dfusion_core.pairs.ablation import run_ablation

    cells = run_ablation(sd1, PROMPT, 11, 22, SamplingParams(num_steps=8), FusionParams(),
                         scorer=lambda ims, ps: [0.5] * len(ims), thresholds=[("0.3", 0.3)])
    labels = [c.label for c in cells]
    assert labels[:2] == ["early 3-4 mask", "early 3-4 no mask"] and labels[-2:] == ["threshold 0.3", "keywords union"]
    by = {c.label: c for c in cells}
    assert by["all 3-8 no mask"].change_outside > by["all 3-8 mask"].change_outside
    assert all(c.score == 0.5 for c in cells)


@pytest.mark.slow
def test_a_new_end_step_reuses_the_previous_targets_shared_steps(sd1):
    """Only the end step moved: the steps before the earlier end are the previous target's, the rest computed."""
    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    cache = ReferenceCache()
    fuse(sd1, PROMPT, 11, 22, SP, FusionParams(), base=base, cache=cache)  # fills the cache
    prev = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(end_step=5), base=base, cache=cache)
    calls = []
    hook = sd1.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        for end, shared in ((3, 3), (6, 5)):
            calls.clear()
            params = FusionParams(end_step=end)
            reused = fuse(sd1, PROMPT, 11, 22, SP, params, base=base, cache=cache, previous=prev)
            assert reused.steps_reused == shared and len(calls) == SP.num_steps - shared
            full = fuse(sd1, PROMPT, 11, 22, SP, params, base=base, cache=cache)
            assert full.steps_reused == 0
            torch.testing.assert_close(reused.target.latents, full.target.latents, atol=1e-5, rtol=0)
            torch.testing.assert_close(reused.target.log_probs, full.target.log_probs, atol=1e-4, rtol=0)
            torch.testing.assert_close(reused.masks, full.masks)
        # anything else changed (here the threshold), or other weights: nothing is reused
        other = FusionParams(end_step=3, mask=MaskParams(threshold_mode="relative", threshold=0.3))
        assert fuse(sd1, PROMPT, 11, 22, SP, other, base=base, cache=cache, previous=prev).steps_reused == 0
        stale = replace(prev, model_id=prev.model_id + "+lora:x")
        assert fuse(sd1, PROMPT, 11, 22, SP, FusionParams(end_step=3), base=base, cache=cache,
                    previous=stale).steps_reused == 0
    finally:
        hook.remove()


def test_a_models_dfusion_json_can_set_fusion_fields():
    from dfusion_core.engine.config import MaskParams, fusion_defaults

    mask = MaskParams(union_base=True, dilate=1)
    f = fusion_defaults({"start_step": 1, "layers": "all", "hold_outside": True, "guidance_scale": 3.0}, mask)
    assert (f.start_step, f.layers, f.hold_outside, f.mask) == (1, "all", True, mask)
    assert fusion_defaults({}, mask) == FusionParams(mask=mask)


def test_the_engine_refuses_a_pair_of_equal_seeds(sd1):
    with pytest.raises(ValueError, match="same seed"):
        fuse(sd1, PROMPT, 5, 5, SP)


def test_on_step_reports_each_call_and_a_cancelled_run_leaves_no_trace(sd1):
    """The app's live view: progress after every denoiser call (the target's x0 once it moves), and a fusion
    stopped by FusionCancelled caches nothing; the next run is the same as if the stopped one never happened."""
    from dfusion_core.engine.progress import FusionCancelled

    base = sample(sd1, PROMPT, [11], SP).trajectories[0]
    seen = []
    cache = ReferenceCache()
    done = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(), base=base, cache=cache, on_step=seen.append)
    assert [p.call for p in seen] == list(range(1, seen[0].calls + 1))
    targets = [p for p in seen if p.step is not None]
    assert [p.step for p in targets] == list(range(targets[0].step, SP.num_steps + 1))
    torch.testing.assert_close(targets[-1].x0_pred, done.target.x0_preds[-1])

    def stop_at_three(p):
        if p.call == 3:
            raise FusionCancelled

    fresh = ReferenceCache()
    with pytest.raises(FusionCancelled):
        fuse(sd1, PROMPT, 11, 33, SP, FusionParams(), base=base, cache=fresh, on_step=stop_at_three)
    assert len(fresh) == 0  # nothing half-recorded was kept
    again = fuse(sd1, PROMPT, 11, 22, SP, FusionParams(), base=base)
    torch.testing.assert_close(again.target.latents, done.target.latents, atol=1e-4, rtol=0)
