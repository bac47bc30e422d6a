"""The SD3-family (MMDiT + flow matching) path through the family seam: loading without T5, the joint
attention processor (default when idle, maps image -> text, image-token K/V fusion), sampling and fusion."""
import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from dfusion_core import FusionParams, MaskParams, fuse, sample
from dfusion_core.engine.attention import ROLE_PLAIN, ROLE_REF, ROLE_TARGET, AttentionController, RowInfo
from dfusion_core.engine.config import SamplingParams
from dfusion_core.engine.joint_attention import JointDFusionProcessor
from dfusion_core.engine.reference_cache import ReferenceStore

SP = SamplingParams(num_steps=4, eta=0.7, guidance_scale=3.0)


def _inputs(model, b=2):
    g = torch.Generator().manual_seed(0)
    c, h, w = model.latent_shape(None, None)
    cond = model.encode(["a red dog", "a blue cat"][:b], "", False, *model.default_size())
    return torch.randn(b, c, h, w, generator=g), torch.tensor([900.0, 400.0][:b]), cond


def _out(model, x, t, cond):
    return model.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=cond.cond,
                          pooled_projections=cond.added_cond["pooled_projections"]).sample


def test_sd3_folder_without_t5_loads_as_an_mmdit(sd3):
    assert sd3.kind == "sd3" and sd3.family.name == "mmdit-flow" and sd3.pipe.text_encoder_3 is None
    assert sd3.layer_kinds == {"transformer_blocks.0.attn": "joint", "transformer_blocks.0.attn2": "self",
                               "transformer_blocks.1.attn": "joint"}
    assert sd3.defaults["eta"] == 0.7  # Flow-GRPO's noise level unless the folder's dfusion.json says otherwise


