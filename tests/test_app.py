"""The app end to end through gradio_client, on a tiny pipeline: sample, fuse, live re-fusion, labels."""
import re
import threading

import pytest
from conftest import launch_app

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app_url(sd1, tmp_path_factory):
    from app.service import AppService
    svc = AppService(sd1, store_dir=tmp_path_factory.mktemp("store"),
                     scorer=lambda ims, ps: [sum(im.convert("L").getdata()) / (255 * im.width * im.height) for im in ims])
    url, demo = launch_app(svc)
    yield url, svc
    demo.close()
    if "+lora:" in svc.model.model_id:  # sd1 is shared by the whole session: hand it back untuned
        svc.unload_trained()


def _fuse_args(base="0", ref="1", mode="auto", thr=0.5, start=2, end=4, use_mask=True, keywords=("red", "dog")):
    return ("a red dog", 4, 2.0, 1.0, base, ref, list(keywords), mode, thr, start, end, "mid+up", "smooth", use_mask, "red")


def test_sample_fuse_refuse_label_undo(app_url):
    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    gallery, base, ref, words, kws = c.predict("a red dog", 4, 2.0, 1.0, 4, 0, api_name="/sample")
    assert len(gallery) == 4 and "seed" in gallery[0]["caption"]
    assert base != ref and kws["value"] == ["red", "dog"]
    out = c.predict(*_fuse_args(base, ref), api_name="/fuse")
    assert "one batched run" in out[-1] and "CLIP score" in out[-2]
    out = c.predict(*_fuse_args(base, ref, mode="relative", thr=0.4), api_name="/refuse_threshold")
    assert "cache (target branch only)" in out[-1]
    took = re.search(r"· ([0-9.]+) s$", out[-1])  # the server's own time, read by benchmarks/app_latency.py
    assert took and 0 < float(took.group(1)) < 60, out[-1]
    out = c.predict(*_fuse_args(base, ref, mode="relative", thr=0.4), "union", api_name="/refuse_combine")
    assert "cache (target branch only)" in out[-1] and svc.store is not None
    out = c.predict(*_fuse_args(base, ref, mode="relative", thr=0.4, end=3), "union", api_name="/refuse_end_step")
    assert "3 of 4 steps reused" in out[-1], out[-1]  # only the end moved: the last step alone is computed
    n0 = len(svc.store)
    assert "saved pair" in c.predict(api_name="/label_target")
    assert len(svc.store) == n0 + 1
    assert "removed pair" in c.predict(api_name="/undo")
    assert len(svc.store) == n0
    assert c.predict(api_name="/label_skip") == "skipped"


@pytest.mark.parametrize("args,msg", [
    (_fuse_args(base="abc"), "base seed must be an integer"),
    (_fuse_args(base="3", ref="3"), "same seed"),
    (_fuse_args(start=4, end=2), "starts at step 4, after its end"),
    (_fuse_args(keywords=()), "no keyword selected"),
    (("", 4, 2.0, 1.0, "0", "1", ["red"], "auto", 0.5, 2, 4, "mid+up", "smooth", True, "red"), "prompt is empty"),
    (("a red dog", 4, 2.0, 1.0, "0", "1", ["horse"], "auto", 0.5, 2, 4, "mid+up", "smooth", True, "red"), "horse"),
])
def test_bad_input_is_a_message_and_the_app_keeps_working(app_url, args, msg):
    url, _ = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")  # as the browser does on load: the word choices of the prompt
    with pytest.raises(Exception, match=msg):
        c.predict(*args, api_name="/fuse")
    assert c.predict(*_fuse_args("5", "6"), api_name="/fuse")[-1].startswith("fused")


def test_labelling_before_fusing_is_explained(app_url):
    c = gradio_client.Client(app_url[0], verbose=False)
    with pytest.raises(Exception, match="fuse a pair first"):
        c.predict(api_name="/label_target")


def test_two_clients_do_not_share_state(app_url):
    url, svc = app_url
    results = {}

    def client(name, base, ref):
        c = gradio_client.Client(url, verbose=False)
        c.predict("a red dog", api_name="/words")
        c.predict(*_fuse_args(base, ref), api_name="/fuse")
        results[name] = c.predict(api_name="/label_tie")

    ts = [threading.Thread(target=client, args=(n, b, r)) for n, b, r in [("a", "7", "8"), ("b", "9", "10")]]
    [t.start() for t in ts]
    [t.join(timeout=120) for t in ts]
    ids = {results[n].split()[2] for n in ("a", "b")}
    assert len(ids) == 2  # each session labelled its own pair
    assert all(svc.store.get(pid).label == "tie" for pid in ids)
    bases = sorted(svc.store.get(pid).base_seed for pid in ids)
    assert bases == [7, 9]


