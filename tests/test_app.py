"""The app end to end through gradio_client, on a tiny pipeline: sample, fuse, live re-fusion, labels."""
import json
import re
import threading
from pathlib import Path

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
    for name in list(svc.model.lora_folders):  # sd1 is shared by the whole session: hand it back untuned
        svc.model.unload_lora(name)
    svc.model.use_lora(None)


def _pixels(out) -> list:
    """Images of a gradio_client answer (file paths, or gallery items) as arrays."""
    import numpy as np
    from PIL import Image

    paths = [o["image"] if isinstance(o, dict) else o for o in out]
    return [np.asarray(Image.open(p["path"] if isinstance(p, dict) else p)) for p in paths]


def _same(xs, ys) -> list[bool]:
    return [x.shape == y.shape and (x == y).all() for x, y in zip(xs, ys, strict=True)]


def _fuse_args(base="0", ref="1", mode="auto", thr=0.5, start=2, end=4, use_mask=True, keywords=("red", "dog")):
    return ("a red dog", 4, 2.0, 1.0, base, ref, list(keywords), mode, thr, start, end, "mid+up", "smooth", use_mask, "red")


@pytest.mark.slow
def test_sample_fuse_refuse_label_undo(app_url):
    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    gallery, base, ref, words, kws, note = c.predict("a red dog", 4, 2.0, 1.0, 4, 0, api_name="/sample")
    assert len(gallery) == 4 and "seed" in gallery[0]["caption"]
    assert note == f"Suggested pair: BASE seed {base}, REF seed {ref} (the lowest and highest score)."  # no checker
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


def test_the_fuse_tab_sets_the_mask_form_and_shows_the_mask_it_used(app_url):
    """Reference-union-base, growth and holding the base outside are Fuse controls (the model's dfusion.json sets
    their start); the mask shown is the one the fusion used, grown by the dilation."""
    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    plain = c.predict(*_fuse_args(), "mean", False, 0, False, api_name="/fuse")
    assert "reference ∪ base" not in plain[-1] and "held" not in plain[-1]
    out = c.predict(*_fuse_args(), "mean", True, 1, True, api_name="/fuse")
    assert "reference ∪ base · base held outside" in out[-1], out[-1]
    covered = lambda msg: int(re.search(r"mask covers (\d+)%", msg).group(1))
    assert covered(out[-1]) > covered(plain[-1])  # the union, grown one cell, covers more than the reference's
    assert svc.default_fusion.hold_outside is False  # the tiny model's dfusion.json names no form: the paper's
    with pytest.raises(Exception, match="dilate must be 0..16"):
        c.predict(*_fuse_args(), "mean", True, 40, True, api_name="/fuse")
    from dataclasses import replace

    svc.default_mask = replace(svc.default_mask, dilate_base=1)  # a model whose dfusion.json grows the base's part
    try:
        grown = c.predict(*_fuse_args(), "mean", True, 0, True, api_name="/fuse")
    finally:
        svc.default_mask = replace(svc.default_mask, dilate_base=0)
    assert "reference ∪ base (the base's grown 1 more) · base held outside" in grown[-1], grown[-1]


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_ablation_needs_a_pair_and_the_train_tab_an_algorithm_it_knows(app_url, tmp_path):
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
    with pytest.raises(Exception, match="not in the list of choices"):
        c.predict("sft", 4, 1e-4, 5000, 3, api_name="/train")


PLAIN_PAIR = ("60", "61")  # fused with the base weights before any fine-tune exists


@pytest.fixture(scope="module")
def tuning(app_url):
    """Client A's session labels two pairs and starts a 3-step fine-tune (not waited for); before that, the
    plain pair PLAIN_PAIR fused with the base weights. (client A, /train's answer, plain images)"""
    url, _ = app_url
    a = gradio_client.Client(url, verbose=False)
    a.predict("a red dog", api_name="/words")
    plain = _pixels(a.predict(*_fuse_args(*PLAIN_PAIR), api_name="/fuse")[:3])  # base, reference, target
    for base, ref in (("62", "63"), ("64", "65")):
        a.predict(*_fuse_args(base, ref), api_name="/fuse")
        a.predict(api_name="/label_target")
    return a, a.predict("dpo", 4, 5e-2, 5000, 3, api_name="/train"), plain


