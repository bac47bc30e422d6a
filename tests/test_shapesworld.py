"""ShapesWorld: grammar, splits, renderer and the ground-truth checker."""
import hashlib
import random

import numpy as np
import pytest

from dfusion_core.worlds.shapesworld.checker import check, estimate_background, parse_image, segment
from dfusion_core.worlds.shapesworld.render import draw_backdrop, render
from recipes.shapesworld.validate_checker import degrade_noise, validate
from dfusion_core.worlds.shapesworld.world import (COLOURS, FAMILIES, V1, V2, SceneStyle, parse_prompt, perturbations,
                                            prompt_list, prompts, split_of)


def test_test_combinations_never_appear_in_training():
    for fam in FAMILIES:
        train, test = prompts(fam, "train"), prompts(fam, "test")
        assert train and test
        if fam == "attribute":
            assert not {p.objects for p in train} & {p.objects for p in test}
        else:
            pair = lambda p: frozenset((o.colour, o.shape) for o in p.objects)
            assert not {pair(p) for p in train} & {pair(p) for p in test}


def test_every_word_of_the_test_split_is_seen_in_training():
    words = lambda ps: {w for p in ps for w in p.text.split()}
    for fam in FAMILIES:
        assert words(prompts(fam, "test")) <= words(prompts(fam, "train"))


def test_captions_parse_back():
    for fam in FAMILIES:
        for p in prompt_list(fam, "train", 10):
            assert parse_prompt(p.text.upper() + ".") == p
    assert parse_prompt("a dog driving a car") is None