def test_ablation_export_import_and_a_background_fine_tune(app_url, tmp_path):
    import time

    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    with pytest.raises(Exception, match="fuse a pair first"):
        c.predict(api_name="/ablation")
    for base, ref in (("20", "21"), ("22", "23")):
        c.predict(*_fuse_args(base, ref), api_name="/fuse")
        c.predict(api_name="/label_target")
    gallery, _ = c.predict(api_name="/ablation")
    assert len(gallery) == 10 and "no mask" in gallery[1]["caption"] and gallery[-1]["caption"].startswith("keywords union")
    assert "exported" in c.predict(str(tmp_path / "exp"), api_name="/export")
    msg, _ = c.predict(str(tmp_path / "exp"), "", "any", api_name="/import")
    assert msg.startswith("imported")
    with pytest.raises(Exception, match="not in the list of choices"):
        c.predict("sft", 4, 1e-4, 5000, 3, api_name="/train")
    assert "started dpo" in c.predict("dpo", 4, 1e-3, 5000, 3, api_name="/train")
    deadline = time.time() + 240
    while time.time() < deadline:
        status, frac, _ = c.predict(api_name="/train_status")
        if not status.startswith("running"):
            break
        time.sleep(2)
    assert status.startswith("done: step 3/3"), status
    assert "loaded" in c.predict(api_name="/load_trained")
    assert "+lora:" in svc.model.model_id
    assert c.predict(*_fuse_args("5", "6"), api_name="/fuse")[-1].startswith("fused in one batched run")  # cache cleared
    assert c.predict(api_name="/unload_trained").startswith("back to ")
    assert svc.model.model_id == svc.model_source and not svc.model.pipe.get_list_adapters().get("unet")
    assert c.predict(*_fuse_args("5", "6"), api_name="/fuse")[-1].startswith("fused in one batched run")  # cache cleared
    with pytest.raises(Exception, match="no fine-tuned weights are loaded"):
        c.predict(api_name="/unload_trained")


def test_dataset_tab_lists_relabels_and_deletes_through_the_service(app_url):
    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    c.predict(*_fuse_args("30", "31"), api_name="/fuse")
    pid = c.predict(api_name="/label_base").split()[2]
    table = c.predict("red dog", "base", api_name="/list_pairs")
    assert table["headers"][:3] == ["pair_id", "prompt", "label"] and [pid, "a red dog", "base"] in [
        r[:3] for r in table["data"]]
    msg, table = c.predict(pid, "tie", "red dog", "base", api_name="/relabel")
    assert msg == f"pair {pid} relabelled 'tie'" and pid not in [r[0] for r in table["data"]]
    assert svc.store.get(pid, with_images=False).label == "tie"
    msg, table, _, _ = c.predict(pid, "", "any", api_name="/delete_pair")
    assert msg == f"pair {pid} deleted" and pid not in [r[0] for r in table["data"]]
    for args, name in (((pid, "target", "", "any"), "/relabel"), ((pid, "", "any"), "/delete_pair")):
        with pytest.raises(Exception, match="no pair"):
            c.predict(*args, api_name=name)
    with pytest.raises(Exception, match="click a row first"):
        c.predict("", "", "any", api_name="/delete_pair")


@pytest.mark.parametrize("values", [("dpo", 4, 1e-3, 5000, 3), ("traj-dpo", 8, 1e-4, 0.2, 100), ("ddpo", 2, 1e-4, 1, 20)])
def test_the_train_tab_config_reaches_the_trainer_child_unchanged(sd1, tmp_path, values):
    """The job hands the child the TrainConfig as CLI flags; the CLI reads them back into the same config."""
    from dataclasses import fields

    from app.jobs import config_flags
    from app.service import AppService
    from dfusion_core.cli import build_parser
    from dfusion_core.training.trainer import TrainConfig

    cfg = AppService(sd1, store_dir=tmp_path / "store").train_config(*values)
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", *config_flags(cfg)])
    assert TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)
                          if getattr(a, f.name, None) is not None}) == cfg


def test_train_tab_refuses_deterministic_pairs_for_trajectory_methods(sd1, tmp_path):
    from app.service import AppService, UserError
    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.pairs import PairingParams, build_pairs

    svc = AppService(sd1, store_dir=tmp_path / "store", runs_dir=tmp_path / "runs")
    scorer = lambda ims, ps: [float(i) for i in range(len(ims))]  # noqa: E731 - distinct scores, any order
    for rec in build_pairs(sd1, ["a red dog"], scorer, SamplingParams(num_steps=3, eta=0.0),
                           pairing=PairingParams(num_candidates=4)):
        svc.store.add(rec, "target")
    url, demo = launch_app(svc)
    try:
        with pytest.raises(UserError, match=r"ddpo .*sampled with eta = 0"):
            svc.train_start(svc.train_config("ddpo", 4, 1e-4, 0.1, 2))
        with pytest.raises(Exception, match=r"traj-dpo .*sampled with eta = 0") as shown:  # the Train tab's toast
            gradio_client.Client(url, verbose=False).predict("traj-dpo", 4, 1e-4, 0.1, 2, api_name="/train")
        assert "Traceback" not in str(shown.value) and "internal error" not in str(shown.value)
        assert svc.job is None  # nothing was started
    finally:
        if svc.job is not None:
            svc.job.cancel()
        demo.close()