def _trained(c) -> str:
    """Wait for client c's fine-tune to finish; the run folder its status line names."""
    import time

    deadline = time.time() + 600  # a child process on a loaded 2-core machine
    status, progress, _ = c.predict(api_name="/train_status")
    while time.time() < deadline and status.startswith("running"):
        time.sleep(1)
        status, progress, _ = c.predict(api_name="/train_status")
    assert status.startswith("done: step 3/3") and "weights ready" in status, status
    assert "100% done" in progress
    return status.split("run folder ")[1].split(" · ")[0]


@pytest.mark.slow
def test_a_fine_tune_and_its_status_belong_to_the_session_that_started_it(app_url, tuning, monkeypatch):
    url, svc = app_url
    a, (msg, status, progress, _), _ = tuning
    assert msg.startswith("started dpo on ") and "the run's folder (log, checkpoints, LoRA weights) is dpo-" in msg
    assert str(svc.runs_dir.resolve()) not in msg + status  # the run folder by its name: no server path on the page
    assert status.startswith("running: step 0/3") and "run folder" in status and "<progress" in progress
    b = gradio_client.Client(url, verbose=False)
    assert b.predict(api_name="/train_status")[0].startswith("no fine-tune started in this session; runs are written under")
    with pytest.raises(Exception, match="no fine-tune of this session is running"):
        b.predict(api_name="/train_cancel")
    with pytest.raises(Exception, match="no fine-tune of this session to resume"):
        b.predict(api_name="/train_resume")
    with pytest.raises(Exception, match="this session's fine-tune is still running"):
        a.predict("dpo", 4, 1e-3, 5000, 3, api_name="/train")
    monkeypatch.setattr(svc, "max_jobs", 1)
    with pytest.raises(Exception, match="the app already runs 1 fine-tune for other sessions"):
        b.predict("dpo", 4, 1e-3, 5000, 3, api_name="/train")
    folder = _trained(a)
    with pytest.raises(Exception, match="no trained weights yet"):
        b.predict(api_name="/load_trained")
    assert b.predict(api_name="/train_status")[0].startswith("no fine-tune started in this session")
    assert folder in a.predict(api_name="/train_status")[0]


@pytest.mark.slow
def test_each_session_fuses_and_labels_with_its_own_weights(app_url, tuning):
    """After A loads its LoRA, B keeps fusing (and labelling) with the base weights, bit for bit, while A's pair
    changes; each stored pair names the weights that made it; each weights' cached reference serves only them."""
    url, svc = app_url
    a, _, plain = tuning
    folder = _trained(a)
    b = gradio_client.Client(url, verbose=False)
    b.predict("a red dog", api_name="/words")
    msg, line = a.predict(api_name="/load_trained")
    assert folder in msg and folder in line and "fine-tuned LoRA" in line
    out = a.predict(*_fuse_args(*PLAIN_PAIR), api_name="/fuse")
    assert "one batched run" in out[-1]  # the base weights' cached reference of this pair was not used
    assert _same(_pixels(out[:3]), plain) == [False] * 3
    out = b.predict(*_fuse_args(*PLAIN_PAIR, thr=0.4), api_name="/fuse")
    assert "cache (target branch only)" in out[-1] and _same(_pixels(out[:2]), plain[:2]) == [True] * 2
    out = a.predict(*_fuse_args(*PLAIN_PAIR, thr=0.4), api_name="/refuse_threshold")
    assert "cache (target branch only)" in out[-1]  # B's fusion in between evicted nothing of A's
    svc.cache.clear()  # next: a whole batched run, as the plain pair was (the same rows: the same bits)
    assert _same(_pixels(b.predict(*_fuse_args(*PLAIN_PAIR), api_name="/fuse")[:3]), plain) == [True] * 3
    ids = {name: c.predict(api_name="/label_base").split()[2] for name, c in (("a", a), ("b", b))}
    assert svc.store.get(ids["b"], with_images=False).model_id == svc.model_source
    assert svc.store.get(ids["a"], with_images=False).model_id == f"{svc.model_source}+lora:{svc.runs_dir.resolve() / folder}"
    msg, line = a.predict(api_name="/unload_trained")
    assert msg.startswith("back to the base weights") and line.startswith("This session computes with the base")
    svc.cache.clear()
    assert _same(_pixels(a.predict(*_fuse_args(*PLAIN_PAIR), api_name="/fuse")[:3]), plain) == [True] * 3
    with pytest.raises(Exception, match="no fine-tuned weights are loaded in this session"):
        b.predict(api_name="/unload_trained")