@pytest.mark.parametrize("softmax", ["joint", "text"])
def test_joint_processor_equals_diffusers_default_and_records_maps(sd3, softmax):
    x, t, cond = _inputs(sd3)
    ctl = sd3.controller
    joint = frozenset(n for n, k in sd3.layer_kinds.items() if k == "joint")
    with torch.no_grad():
        idle = _out(sd3, x, t, cond)
        ctl.store, ctl.map_layers, ctl.map_softmax = ReferenceStore(), joint, softmax
        ctl.begin_call([RowInfo(ROLE_REF, 0, ref=1), RowInfo(ROLE_PLAIN, 0)], cfg=False)
        try:
            recorded = _out(sd3, x, t, cond)
        finally:
            ctl.end()
        maps = ctl.store.maps(ROLE_REF, 1, 0)
        ctl.store, ctl.map_layers, ctl.map_softmax = None, frozenset(), "joint"
        procs = sd3.denoiser.attn_processors
        sd3.denoiser.set_attn_processor(JointAttnProcessor2_0())
        try:
            default = _out(sd3, x, t, cond)
        finally:
            sd3.denoiser.set_attn_processor(procs)
    torch.testing.assert_close(idle, default, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorded, default, atol=1e-5, rtol=1e-5)
    assert set(maps) == set(joint)
    n_img = (x.shape[-1] // 2) * (x.shape[-2] // 2)
    for m in maps.values():
        assert m.shape == (n_img, 77 + sd3.sequence_length)  # CLIP's tokens, then the zero rows in T5's place
        sums = m.sum(-1)
        if softmax == "text":  # a distribution over the text keys
            torch.testing.assert_close(sums, torch.ones(n_img), atol=1e-5, rtol=0)
        else:  # the text share of a softmax over image + text keys
            assert bool((sums < 1).all()) and bool((sums > 0).all())


def test_global_swap_makes_target_image_tokens_read_the_references_keys(sd3):
    """With M = 1 a target row's image tokens attend over [reference image K/V ; its own text K/V]."""
    attn = sd3.denoiser.transformer_blocks[1].attn
    torch.manual_seed(0)
    img, txt = torch.randn(2, 6, attn.query_dim), torch.randn(2, 5, attn.query_dim)
    txt[1] = txt[0]  # same prompt, different images
    ctl = AttentionController()
    ctl.store = ReferenceStore()

    class AllOnes:
        def mask(self, ref, base, step, layer, n):
            return torch.ones(n)

    ctl.masker, ctl.fusion_layers = AllOnes(), frozenset({"blk"})
    proc = JointDFusionProcessor(ctl, "blk")
    ctl.begin_call([RowInfo(ROLE_REF, 0, ref=7), RowInfo(ROLE_TARGET, 0, ref=7, base=3)], cfg=False)
    with torch.no_grad():
        fused_img, fused_txt = proc(attn, img, txt)
        ctl.end()
        plain_img, _ = JointAttnProcessor2_0()(attn, img, txt)
        # the target's queries against the reference's image keys/values: swap only what K/V see
        q_from_tgt = proc(attn, img[1:], txt[1:])  # idle: the plain target
    torch.testing.assert_close(fused_img[0], plain_img[0])  # the reference row is untouched
    assert not torch.allclose(fused_img[1], plain_img[1], atol=1e-4)
    torch.testing.assert_close(q_from_tgt[0][0], plain_img[1])
    # by hand: softmax(Q_tgt [K_ref_img; K_tgt_txt]^T / sqrt(d)) [V_ref_img; V_tgt_txt]
    h = attn.heads

    def split(v):
        return v.view(1, -1, h, v.shape[-1] // h).transpose(1, 2)

    with torch.no_grad():
        q = attn.norm_q(split(attn.to_q(img[1:])))
        k = torch.cat([attn.norm_k(split(attn.to_k(img[:1]))), attn.norm_added_k(split(attn.add_k_proj(txt[1:])))], 2)
        v = torch.cat([split(attn.to_v(img[:1])), split(attn.add_v_proj(txt[1:]))], 2)
        o = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v
        o = attn.to_out[0](o.transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(fused_img[1], o[0], atol=1e-5, rtol=1e-5)


def test_fusion_on_an_mmdit_reports_per_token_maps_and_masks(sd3):
    res = fuse(sd3, "a red dog next to a blue cat", 1, 2, SP, FusionParams(start_step=1, layers="all"))
    _, lh, lw = sd3.latent_shape(None, None)
    assert res.token_maps.shape == (77 + sd3.sequence_length, lh // 2, lw // 2)  # a map per text token, patch grid
    assert res.masks.shape == (SP.num_steps, lh // 2, lw // 2)
    assert 0 < float(res.masks.mean()) < 1
    kw = res.token_groups[res.keywords.index("dog")]
    assert float(res.token_maps[list(kw)].sum()) > 0


def test_mmdit_layer_presets_and_paths(sd3):
    fam, kinds = sd3.family, sd3.layer_kinds
    assert fam.fusion_layers(kinds, "all") == frozenset(kinds)
    assert fam.fusion_layers(kinds, "mid+up") == {"transformer_blocks.1.attn"}
    assert fam.fusion_layers(kinds, ["transformer_blocks.0"]) == {"transformer_blocks.0.attn",
                                                                 "transformer_blocks.0.attn2"}
    with pytest.raises(ValueError, match="no attention block matches"):
        fam.fusion_layers(kinds, ["transformer_blocks.9"])


def test_flow_samples_replay_from_their_seed_in_any_batch(sd3):
    a = sample(sd3, "a red dog", [4, 5, 6], SP).trajectories[1]
    b = sample(sd3, "a red dog", [5], SP).trajectories[0]
    torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    assert a.timesteps.dtype == torch.float32 and float(a.timesteps[0]) == 1000.0
    assert bool((a.log_probs[:-1] != 0).all())  # every SDE step is a Gaussian with a density


@pytest.mark.slow
def test_the_app_samples_fuses_and_labels_on_an_sd3_pipeline(sd3, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from conftest import launch_app

    from app.service import AppService

    svc = AppService(sd3, store_dir=tmp_path / "store",
                     scorer=lambda ims, ps: [sum(im.convert("L").getdata()) / (255 * 64 * 64) for im in ims])
    url, demo = launch_app(svc)
    try:
        c = gradio_client.Client(url, verbose=False)
        gallery, base, ref, words, kws, _ = c.predict("a red dog", 4, 2.0, 0.7, 4, 0, api_name="/sample")
        assert len(gallery) == 4 and base != ref
        args = ("a red dog", 4, 2.0, 0.7, base, ref, ["red", "dog"], "auto", 0.5, 1, 4, "all", "smooth", True, "red")
        out = c.predict(*args, api_name="/fuse")
        assert "one batched run" in out[-1], out[-1]
        out = c.predict(*args[:7], "relative", 0.4, *args[9:], api_name="/refuse_threshold")
        assert "cache (target branch only)" in out[-1], out[-1]
        assert "saved pair" in c.predict(api_name="/label_target")
        assert len(svc.store) == 1
    finally:
        demo.close()


@pytest.mark.slow
def test_with_t5_a_keyword_owns_its_clip_and_its_t5_tokens(pipelines_dir):
    """CLIP (positions 0..76) and T5 (77 + i) split words differently; a keyword's map reads both."""
    from conftest import _load

    m = _load("sd3-t5", pipelines_dir)
    assert m.t5_length == 16 and m.pipe.tokenizer_3 is not None
    prompt = "a red dog above a blue cat"
    groups = m.family.token_groups(m, prompt, ["red", "dog"])
    t5 = m.pipe.tokenizer_3(prompt, return_offsets_mapping=True)
    for (word, group) in zip(["red", "dog"], groups):
        clip = [p for p in group if p < 77]
        t5_pos = [p - 77 for p in group if p >= 77]
        assert clip == [{"red": 2, "dog": 3}[word]]
        start = prompt.index(word)
        spelled = "".join(t5.tokens()[p] for p in t5_pos).replace("\u2581", "")
        assert t5_pos and spelled == word, (word, t5_pos, t5.tokens())
        assert all(t5["offset_mapping"][p][0] < start + len(word) for p in t5_pos)
    res = fuse(m, prompt, 1, 2, SP, FusionParams(start_step=1, layers="all", mask=MaskParams(keywords=("dog",))))
    assert res.token_maps.shape[0] == 77 + 16  # maps over CLIP and T5 text tokens
    assert float(res.token_maps[[p for p in res.token_groups[0] if p >= 77]].sum()) > 0


def test_holding_the_base_outside_the_mask_keeps_the_base_there(sd3):
    """hold_outside: after every fused step the target's latent outside the mask is the base's, so the final
    latent equals the base's outside the last step's mask; log-probs are the plain model's for that path."""
    from dfusion_core.engine.masks import resize_mask
    from dfusion_core.engine.sampling import recompute_log_probs

    mask = MaskParams(keywords=("dog",), resize="nearest")
    res = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, layers="all", hold_outside=True, mask=mask))
    free = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, layers="all", mask=mask))
    _, lh, lw = sd3.latent_shape(None, None)
    m = resize_mask(res.masks[-1], (lh, lw), "nearest") > 0.5
    assert 0 < float(m.float().mean()) < 1
    out = ~m.expand_as(res.target.final)
    torch.testing.assert_close(res.target.final[out], res.base.final[out])
    assert not torch.allclose(free.target.final[out], free.base.final[out])  # without holding, fusion leaks
    torch.testing.assert_close(res.target.log_probs, recompute_log_probs(sd3, "a red dog", res.target, SP))


def test_a_live_fusion_defers_a_held_targets_log_probs_and_storing_makes_them_exact(sd3):
    """exact_log_probs=False (the app's live controls): same images, log-probs flagged as the fused sampler's;
    a record refuses them until finish_log_probs recomputes them, which gives fuse's exact ones."""
    from dfusion_core.engine.fusion import finish_log_probs
    from dfusion_core.pairs.build import record_from_result

    fp = FusionParams(start_step=1, layers="all", hold_outside=True, mask=MaskParams(keywords=("dog",), dilate=1))
    exact = fuse(sd3, "a red dog", 1, 2, SP, fp)
    live = fuse(sd3, "a red dog", 1, 2, SP, fp, exact_log_probs=False)
    assert exact.log_probs_exact and not live.log_probs_exact
    torch.testing.assert_close(live.target.latents, exact.target.latents)
    assert not torch.allclose(live.target.log_probs, exact.target.log_probs)
    with pytest.raises(ValueError, match="finish_log_probs"):
        record_from_result(live, sd3.model_id, {})
    finish_log_probs(sd3, live)
    torch.testing.assert_close(live.target.log_probs, exact.target.log_probs)
    assert record_from_result(live, sd3.model_id, {}).target is live.target
    unheld = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, mask=fp.mask), exact_log_probs=False)
    assert unheld.log_probs_exact  # nothing held: the sampler's log-probs are the model's