@pytest.mark.parametrize("world", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("family", FAMILIES + ("simple",))
def test_rendered_scenes_satisfy_their_captions(family, world):
    rng = random.Random(1)
    for spec in random.Random(0).sample(prompts(family, "train") + (prompts(family, "test") if family != "simple" else []), 12):
        scene = render(spec, rng, world)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        v = check(scene.image, spec)
        assert v.correct, (spec.text, v.as_dict())
        for kind, wrong in perturbations(spec, rng).items():
            assert not check(scene.image, wrong).correct, (spec.text, kind, wrong.text)


def test_parser_finds_striped_and_hollow_objects_whole():
    rng = random.Random(3)
    for texture in ("striped", "hollow", "solid"):
        spec = parse_prompt(f"a red and {texture} circle")
        objs = parse_image(render(spec, rng).image)
        assert len(objs) == 1 and objs[0].texture == texture and objs[0].shape == "circle"


def test_blank_image_finds_nothing():
    v = check(np.full((64, 64, 3), 235, np.uint8), "the red circle above the blue square")
    assert not v.correct and v.n_found == 0 and v.relation_right is False


@pytest.mark.slow
def test_checker_validation_floors_on_a_sample():
    r = validate(150, seed=5)
    assert r["accept_true"] >= 0.98 and r["accept_perturbed"] <= 0.02


def test_v1_scenes_are_the_shipped_world_byte_for_byte():
    """The default world is version 1, drawn exactly as the shipped v1 models' training data was."""
    rng = random.Random(7)
    h = hashlib.sha256()
    for fam in FAMILIES + ("simple",):
        for spec in prompts(fam, "train")[:5]:
            scene = render(spec, rng)
            assert scene.style.version == 1 and scene.backdrop is None
            h.update(scene.image.tobytes())
    assert h.hexdigest()[:16] == "5bf2d4fead470fe2"


def test_v2_scene_is_reproducible_from_its_seed():
    spec = parse_prompt("the red circle above the blue square")
    a, b = render(spec, random.Random(11), V2), render(spec, random.Random(11), V2)
    assert np.array_equal(a.image, b.image) and a.backdrop == b.backdrop
    assert not np.array_equal(a.image, render(spec, random.Random(12), V2).image)
    with pytest.raises(ValueError):
        SceneStyle(version=4)


def test_v2_background_and_light_vary_while_the_caption_content_stays():
    """Backdrops differ from seed to seed; on one layout every backdrop leaves the objects and the
    checker's reading of them unchanged, and keeps clear of every object colour."""
    spec = parse_prompt("a purple square containing a yellow triangle")
    backdrops = [draw_backdrop(V2, random.Random(k)) for k in range(12)]
    means = np.array([bd.image().reshape(-1, 3).mean(0) for bd in backdrops])
    assert means.std(0).max() > 4 and len({bd.gain for bd in backdrops}) == 12
    palette = np.array(list(COLOURS.values()), np.float32)
    readings = set()
    for bd in backdrops:
        bg = bd.image().reshape(-1, 1, 3).astype(np.float32)
        assert np.linalg.norm(bg - palette[None] * np.array(bd.gain, np.float32), axis=-1).min() >= V2.min_bg_distance
        scene = render(spec, random.Random(3), V2, backdrop=bd)
        assert scene.backdrop is bd
        assert all(np.array_equal(o.mask, ref.mask) for o, ref in zip(scene.objects, render(spec, random.Random(3), V2).objects))
        objs = parse_image(scene.image)
        readings.add(tuple((o.colour, o.shape, o.texture, round(o.cx), round(o.cy)) for o in objs))
        assert check(scene.image, spec).correct
    assert len(readings) == 1


def test_checker_estimates_a_varying_background():
    rng = random.Random(4)
    for _ in range(10):
        scene = render(parse_prompt("the green triangle on the left of the black circle"), rng, V2)
        outside = ~np.any([o.mask for o in scene.objects], axis=0)
        err = np.abs(estimate_background(scene.image) - scene.backdrop.image().astype(np.float32))[outside]
        assert err.mean() < 6, err.mean()


@pytest.mark.slow
@pytest.mark.parametrize("world,degrade", [(2, None), (2, "noise"), (1, "noise")])
def test_checker_validation_floors_on_v2_and_noisy_renders(world, degrade):
    r = validate(300, seed=9, degrade=degrade, world=world)
    assert r["world"] == world and r["accept_true"] >= 0.98 and r["accept_perturbed"] <= 0.02, r


def test_blurred_edges_between_two_colours_are_not_a_third_object():
    """Red on blue blurs to purple-ish edge pixels (a plain nearest-colour rule labels ~35 of them purple),
    black on purple to pixels that also lie on the red-blue blend: the edge goes to one of its two sides."""
    nrng = np.random.default_rng(0)
    names = list(COLOURS)
    for text, third in (("a blue square containing a red circle", "purple"),
                        ("a black circle containing a purple circle", "blue")):
        spec = parse_prompt(text)
        for seed in range(6):
            img = degrade_noise(render(spec, random.Random(seed), V2).image, nrng)
            assert (segment(img) == names.index(third) + 1).sum() <= 3, (text, seed)
            assert check(img, spec).correct, (text, seed)


@pytest.mark.slow
def test_evaluation_and_model_card_run_end_to_end(sd1, tmp_path):
    """A tiny random model draws nothing right; the report still has every metric and the card every floor."""
    import json

    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.worlds.shapesworld.evaluate import auroc, evaluate, wilson, within_prompt_auroc
    from recipes.shapesworld.model_card import render as card

    ev = evaluate(sd1, scorer=lambda ims, ps: np.linspace(0, 1, len(ims)), n_prompts=1, seeds_per_prompt=2,
                  sampling=SamplingParams(num_steps=3, height=64, width=64))
    assert ev["samples"] == 6 and set(ev["families"]) == {"action", "attribute", "spatial", "all"}
    assert ev["families"]["all"]["accuracy_ci95"][1] > 0  # a Wilson interval, not a point
    text = card(ev, {"images": 10, "accept_true": 1.0, "accept_perturbed": 0.0}, None, tmp_path / "none.jsonl",
                tmp_path / "none.jsonl")
    assert "## Floors" in text and "checker finds the expected objects" in text
    log = tmp_path / "more.jsonl"
    log.write_text('{"stage": "unet", "step": 2500, "loss": 0.1}\n')
    text = card(ev, {"images": 10, "accept_true": 1.0, "accept_perturbed": 0.0}, None, log, log,
                prior_unet_steps=4500, vae_steps=1200, model_dir=tmp_path)  # a folder without transformer/: a UNet
    assert "trained 7,000 (4,500 + 2,500 continued) steps" in text and "trained 1200 steps" in text
    row = {"pairs": 24, "accept": 0.5, "ratio": 0.35, "ideal": 0.3, "excess": 0.07, "coverage": 0.6, "keep": 0.2,
           "moved": 0.6}
    fusion = {"candidates": 16, "table": {"default": {"spatial": row, "all": row},
                                          "global_from_step1": {"all": {**row, "keep": None, "moved": 0.7}}}}
    text = card(ev, {"images": 10, "accept_true": 1.0, "accept_perturbed": 0.0}, None, log, log, fusion=fusion)
    assert "| default | spatial | 24 | 0.50 | 0.35 | 0.30 | 0.07 | 0.60 | 0.20 | 0.60 |" in text
    assert "| default fusion: checker accepts >= 60% of targets on >= 60 pairs | 0.50 on 24 pairs | **not met** |" in text
    assert "| default fusion: median mask coverage <= 0.5 | 0.60 | **not met** |" in text
    assert "| default fusion: whole-image |target - base| / |reference - base| <= 0.4 | 0.35 | met |" in text
    assert "CLIP AUROC within a prompt" in text
    assert "global swap from step 1 moves the target >= 50% of the way | 0.70 | met |" in text
    json.dumps({k: v for k, v in ev.items() if k != "rows"})  # the summary is plain JSON
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auroc([0.5], [0.5]) == 0.5
    rows = [{"prompt": "p", "correct": True, "clip": 0.3}, {"prompt": "p", "correct": False, "clip": 0.2},
            {"prompt": "q", "correct": True, "clip": 0.1}, {"prompt": "q", "correct": False, "clip": 0.9},
            {"prompt": "q", "correct": False, "clip": 0.0}]
    assert within_prompt_auroc(rows) == (1 * 1 + 0.5 * 2) / 3  # p: 1 of 1 pairs right; q: 1 of 2
    assert auroc([0.3, 0.1], [0.2, 0.9, 0.0]) != within_prompt_auroc(rows)  # pooled mixes prompts
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi


def test_model_card_counts_steps_and_minutes_over_resumed_and_restarted_runs(tmp_path):
    """A model trained in several runs: a resumed run's clock goes on, a restarted one starts at 0 again, and the
    card sums the runs (the v3 model's log holds four); the scorer's steps likewise."""
    import json

    from recipes.shapesworld.model_card import _clip_steps, _training_minutes

    gen = tmp_path / "gen.jsonl"
    minutes = [10, 20, 25, 5, 15, 3]  # runs of 25, 15 and 3 minutes (the second restarted, the first resumed inside)
    gen.write_text("".join(json.dumps({"stage": "train", "step": i, "minutes": m}) + "\n" for i, m in enumerate(minutes)))
    assert _training_minutes(gen) == 43
    clip = tmp_path / "clip.jsonl"
    clip.write_text("".join(json.dumps({"stage": "clip", "step": s}) + "\n" for s in (25, 1000, 25, 300, 25, 400)))
    assert _clip_steps(clip) == 1700
    assert _training_minutes(tmp_path / "missing.jsonl") is None and _clip_steps(tmp_path / "missing.jsonl") is None


@pytest.mark.slow
def test_shipped_pipeline_and_scorer_load_offline_and_work():
    """The embedded default: an SD3-shaped StableDiffusion3Pipeline folder at the paper's mask resolution (world v3,
    patch 1: a 16x16 grid of image tokens; its second text encoder a link to the first) and an OpenCLIP folder,
    loaded without network; the v2 model (patch 2, 8x8 tokens) and the UNet model beside it share its text
    encoder, and v2 its autoencoder."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from dfusion_core.engine.loading import ASSETS, DEFAULT_MODEL, load_model
    from dfusion_core.engine.sampling import sample
    from dfusion_core.pairs.scoring import make_scorer
    from dfusion_core.worlds.shapesworld.world import parse_prompt

    # stock diffusers reads it as any SD3 folder without T5
    pipe = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_2 is not None and (DEFAULT_MODEL / "text_encoder_2").is_symlink()
    assert pipe.transformer.config.patch_size == 1 and pipe.text_encoder_3 is None
    model = load_model(device="cpu")
    assert model.kind == "sd3" and model.defaults["world_version"] == 3 and model.default_fusion().mask.dilate == 1
    prompt = "the red circle above the blue square"
    res = sample(model, prompt, [0, 1, 2, 3])
    assert res.images[0].size == (64, 64) and np.asarray(res.images[0]).std() > 5  # a picture, not a flat field
    scorer = make_scorer(None, device="cpu")
    wrong = "the blue circle above the red square"
    s = np.asarray(scorer([res.images[0], res.images[0]], [prompt, wrong]))
    assert np.isfinite(s).all() and s[0] != s[1]
    spec = parse_prompt(prompt)
    found = [check(np.asarray(im), spec).objects_found for im in res.images]
    assert sum(found) >= 1  # the checker parses generated scenes (rates per family: assets/MODEL_CARD.md)
    unet = StableDiffusionPipeline.from_pretrained(ASSETS / "shapesworld-unet")
    assert unet.scheduler.config.prediction_type == "v_prediction"
    assert (ASSETS / "shapesworld-unet" / "text_encoder").resolve() == (DEFAULT_MODEL / "text_encoder").resolve()
    v2 = load_model(ASSETS / "shapesworld-v2", device="cpu")
    assert v2.defaults["world_version"] == 2 and v2.denoiser.config.patch_size == 2
    assert (ASSETS / "shapesworld-v2" / "vae").resolve() == (DEFAULT_MODEL / "vae").resolve()
    assert sample(v2, prompt, [0]).images[0].size == (64, 64)


def test_twin_folders_become_one_folder_and_a_link(tmp_path):
    from recipes.shapesworld.train_mmdit import link_twin_folders

    for name, text in (("text_encoder", "w"), ("text_encoder_2", "w"), ("tokenizer", "a"), ("tokenizer_2", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.json").write_text(text)
    link_twin_folders(tmp_path)
    assert (tmp_path / "text_encoder_2").is_symlink() and (tmp_path / "text_encoder_2" / "f.json").read_text() == "w"
    assert not (tmp_path / "tokenizer_2").is_symlink()  # different files stay two folders
    link_twin_folders(tmp_path)  # idempotent
    assert (tmp_path / "text_encoder_2").is_symlink()


def test_retrain_installs_a_folder_atomically(tmp_path):
    from recipes.shapesworld.retrain import _install, main

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(); (src / "a.txt").write_text("new")
    dest.mkdir(); (dest / "old.txt").write_text("old")
    _install(src, dest)
    assert [p.name for p in dest.iterdir()] == ["a.txt"] and not (tmp_path / "dest.old").exists()
    with pytest.raises(SystemExit):
        main(["--stages", "generator,bogus"])
    with pytest.raises(SystemExit):
        main(["--world-version", "4", "--stages", "card"])  # worlds 1, 2 and 3 only


def test_fusion_transfer_metrics_on_known_images():
    """keep = |T-B| / |R-B| outside the fusion mask; moved = how far T went from B to R over the image."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from PIL import Image

    from dfusion_core.engine.config import FusionParams, SamplingParams
    from recipes.shapesworld.fusion_transfer import pair_metrics, summarise

    base = np.full((64, 64, 3), 200, np.uint8)
    ref = base.copy()
    ref[:32] = 0  # the reference differs from the base in the top half...
    ref[32:, :8] = 100  # ...and a little outside it
    tgt = base.copy()
    tgt[:32] = 0  # the target took the top half and kept the base elsewhere
    masks = torch.zeros(4, 8, 8)
    masks[:, :4] = 1  # the fusion mask: the top half
    res = SimpleNamespace(target_image=Image.fromarray(tgt), base_image=Image.fromarray(base),
                          reference_image=Image.fromarray(ref), masks=masks,
                          fusion=FusionParams(start_step=1), sampling=SamplingParams(num_steps=4))
    m = pair_metrics(res, "a red circle")
    assert m["keep"] == 0.0 and not m["accept"]
    full_gap = np.abs(ref.astype(float) - base).mean()
    assert abs(m["moved"] - (1 - np.abs(tgt.astype(float) - ref).mean() / full_gap)) < 1e-12
    table = summarise([{"form": "f", "family": "spatial", **m}, {"form": "f", "family": "spatial", **m}])
    assert table["f"]["spatial"]["pairs"] == 2 and table["f"]["spatial"]["keep"] == 0.0
    assert m["coverage"] == 0.5  # the top half
    assert abs(m["ratio"] - np.abs(tgt.astype(float) - base).mean() / full_gap) < 1e-12
    assert table["f"]["spatial"]["coverage"] == 0.5 and table["f"]["all"]["ratio"] == m["ratio"]
    # excess: the share of the off-object difference copied; a copy of the reference copies all of it
    copy = summarise([{"form": "c", "family": "spatial", **m, "ratio": 1.0, "ideal": 0.4}])
    half = summarise([{"form": "h", "family": "spatial", **m, "ratio": 0.7, "ideal": 0.4}])
    assert copy["c"]["all"]["excess"] == pytest.approx(1.0) and half["h"]["all"]["excess"] == pytest.approx(0.5)


def test_the_ideal_ratio_is_the_share_of_a_pairs_difference_on_its_objects():
    """An ideal fusion moves both images' objects and nothing else: on one backdrop that is all of the
    difference (1.0); on two backdrops the background's part of |R-B| is left out (< 1)."""
    from recipes.shapesworld.fusion_transfer import ideal_ratio

    base = render(parse_prompt("a red circle"), random.Random(1), V2).image.astype(float)
    same_backdrop = render(parse_prompt("a blue square"), random.Random(1), V2).image.astype(float)
    other_backdrop = render(parse_prompt("a blue square"), random.Random(2), V2).image.astype(float)
    assert ideal_ratio(base, same_backdrop) == pytest.approx(1.0)
    assert 0.05 < ideal_ratio(base, other_backdrop) < 0.95
    assert ideal_ratio(base, base) != ideal_ratio(base, base)  # no difference: undefined (nan)


def test_choose_form_needs_both_consistency_and_transfer(tmp_path):
    """The most accepted form among those whose whole-image ratio and median coverage are under their limits;
    a form copying the reference (ratio ~1, coverage 0.9) never wins however often it is accepted, nor does a
    consistent form that transfers nothing (v3 at step 2040: reference-only held, ratio 0.34, accepted 3%)."""
    import json

    from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams, apply_model_defaults, \
        fusion_defaults
    from recipes.shapesworld.fusion_transfer import choose_form, write_defaults

    row = lambda acc, ratio, cov: {"all": {"accept": acc, "ratio": ratio, "coverage": cov}}
    table = {"copy": row(0.95, 0.97, 0.9), "tight": row(0.62, 0.25, 0.3), "loose": row(0.7, 0.38, 0.45),
             "global_from_step1": row(0.99, 0.2, 0.1)}
    assert choose_form(table) == "loose"
    assert choose_form(table, max_ratio=0.3) == "tight"
    assert choose_form({"copy": row(0.95, 0.97, 0.9)}) is None
    assert choose_form({"base_copy": row(0.03, 0.34, 0.11), "copy": row(0.95, 0.97, 0.9)}) is None
    assert choose_form({"base_copy": row(0.03, 0.34, 0.11)}, min_accept=0.0) == "base_copy"
    # by excess: a form whose ratio is high only because the objects carry the pair's difference qualifies
    ex = lambda acc, ratio, cov, excess: {"all": {**row(acc, ratio, cov)["all"], "excess": excess}}
    objects = {"objects": ex(0.65, 0.62, 0.4, 0.05), "copy": ex(0.95, 0.97, 0.9, 0.9)}
    assert choose_form(objects) is None and choose_form(objects, max_excess=0.15) == "objects"
    fp = FusionParams(start_step=2, layers="all", hold_outside=True, mask=MaskParams(union_base=True, dilate=1))
    (tmp_path / "dfusion.json").write_text(json.dumps({"guidance_scale": 3.0}))
    data = write_defaults(tmp_path, "loose", fp)
    assert data["guidance_scale"] == 3.0 and data["fusion_form"] == "loose"
    s, m = apply_model_defaults(json.loads((tmp_path / "dfusion.json").read_text()), SamplingParams(), MaskParams())
    back = fusion_defaults(data, m)
    assert (back.start_step, back.layers, back.hold_outside, back.mask.union_base, back.mask.dilate) == \
        (2, "all", True, True, 1)


@pytest.mark.slow
def test_clip_training_contrasts_captions_with_near_miss_images(tmp_path):
    """train_clip runs on world v3 with a rendered near miss per caption (a perturbed caption or one of two
    objects alone, never the caption itself), logs, checkpoints and exports an open_clip folder."""
    import json
    import random

    from recipes.shapesworld.train_clip import near_miss, train
    from dfusion_core.worlds.shapesworld.world import prompts

    rng = random.Random(0)
    for spec in prompts("spatial", "train")[:20] + prompts("attribute", "train")[:20]:
        miss = near_miss(spec, rng)
        assert miss.text != spec.text
        if miss.family == "simple":
            assert miss.objects[0].colour in {o.colour for o in spec.objects}
    train(tmp_path, steps=25, batch=4, lr=1e-3, vae_ckpt=None, threads=1, world_version=3)
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 25 and 0 <= row["acc"] <= 1
    assert (tmp_path / "model" / "open_clip_model.safetensors").is_file() and (tmp_path / "clip.pt").is_file()
    from safetensors.torch import load_file

    started = train(tmp_path / "again", steps=0, batch=4, lr=1e-3, vae_ckpt=None, threads=1, world_version=3,
                    init=str(tmp_path / "model"))  # --init: the exported weights as the start
    exported = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    assert all(bool((started.state_dict()[k] == v.float()).all()) for k, v in exported.items())


def test_v3_scenes_are_v2_scenes_with_smaller_objects():
    """Version 3 keeps v2's variation and every relation (the checker accepts its true captions) with objects at
    3/4 of the size: about 0.56 of the area."""
    import random

    from dfusion_core.worlds.shapesworld.checker import check
    from dfusion_core.worlds.shapesworld.render import render
    from dfusion_core.worlds.shapesworld.world import V2, V3, prompts, scene_style

    assert scene_style(3) == V3 and V3.object_scale == 0.75
    areas = {2: [], 3: []}
    for fam in ("action", "attribute", "spatial"):
        for i, spec in enumerate(prompts(fam, "train")[:8]):
            for v, style in ((2, V2), (3, V3)):
                scene = render(spec, random.Random(i), style)
                areas[v].append(sum(int(o.mask.sum()) for o in scene.objects))
                if v == 3:
                    assert check(scene.image, spec.text).correct, spec.text
    ratio = sum(areas[3]) / sum(areas[2])
    assert 0.45 < ratio < 0.7, ratio


def test_stratified_prompt_lists_span_every_relation_and_texture_and_do_not_overlap():
    """The evidence's TRAIN prompts span every texture and relation (4 random attribute prompts had hollow and
    striped only); its validation prompts come after them in the same order, so none is trained on."""
    from dfusion_core.worlds.shapesworld.world import FAMILIES, prompts, stratified_prompt_list

    for fam in FAMILIES:
        train = stratified_prompt_list(fam, "train", 16)
        val = stratified_prompt_list(fam, "train", 6, offset=16)
        assert len(train) == 16 and len(val) == 6 and not {p.text for p in train} & {p.text for p in val}
        key = (lambda p: p.objects[0].texture) if fam == "attribute" else (lambda p: p.relation)
        assert {key(p) for p in train} == {key(p) for p in prompts(fam, "train")}
        assert {key(p) for p in stratified_prompt_list(fam, "test", 24)} == {key(p) for p in prompts(fam, "test")}
        assert stratified_prompt_list(fam, "train", 22) == train + val  # one fixed order


def test_a_sample_bank_measures_within_prompt_auroc_with_an_interval_over_prompts(tmp_path):
    """A bank round-trips through its file; only prompts with both verdicts count; the AUROC weighs pairs
    equally and its interval resamples prompts (one prompt: no spread)."""
    from recipes.shapesworld.sample_bank import Bank, within_prompt_auroc

    grey = lambda v: np.full((8, 8, 3), v, np.uint8)
    bank = Bank.empty().extend([grey(200), grey(10), grey(30)], ["p", "p", "p"], ["action"] * 3, [0, 1, 2],
                               [True, False, False])
    bank = bank.extend([grey(50), grey(60), grey(90)], ["q", "q", "q"], ["spatial"] * 3, [0, 1, 2], [True, True, False])
    bank = bank.extend([grey(5)], ["r"], ["spatial"], [0], [True])  # all correct: no pair
    bank.save(tmp_path / "b.npz")
    back = Bank.load(tmp_path / "b.npz")
    assert back.images.shape == (7, 8, 8, 3) and back.correct.tolist() == bank.correct.tolist()
    assert [p for p, _, _ in back.ranked_prompts()] == ["p", "q"]
    brightness = lambda ims, prompts: [float(np.mean(im)) for im in ims]
    res = within_prompt_auroc(back, brightness)
    assert res["action"] == {"auroc": 1.0, "pairs": 2, "prompts": 1, "ci95": [1.0, 1.0]}
    assert res["spatial"]["auroc"] == 0.0 and res["spatial"]["pairs"] == 2  # q's correct samples are darker
    assert res["all"]["auroc"] == 0.5 and res["all"]["prompts"] == 2
    lo, hi = res["all"]["ci95"]
    assert lo == 0.0 and hi == 1.0  # two prompts that disagree completely