@pytest.mark.slow
def test_before_is_the_base_weights_and_after_the_lora_loaded_or_not(app_url, tuning, monkeypatch):
    """'Before' equals what a base-weights session samples, whether or not A's session fuses with its LoRA;
    'after' differs; comparing leaves A's weights as they were."""
    url, svc = app_url
    a, _, _ = tuning
    _trained(a)
    prompts = svc.example_prompts()[:2]  # typed: the compared prompts (seeds 0 and 1)
    b = gradio_client.Client(url, verbose=False)
    s = svc.default_sampling
    plain = []
    for p in prompts:
        plain += _pixels(b.predict(p, s.num_steps, s.guidance_scale, s.eta, 2, 0, api_name="/sample")[0])
    a.predict(api_name="/load_trained")
    for loaded in (True, False):
        items, shown, rows = a.predict("\n".join(prompts), api_name="/before_after")
        assert shown.splitlines() == prompts and rows.startswith("Rows: 1. " + prompts[0])
        before = [it for it in items if it["caption"].startswith("before")]
        after = [it for it in items if it["caption"].startswith("after")]
        assert len(before) == len(after) == len(plain) == 4
        assert [it["caption"].split(" · ")[:2] for it in items[:4]] == [["before", "s0"], ["before", "s1"],
                                                                         ["after", "s0"], ["after", "s1"]]
        assert _same(_pixels(before), plain) == [True] * 4, loaded
        assert not any(_same(_pixels(after), plain)), loaded
        if loaded:  # the comparison left the session's LoRA on: unloading it works
            assert a.predict(api_name="/unload_trained")[0].startswith("back to the base weights")
    with pytest.raises(Exception, match="no fine-tuned weights are loaded in this session"):
        a.predict(api_name="/unload_trained")  # nor did it switch the base session to the LoRA


@pytest.mark.slow
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
    assert msg.startswith(f"pair {pid} deleted") and pid not in [r[0] for r in table["data"]]
    for args, name in (((pid, "target", "", "any"), "/relabel"), ((pid, "", "any"), "/delete_pair")):
        with pytest.raises(Exception, match="no pair"):
            c.predict(*args, api_name=name)
    with pytest.raises(Exception, match="click a row first"):
        c.predict("", "", "any", api_name="/delete_pair")


@pytest.mark.slow
def test_dataset_tab_exports_a_download_imports_an_upload_with_a_report_and_undoes_a_delete(app_url, tmp_path):
    import zipfile
    from pathlib import Path

    from gradio_client import handle_file

    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    c.predict(*_fuse_args("60", "61"), api_name="/fuse")
    pid = c.predict(api_name="/label_tie").split()[2]
    ids = lambda table: [r[0] for r in table["data"]]  # noqa: E731
    msg, path = c.predict(api_name="/export")  # a download, not a folder on the server
    n = len(svc.store)
    assert msg.startswith(f"exported {n} pairs") and path.endswith(".zip")
    names = zipfile.ZipFile(path).namelist()
    assert any(f.endswith("/pairs.parquet") for f in names) and any(f.endswith(f"/{pid}.safetensors") for f in names)
    report, _ = c.predict(handle_file(path), "", "any", api_name="/import")  # the set again: nothing new
    assert report.startswith(f"imported 0 pairs from {Path(path).name}, skipped {n} (duplicates), 0 failed"), report
    msg, table, _, _ = c.predict(pid, "", "any", api_name="/delete_pair")
    assert "Undo delete" in msg and pid not in ids(table)
    msg, table = c.predict("", "any", api_name="/undo_delete")
    assert msg == f"pair {pid} restored as 'tie'" and pid in ids(table) and svc.store.get(pid).label == "tie"
    with pytest.raises(Exception, match="nothing deleted to undo"):
        c.predict("", "any", api_name="/undo_delete")
    svc.store.delete(pid)  # gone from the set: the uploaded archive brings it back, reported per index file
    report, table = c.predict(handle_file(path), "", "any", api_name="/import")
    assert report.startswith("imported 1 pair from") and "/pairs.jsonl: 1 imported" in report and pid in ids(table)
    assert len(svc.store) == n
    bad = tmp_path / "notes.zip"
    bad.write_text("not an archive")
    report, table = c.predict(handle_file(str(bad)), "", "any", api_name="/import")  # said in the report's place
    assert report.startswith("import failed:") and "neither a folder nor a readable .zip" in report, report
    assert "internal error" not in report and len(svc.store) == n  # the table is left as it was (no update)


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