def test_scores_are_shown_side_by_side_without_a_winner_and_an_empty_mask_is_said(app_url, monkeypatch):
    url, svc = app_url
    monkeypatch.setattr(svc, "scorer", lambda ims, ps: [0.9, 0.5, 0.2][-len(ims):])  # the target scores lowest
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    out = c.predict(*_fuse_args("40", "41", mode="absolute", thr=1.0), api_name="/fuse")  # no probability above 1
    assert "mask covers 0%" in out[-1]
    assert "the mask is empty" in out[-2] and "identical" in out[-2]  # nothing to prefer: said so
    out = c.predict(*_fuse_args("40", "41"), api_name="/fuse")
    scores = out[-2]
    assert "winner" not in scores.lower() and "mask is empty" not in scores
    header, _, row = scores.splitlines()[:3]
    assert header.split("|")[2:5] == [" Base ", " Reference ", " Target "] and row.startswith("| CLIP score |")
    assert [float(v) for v in row.split("|")[2:5]] == [0.9, 0.5, 0.2]
    assert "scorer: base higher by 0.700" in scores  # said as it is, the target named no better than it scored


def test_score_text_and_pair_notes_say_what_scorer_and_checker_say():
    from PIL import Image

    from app.views import pair_notes, score_text

    im, other = Image.new("RGB", (4, 4), (1, 2, 3)), Image.new("RGB", (4, 4), (1, 2, 4))
    text = score_text({"base": 0.61, "reference": 0.5, "target": 0.4, "base checker": 1.0, "reference checker": 0.0,
                       "target checker": 0.0})
    assert "| ground-truth checker | ✓ | ✗ | ✗ |" in text
    assert "scorer: base higher by 0.210" in text and "checker: only the base passes" in text
    assert pair_notes(0.0, im, im.copy())[0].startswith("the mask is empty")
    assert "identical" in pair_notes(0.3, im, im.copy())[0] and pair_notes(0.3, im, other) == []
    assert pair_notes(None, im, other) == [] and score_text({}) == "_no scorer loaded_"


@pytest.mark.parametrize("combine", ["mean", "union"])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_threshold_slider_spans_where_the_engine_mask_changes(mode, combine):
    """At the slider's minimum the engine's mask (masks.keyword_mask) is all but the lowest position, at its
    maximum empty; a value chosen for a coverage gives about that coverage; auto and no mask: slider off."""
    import torch

    from app.views import threshold_slider
    from dfusion_core.engine.masks import keyword_mask

    g = torch.Generator().manual_seed(0)
    kmaps = torch.rand(2, 16, 16, generator=g) ** 3 * 0.3  # skewed like attention probabilities
    s = threshold_slider(mode, 0.5, kmaps.numpy(), combine, coverage=0.25)
    assert s["interactive"] and s["maximum"] - s["minimum"] < (0.5 if mode == "absolute" else 1.0)
    cover = {t: float(keyword_mask(kmaps, mode, t, combine).float().mean()) for t in (s["minimum"], s["maximum"])}
    assert cover[s["minimum"]] >= 1 - 2 / 256 and cover[s["maximum"]] == 0.0, cover
    assert abs(float(keyword_mask(kmaps, mode, s["value"], combine).float().mean()) - 0.25) < 0.03
    assert not threshold_slider("auto", 0.5, kmaps.numpy(), combine)["interactive"]
    assert not threshold_slider(mode, 0.5, kmaps.numpy(), combine, use_mask=False)["interactive"]


def test_a_refused_fusion_is_a_validation_error_naming_the_input_before_any_model_call(app_url, monkeypatch):
    from gradio_client.exceptions import ValidationError

    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    c.predict(*_fuse_args("50", "51"), api_name="/fuse")  # a fused pair: the live controls are checked too
    calls = []
    monkeypatch.setattr(svc.model_thread, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(ValidationError, match=r"- p: .*prompt is empty"):
        c.predict("", 4, 2.0, 1.0, "0", "1", ["red"], "auto", 0.5, 2, 4, "mid+up", "smooth", True, None,
                  api_name="/fuse")
    with pytest.raises(ValidationError, match=r"- start: .*starts at step 4, after its end"):
        c.predict(*_fuse_args(start=4, end=2), api_name="/refuse_start_step")  # a live control: the same rule
    assert calls == []