def test_text_softmax_maps_are_a_fusion_option_and_a_cache_key(sd3):
    from dfusion_core.engine.reference_cache import ReferenceCache

    cache = ReferenceCache()
    mask = MaskParams(keywords=("dog",))
    joint = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, layers="all", mask=mask), cache=cache)
    text = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, layers="all",
                                                         mask=MaskParams(keywords=("dog",), map_softmax="text")),
                cache=cache)
    assert not text.from_cache  # other maps: not the joint run's cache entry
    assert not torch.allclose(joint.token_maps, text.token_maps)
    t = text.token_maps.sum(0)  # over the text keys alone each image position's map sums to 1 (averaged)
    torch.testing.assert_close(t, torch.ones_like(t), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="map_softmax"):
        MaskParams(map_softmax="image").validate()


@pytest.mark.slow
@pytest.mark.parametrize("length", [None, 0])
def test_plain_sample_without_t5_is_stock_diffusers_image(pipelines_dir, sd3, tmp_path, length):
    """Without T5 a prompt is encoded as StableDiffusion3Pipeline encodes it: CLIP's tokens and 256 zero rows (which
    the context embedder's bias makes non-zero), or the length a folder's dfusion.json names (0 for ShapesWorld)."""
    import json
    import shutil

    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.loading import load_model
    from dfusion_core.engine.sampling import sample

    folder = tmp_path / "sd3"
    shutil.copytree(pipelines_dir / "sd3", folder, symlinks=True)
    (folder / "dfusion.json").unlink(missing_ok=True)  # the tiny model's own file says 0
    if length is not None:
        (folder / "dfusion.json").write_text(json.dumps({"max_sequence_length": length}))
    m = load_model(folder, device="cpu")
    assert m.sequence_length == (256 if length is None else 0) and m.t5_length == 0
    ours = sample(m, "a red dog", [5], SamplingParams(num_steps=4, guidance_scale=3.0, flow_sampler="ode",
                                                      eta=0.0)).trajectories[0].final
    stock = m.pipe("a red dog", num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                   output_type="latent", **({} if length is None else {"max_sequence_length": length})).images[0]
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_with_t5_a_keyword_past_clips_limit_maps_to_its_t5_tokens(pipelines_dir, tmp_path):
    """CLIP reads 77 tokens, T5 (here 256) reads further: a keyword only T5 sees gets its T5 positions; one beyond
    both limits is refused naming both."""
    import json
    import shutil

    from conftest import _load

    from dfusion_core.engine.loading import load_model

    _load("sd3-t5", pipelines_dir)
    folder = tmp_path / "sd3-t5-long"
    shutil.copytree(pipelines_dir / "sd3-t5", folder, symlinks=True)
    (folder / "dfusion.json").write_text(json.dumps({"max_sequence_length": 256}))
    m = load_model(folder, device="cpu")
    prompt = "a " * 80 + "dog"  # 'a': one CLIP token, two of the tiny T5's
    (group,) = m.family.token_groups(m, prompt, ["dog"])
    assert group and all(p >= 77 for p in group)  # T5's positions only: CLIP cut the word
    with pytest.raises(ValueError, match="beyond both text encoders"):
        m.family.token_groups(m, "a " * 200 + "cat", ["cat"])


def test_a_held_targets_exact_log_probs_come_from_the_fusion_calls(sd3, monkeypatch):
    """The plain model's pass over a held target runs as a third row group in the fused run's per-step calls (the
    reference one step ahead: steps + 1 calls), not as a second loop; the log-probs equal a separate recompute."""
    from dfusion_core.engine.sampling import recompute_log_probs

    fam, calls = sd3.family, []
    original = fam.forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fam, "forward", counting)
    mask = MaskParams(keywords=("dog",))
    res = fuse(sd3, "a red dog", 1, 2, SP, FusionParams(start_step=1, layers="all", hold_outside=True, mask=mask))
    assert len(calls) == SP.num_steps + 1
    monkeypatch.setattr(fam, "forward", original)
    torch.testing.assert_close(res.target.log_probs, recompute_log_probs(sd3, "a red dog", res.target, SP))