@pytest.mark.slow
def test_train_tab_refuses_deterministic_pairs_for_trajectory_methods(sd1, tmp_path):
    from app.service import AppService, Session, UserError
    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.pairs.build import PairingParams, build_pairs

    svc = AppService(sd1, store_dir=tmp_path / "store", runs_dir=tmp_path / "runs")
    scorer = lambda ims, ps: [float(i) for i in range(len(ims))]  # noqa: E731 - distinct scores, any order
    for rec in build_pairs(sd1, ["a red dog"], scorer, SamplingParams(num_steps=3, eta=0.0),
                           pairing=PairingParams(num_candidates=4)):
        svc.store.add(rec, "target")
    url, demo = launch_app(svc)
    try:
        with pytest.raises(UserError, match=r"ddpo .*sampled with eta = 0"):
            svc.train_start(Session(), svc.train_config("ddpo", 4, 1e-4, 0.1, 2))
        with pytest.raises(Exception, match=r"traj-dpo .*sampled with eta = 0") as shown:  # the Train tab's toast
            gradio_client.Client(url, verbose=False).predict("traj-dpo", 4, 1e-4, 0.1, 2, api_name="/train")
        assert "Traceback" not in str(shown.value) and "internal error" not in str(shown.value)
        assert svc.jobs == {}  # nothing was started
    finally:
        for job in svc.jobs.values():
            job.cancel()
        demo.close()


@pytest.mark.slow
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
    text = score_text({"base": 0.3, "target": 0.5, "base checker": 1.0, "target checker": 0.0})
    assert "scorer: target higher by 0.200, though the checker rejects the target" in text


def test_suggested_reference_passes_the_checker_and_base_fails_it():
    """'a yellow and hollow triangle': the only candidate the checker passes is the reference even though a
    rejected one scores higher; the base is the lowest-scored rejected one. Without verdicts: by score alone."""
    from app.service import AppService, Candidate, Session

    sess = Session()
    for seed, score, ok in [(0, 0.2, False), (1, 0.9, False), (2, 0.4, True), (3, 0.1, True), (4, 0.3, False)]:
        sess.candidates[seed] = Candidate(seed, None, None, score, ok)
    from app.views import pick_note

    assert AppService.suggested_seeds(sess) == (0, 2)
    note = pick_note(sess.candidates, 0, 2)  # what the page's status says after Sample
    assert "BASE seed 0 (checker ✗), REF seed 2 (checker ✓)" in note and "⚠" not in note
    for c in sess.candidates.values():
        c.correct = None
    assert AppService.suggested_seeds(sess) == (3, 1)
    assert pick_note(sess.candidates, 3, 1).endswith("(the lowest and highest score).")
    for c in sess.candidates.values():
        c.correct = True  # every candidate passes: the base is the lowest-scored of all
    assert AppService.suggested_seeds(sess) == (3, 1)
    assert "⚠ The base passes the checker too: all 5 candidates pass" in pick_note(sess.candidates, 3, 1)
    for c in sess.candidates.values():
        c.correct = False  # none passes: the reference is the best score, and the page says it fails the checker
    assert AppService.suggested_seeds(sess) == (3, 1)
    assert "⚠ The reference fails the checker: none of the 5 candidates passes it" in pick_note(sess.candidates, 3, 1)


def test_build_pairs_pick_checker_takes_references_it_passes_and_bases_it_rejects():
    import numpy as np

    from dfusion_core.pairs.build import PairingParams, choose_pairs

    seeds, scores = [10, 11, 12, 13, 14, 15, 16, 17], np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    ok = [False, True, False, True, False, False, True, False]
    pairs = choose_pairs(seeds, scores, PairingParams(num_candidates=8, pick="checker"), ok)
    assert pairs and all(ok[seeds.index(r)] and not ok[seeds.index(b)] for b, r in pairs)
    assert {r for _, r in pairs} == {11, 13}  # the two best-scored passing ones (a quarter of 8)
    assert choose_pairs(seeds, scores, PairingParams(num_candidates=8, pick="checker"), [True] * 8) == []
    # the checker corrects the scorer: every passing candidate scores below every failing one, pairs are still made
    low_pass = [False] * 4 + [True] * 4
    pairs = choose_pairs(seeds, scores, PairingParams(num_candidates=8, pick="checker"), low_pass)
    assert pairs and all(r in (14, 15) and b in (10, 11, 12, 13) for b, r in pairs)
    one = choose_pairs(seeds, scores, PairingParams(num_candidates=8, pick="checker"), [False] * 7 + [True])
    assert len(one) == 2  # one passing reference is used twice, as the scorer's pick uses each
    with pytest.raises(ValueError, match="pick must be one of"):
        PairingParams(pick="oracle").validate()
    with pytest.raises(ValueError, match="needs the checker's verdict"):
        choose_pairs(seeds, scores, PairingParams(pick="checker"))


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
    with pytest.raises(ValidationError, match=r"- prompt: .*prompt is empty"):
        c.predict("", 4, 2.0, 1.0, "0", "1", ["red"], "auto", 0.5, 2, 4, "mid+up", "smooth", True, None,
                  api_name="/fuse")
    with pytest.raises(ValidationError, match=r"- end_step: .*starts at step 4, after its end"):
        c.predict(*_fuse_args(start=4, end=2), api_name="/refuse_start_step")  # a live control: the same rule
    assert calls == []


def test_a_words_heatmap_is_never_drawn_over_another_prompts_reference(app_url):
    """After the prompt changed, clicking a word empties the heatmap (it drew over the previous prompt's reference,
    or showed an Error badge for a word the old prompt lacked)."""
    url, _ = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict("a red dog", api_name="/words")
    c.predict(*_fuse_args("70", "71"), api_name="/fuse")
    assert c.predict("dog", "a red  dog", api_name="/word_heatmap") is not None  # the fused prompt, as typed
    c.predict("a red cat", api_name="/words")  # the prompt typed anew: its words are the choices
    assert c.predict("red", "a red cat", api_name="/word_heatmap") is None
    assert c.predict("cat", "a red cat", api_name="/word_heatmap") is None


def test_a_refused_sample_is_a_validation_error_and_replaces_nothing(app_url, monkeypatch):
    """Sample validates first, as Fuse does: the message names the input, no model call runs, so the gallery, seeds
    and word lists keep what they showed (a refusal raised by the handler covered them with Error badges)."""
    from gradio_client.exceptions import ValidationError

    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    calls = []
    monkeypatch.setattr(svc.model_thread, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(ValidationError, match=r"- p: .*prompt is empty"):
        c.predict("", 4, 2.0, 1.0, 4, 0, api_name="/sample")
    with pytest.raises(ValidationError, match=r"- s0_: .*first seed must be between"):
        c.predict("a red dog", 4, 2.0, 1.0, 4, -5, api_name="/sample")
    with pytest.raises(ValidationError, match=r"- g: .*guidance_scale must be in"):
        c.predict("a red dog", 4, 99.0, 1.0, 4, 0, api_name="/sample")
    assert calls == []


@pytest.mark.slow
def test_a_sessions_lora_is_reloaded_when_its_file_changes_and_a_gone_one_is_said(sd1, tmp_path, monkeypatch):
    """Model calls of a session compute with its LoRA folder's weights as they are on disk: new weights under the
    same folder make its cached references stale (not served), an adapter dropped for room comes back, a
    folder gone is a message."""
    import os

    import numpy as np

    import app.services.model as model_service
    from app.service import AppService, Session, UserError
    from conftest import write_random_lora

    svc = AppService(sd1, store_dir=tmp_path / "store")
    monkeypatch.setattr(model_service, "MAX_ADAPTERS", 1)
    sampling = svc.sampling(4, 2.0, 1.0)
    fusion = svc.fusion(4, ["red", "dog"], "auto", 0.5, 2, 4, "mid+up", "smooth", True)
    mine, other = Session(weights=str(write_random_lora(sd1, tmp_path / "a", 0))), Session()
    try:
        first = svc.fuse(mine, "a red dog", 1, 2, sampling, fusion).result
        assert first.model_id == f"{svc.model_source}+lora:{tmp_path / 'a'}" and not first.from_cache
        assert svc.fuse(Session(weights=str(write_random_lora(sd1, tmp_path / "b", 1))), "a red dog", 1, 2,
                        sampling, fusion).result.model_id.endswith("b")  # MAX_ADAPTERS 1: a's adapter went
        again = svc.fuse(mine, "a red dog", 1, 2, sampling, fusion).result
        assert again.from_cache and (np.asarray(again.target_image) == np.asarray(first.target_image)).all()
        stamp = os.stat(tmp_path / "a" / "pytorch_lora_weights.safetensors").st_mtime_ns
        write_random_lora(sd1, tmp_path / "a", 2)  # a resumed run's later checkpoint, in the same folder
        os.utime(tmp_path / "a" / "pytorch_lora_weights.safetensors", ns=(stamp + 10**9, stamp + 10**9))
        new = svc.fuse(mine, "a red dog", 1, 2, sampling, fusion).result
        assert not new.from_cache and (np.asarray(new.reference_image) != np.asarray(first.reference_image)).any()
        assert svc.fuse(other, "a red dog", 1, 2, sampling, fusion).result.model_id == svc.model_source
        (tmp_path / "a" / "pytorch_lora_weights.safetensors").unlink()
        with pytest.raises(UserError, match="the fine-tuned weights in .* are gone"):
            svc.fuse(mine, "a red dog", 1, 2, sampling, fusion)
    finally:
        for name in list(sd1.lora_folders):  # sd1 is shared by the whole session: hand it back untuned
            sd1.unload_lora(name)
        sd1.use_lora(None)


@pytest.mark.slow
def test_the_train_tab_runs_on_policy_rounds_for_its_session_and_refuses_bad_input(sd1, tmp_path):
    """Start rounds: a DDPO child on the prompts given, rewarded by the app's scorer (by name), progress by rounds;
    a bad algorithm, prompt list, candidate count or a missing scorer is a message and starts nothing."""
    import time

    from app.service import AppService

    svc = AppService(sd1, store_dir=tmp_path / "store", runs_dir=tmp_path / "runs", scorer=lambda ims, ps: [0.0] * len(ims))
    url, demo = launch_app(svc)
    c = gradio_client.Client(url, verbose=False)
    try:
        for args, msg in [(("dpo", 4, 1e-4, 2, "dfusion", "a red dog", 4), "ddpo.*dpok"),  # the panel's own choice
                          (("ddpo", 4, 1e-4, 2, "dfusion", " \n ", 4), "one per line"),
                          (("ddpo", 4, 1e-4, 2, "dfusion", "a red dog", 2), "between 4 and 64"),
                          (("ddpo", 4, 1e-4, 0, "dfusion", "a red dog", 4), "rounds must be between"),
                          (("ddpo", 4, 1e-4, 2, "dfusion", "a red dog", 4), "need the scorer")]:
            with pytest.raises(Exception, match=msg) as shown:
                c.predict(*args, api_name="/train_on_policy")
            assert "Traceback" not in str(shown.value) and "internal error" not in str(shown.value)
        assert svc.jobs == {}  # nothing was started
        svc.scorer_source = "default"  # the shipped CLIP, by name, for the child
        msg, status, progress, _ = c.predict("ddpo", 4, 1e-3, 1, "random", "a red dog\na red  dog\na blue cat", 4,
                                             api_name="/train_on_policy")
        assert msg.startswith("started ddpo rounds (random pairs) on 2 prompt(s), 4 candidates") and "round 0/1" in status
        deadline = time.time() + 600  # a child process on a loaded 2-core machine
        while time.time() < deadline and status.startswith("running"):
            time.sleep(1)
            status = c.predict(api_name="/train_status")[0]
        assert status.startswith("done: round 1/1 done") and "mean reward" in status and "weights ready" in status, status
        folder = status.split("run folder ")[1].split(" · ")[0]
        rounds = [json.loads(x) for x in (svc.runs_dir / folder / "rounds.jsonl").read_text().splitlines()]
        assert len(rounds) == 1 and rounds[0]["samples"] == 8  # 2 prompts x 4 candidates, all of a random round
        other = gradio_client.Client(url, verbose=False)
        assert other.predict(api_name="/train_status")[0].startswith("no fine-tune started in this session")
    finally:
        for job in svc.jobs.values():
            job.cancel()
        demo.close()


@pytest.mark.slow
def test_a_busy_port_is_one_line_naming_the_flag():
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=str(Path(__file__).resolve().parents[1]),
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another app?): pass --port N or set PORT"], p.stderr


def test_on_policy_rounds_have_their_own_algorithm_choice(tmp_path):
    """The rounds panel starts on ddpo with ddpo / dpok to choose from, whatever the offline row's algorithm (dpo
    by default, which rounds cannot train): its button reads the panel's own dropdown."""
    from app.service import AppService
    from app.ui import build_demo

    demo = build_demo(AppService(None, store_dir=tmp_path / "store", background=True))
    cfg = demo.get_config_file()
    comps = {c["id"]: c for c in cfg["components"]}
    rounds = next(d for d in cfg["dependencies"] if d.get("api_name") == "train_on_policy")
    offline = next(d for d in cfg["dependencies"] if d.get("api_name") == "train")
    algo = comps[rounds["inputs"][1]]["props"]
    assert algo["value"] == "ddpo" and [c[0] for c in algo["choices"]] == ["ddpo", "dpok"]
    assert rounds["inputs"][1] != offline["inputs"][1]


def test_the_app_opens_on_the_settings_the_library_and_cli_use(tmp_path):
    """One rule: the page's sampling and fusion defaults, read before the model loads, are the loaded model's
    default_sampling() / default_fusion() (the shipped model's dfusion.json over the paper's)."""
    from app.service import AppService

    from dfusion_core.engine.loading import load_model

    svc = AppService(None, store_dir=tmp_path / "store", background=True)
    model = load_model(None, device="cpu")
    assert svc.default_sampling == model.default_sampling() and svc.default_fusion == model.default_fusion()
    assert svc.default_sampling.guidance_scale == 3.0 and svc.default_fusion.hold_outside


def test_before_after_prompts_are_held_out_from_the_trained_families_and_costed(sd1, tmp_path):
    """Empty box: TEST prompts of the families the set trained on, none of them trained, not the first prompts of
    one list (they shared 'a red and solid'); typed prompts are used as typed; the plan says the images and,
    once a sampling was timed, the seconds."""
    from app.service import AppService, Session, UserError
    from dfusion_core.pairs.prompt_sets import load_prompt_set
    from dfusion_core.worlds import discover

    discover()
    svc = AppService(sd1, store_dir=tmp_path / "store")
    svc.model_defaults = {**svc.model_defaults, "world": "shapesworld"}
    spatial_train = [e.prompt for e in load_prompt_set("shapesworld:spatial:train")]
    job = type("Job", (), {"prompts": spatial_train[:3]})()
    sess = Session(token="t")
    svc.jobs["t"] = job
    held = svc.held_out_prompts(sess)
    spatial_test = {e.prompt for e in load_prompt_set("shapesworld:spatial:test")}
    assert len(held) == 4 and set(held) <= spatial_test and not set(held) & set(spatial_train)
    assert len({" ".join(p.split()[:3]) for p in held}) > 1, held
    del svc.jobs["t"]
    families = {fam for p in svc.held_out_prompts(Session()) for fam in ("action", "attribute", "spatial")
                if p in {e.prompt for e in load_prompt_set(f"shapesworld:{fam}:test")}}
    assert families == {"action", "attribute", "spatial"}  # nothing trained yet: every family
    assert svc.before_after_prompts(sess, "a red circle\n\n a red circle ") == ["a red circle"]
    with pytest.raises(UserError, match="at most"):
        svc.before_after_prompts(sess, "\n".join(f"a red circle {i}" for i in range(9)))
    assert svc.before_after_estimate(3).startswith("3 prompt(s) x 2 seeds, base and LoRA: 12 images (how long is "
                                                   "known once this app has sampled")  # not a silence about the time
    svc.seconds_per_image = 0.5
    assert svc.before_after_estimate(3).endswith("about 6 s at the last sampling's speed")


def test_the_ablation_plots_title_legend_and_labels_lie_inside_the_figure_apart():
    """The legend sat above the axes over the title, and both were clipped at the figure's edge."""
    import matplotlib

    matplotlib.use("Agg")
    from dfusion_core.pairs.ablation import AblationCell
    from app.views import ablation_plot, training_plot

    cells = [AblationCell(label=f"variant {i} with a long name", fusion=None, image=None, change_inside=10.0 + i,
                          change_outside=2.0, score=0.2 + i / 100) for i in range(10)]
    fig = ablation_plot(cells)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    title, legend = fig.axes[0].title.get_window_extent(r), fig.legends[0].get_window_extent(r)
    ticks = [t.get_window_extent(r) for t in fig.axes[0].get_xticklabels()]
    for b in (title, legend, *ticks):
        assert box.x0 - 1 <= b.x0 and b.x1 <= box.x1 + 1 and box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, b
    assert not title.overlaps(legend) and not any(t.overlaps(legend) for t in ticks)
    fig = training_plot([{"step": s, "loss": 1 / (s + 1), "implicit_acc": 0.5, "reward_margin": 0.1} for s in range(5)])
    fig.canvas.draw()
    assert all(fig.bbox.x0 <= ax.title.get_window_extent().x0 for ax in fig.axes)


def test_a_started_fine_tune_clears_the_previous_before_after(sd1, tmp_path):
    """The before / after grid compared the previous LoRA: once /train or /train_on_policy succeeds, an event that
    follows it (on success only) empties the grid and its row list."""
    from app.service import AppService
    from app.ui import build_demo

    demo = build_demo(AppService(sd1, store_dir=tmp_path / "store"))
    cfg = demo.config
    ids = {c.get("props", {}).get("elem_id"): c["id"] for c in cfg["components"]}
    grid, rows = ids["before-after"], ids["before-after-rows"]
    for name in ("train", "train_on_policy"):
        start = next(d for d in cfg["dependencies"] if d["api_name"] == name)
        after = [d for d in cfg["dependencies"] if d["trigger_after"] == start["id"] and d["trigger_only_on_success"]]
        assert any({grid, rows} <= set(d["outputs"]) for d in after), name


def test_a_fusion_streams_previews_and_a_newer_move_stops_the_running_one(app_url, monkeypatch):
    """Latency under load: the target's preview arrives while it forms, and a control moved again while a
    fusion runs stops that fusion at its next step (its status says so) instead of queueing behind it."""
    import time

    import app.services.fuse as fuse_module

    url, svc = app_url
    c = gradio_client.Client(url, verbose=False)
    c.predict(*_fuse_args(), api_name="/fuse")
    real, slow = fuse_module.fuse, {"on": True}

    def slow_fuse(*args, on_step=None, **kw):  # each step 0.3 s: a loaded machine
        def step(p):
            if slow["on"]:
                time.sleep(0.3)
            on_step(p)
        return real(*args, on_step=step, **kw)
    monkeypatch.setattr(fuse_module, "fuse", slow_fuse)
    first = c.submit(*_fuse_args(mode="relative", thr=0.3), api_name="/refuse_threshold")
    deadline = time.time() + 30
    while not any("preview of the target" in str(o[-1]) for o in first.outputs()) and time.time() < deadline:
        time.sleep(0.05)
    assert any("preview of the target" in str(o[-1]) for o in first.outputs()), first.outputs()
    slow["on"] = False
    second = c.submit(*_fuse_args(mode="relative", thr=0.6), api_name="/refuse_threshold")
    newer = second.result(timeout=60)
    older = first.result(timeout=60)
    assert "superseded by a newer setting" in older[-1], older[-1]
    assert "fused in cache" in newer[-1], newer[-1]


def test_the_readmes_gradio_client_example_runs_and_fuses_with_the_pages_settings(app_url):
    """The README's script, run as written against the app (its URL swapped): it samples, fuses with every control
    at the page's starting value, and labels."""
    url, svc = app_url
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in b)
    code = code.replace("http://127.0.0.1:7860/", url).replace("print(out[-1])", "status = out[-1]")
    n0 = len(svc.store)
    scope = {}
    exec(code, scope)
    s = svc.default_sampling
    assert scope["status"].startswith("fused in") and f"layers {svc.default_fusion.layers}" in scope["status"]
    assert len(scope["gallery"]) == 8 and len(svc.store) == n0 + 1
    assert s.num_steps == 20 and f"steps {svc.default_fusion.step_range(s.num_steps)[0]}-" in scope["status"]


def test_the_train_status_says_what_the_held_out_pairs_chose(tmp_path):
    """A DPO run that holds out pairs logs a validation row at each checkpoint and, at its end, which checkpoint its
    weights are: the loss plot reads the steps only, the status line says both."""
    import json

    from app.jobs import TrainingJob
    from app.services.train import validation_text

    job = TrainingJob.__new__(TrainingJob)
    job._setup(None, tmp_path, 40, [])
    rows = [{"step": s, "loss": 0.7 - s / 100} for s in range(1, 41)]
    vals = [{"stage": "validation", "step": s, "score": a, "val_implicit_acc": a}
            for s, a in ((10, 0.55), (20, 0.70), (30, 0.60), (40, 0.65))]
    log = rows[:10] + vals[:1] + rows[10:20] + vals[1:2] + rows[20:30] + vals[2:3] + rows[30:] + vals[3:]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert job.rows() == rows and job.progress() == ("step 40/40", 1.0)
    assert validation_text(job) == " · held-out pairs ranked right 0.65 (best 0.70 at step 20)"
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"stage": "early_stopping", "best_step": 20, "last_step": 40, "stopped_early": True,
                            "best_score": 0.7}) + "\n")
    assert validation_text(job).endswith(" · stopped early at step 40: the weights are step 20's, the best")
    untrained = [{"stage": "validation", "step": 0, "score": 0.8, "val_implicit_acc": 0.8}, *vals,
                 {"stage": "early_stopping", "best_step": 0, "last_step": 30, "stopped_early": True, "best_score": 0.8}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in untrained))
    assert validation_text(job).endswith("no checkpoint ranked the held-out pairs better than the untrained model, so "
                                         "the weights are the plain model's")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validation_text(job) == ""  # no held-out pairs (a small set, or another algorithm)
