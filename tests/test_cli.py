"""The CLI: JSON out, clear one-line errors (exit 2), the bench keys the README reports."""
import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300, fresh=False):
    """`python -m dfusion_core ARGS` as the shell sees it: .returncode, .stdout, .stderr. In this process by default
    (torch and diffusers are imported once, not once a call: about 10 s each on a 2-core CI machine); fresh=True
    starts a new process, for what only one shows (the entry point's exit status)."""
    if fresh:
        return subprocess.run([sys.executable, "-m", "dfusion_core", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    from dfusion_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_tokens_prints_words_with_token_indices():
    p = run("tokens", "--prompt", "a black and woolen bus")
    assert p.returncode == 0, p.stderr
    words = json.loads(p.stdout)
    assert {"word": "woolen", "token_indices": [4, 5], "tokens": ["woo", "len</w>"]} in words


@pytest.mark.slow
def test_fuse_and_bench_on_a_folder(pipelines_dir, sd1, tmp_path):
    model = str(pipelines_dir / "sd1")
    p = run("fuse", "--model", model, "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2", "--steps", "4",
            "--threshold-mode", "relative", "--threshold", "0.5", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["keywords"] == ["red", "dog"] and (tmp_path / f"{out['pair_id']}.target.png").is_file()
    b = run("bench", "--model", model, "--steps", "3", "--repeats", "1", "--json")
    assert b.returncode == 0, b.stderr
    keys = json.loads(b.stdout.strip().splitlines()[-1])
    for k in ("plain_sample_s", "fused_pair_s", "refuse_cached_s", "fused_pair_over_plain", "refuse_cached_over_plain"):
        assert keys[k] > 0
    assert keys["form"]["start_step"] == 3 and keys["form"]["hold_outside"] is False and keys["limit_passes"] == 2.0


@pytest.mark.slow
def test_bad_input_is_one_clear_line(pipelines_dir, sd1):
    model = str(pipelines_dir / "sd1")
    for args, msg in [(["--start-step", "9", "--end-step", "2"], "start_step"), (["--keywords", "horse"], "not in the prompt")]:
        p = run("fuse", "--model", model, "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2", "--steps", "4",
                *args)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    p = run("sample", "--model", "/no/such/folder", "--prompt", "x")
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = run("fuse", "--model", "/no/such/folder", "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2")
    assert p.returncode == 2 and p.stderr == "error: model folder /no/such/folder does not exist\n", p.stderr


def test_bench_prints_a_table_and_with_json_one_json_line(monkeypatch, capsys):
    """--json is read: one JSON object on one line for scripts (benchmarks/*.sh), a `key  value` table otherwise."""
    from dfusion_core import cli

    result = {"plain_sample_s": 0.5, "fused_pair_over_plain": 1.9, "peak_mem_mib": {"plain": 0, "fused_pair": 0}}
    monkeypatch.setattr(cli.measure, "cmd_bench", lambda a: result)
    assert cli.main(["bench", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == result
    assert cli.main(["bench"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(result)
    assert lines[1].split() == ["fused_pair_over_plain", "1.9"] and lines[2].split()[1:] == ["plain=0", "fused_pair=0"]


@pytest.mark.slow
def test_train_refuses_deterministic_pairs_for_trajectory_methods(pipelines_dir, sd1, tmp_path):
    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.pairs.build import PairingParams, build_pairs, save_pairs

    scorer = lambda ims, ps: [float(i) for i in range(len(ims))]  # noqa: E731 - distinct scores, any order
    save_pairs(build_pairs(sd1, ["a red dog"], scorer, SamplingParams(num_steps=3, eta=0.0),
                           pairing=PairingParams(num_candidates=4)), tmp_path / "pairs")
    p = run("train", "--model", str(pipelines_dir / "sd1"), "--data", str(tmp_path / "pairs"), "--algo", "traj-dpo",
            "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: traj-dpo") and "eta = 0" in lines[0], p.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained


# ---- one contract for bad input, every flag documented (issue 15, item 12) --------------------------------

def _main(capsys, *args):
    """Run the CLI in this process: (exit status, stdout, stderr); argparse's exits count as the status."""
    from dfusion_core import cli

    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,msg", [
    (["eval", "--n-prompts", "0"], "--n-prompts: must be at least 1, got 0"),
    (["eval", "--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (["eval", "--seeds", "abc"], "'abc' is not an integer"),
    (["sample", "--prompt", "x", "--seeds", "abc"], "'abc' is not an integer seed"),
    (["sample", "--prompt", "x", "--seeds", "5-2"], "the range 5-2 is empty"),
    (["sample", "--prompt", "x", "--seeds", "2147483648"], "0..2147483647"),
    (["sample", "--prompt", "x", "--seeds", ","], "no seeds given"),
    (["tokens", "--prompt", ""], "the prompt is empty"),
    (["tokens", "--prompt", "   "], "the prompt is empty"),
    (["fuse", "--prompt", "x", "--base-seed", "-1", "--ref-seed", "2"], "0..2147483647"),
    (["build-pairs", "--prompt", "x", "--num-candidates", "1"], "--num-candidates: must be in 2..4096"),
    (["build-pairs", "--prompt", "x", "--min-gap", "-1"], "min_gap must be >= 0"),
    (["build-pairs", "--prompt", "x", "--scorer", "none"], "needs a scorer"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
    (["nonsense"], "invalid choice"),
    ([], "the following arguments are required: command"),
])
def test_bad_input_exits_2_with_one_error_line_before_any_model_loads(capsys, args, msg):
    code, out, err = _main(capsys, *args, *(["--model", "/no/such/folder"] if args[:1] not in ([], ["nonsense"],
                                                                                         ["tokens"]) else []))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: ") and msg in lines[0] and "does not exist" not in lines[0], lines[0]


@pytest.mark.slow
def test_an_empty_prompt_fails_the_process_with_status_2():
    p = run("tokens", "--prompt", "", fresh=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: the prompt is empty: type what the image should show"


def _subcommands():
    from dfusion_core import cli

    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["tokens", "sample", "fuse", "build-pairs", "train", "eval", "bench", "import"])
def test_every_option_has_help_text_and_its_default(capsys, command):
    """Walks `--help` of each subcommand: every option is listed with help text; each option that takes a value
    names its default (the value itself where argparse holds one) unless it is required."""
    parser = _subcommands()[command]
    code, out, _ = _main(capsys, command, "--help")
    assert code == 0
    flat = "".join(out.split())  # argparse wraps lines, also after a hyphen
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        assert flag in out, flag
        assert action.help and action.help.strip(), f"{command} {flag} has no help text"
        text = " ".join((action.help % dict(vars(action), prog=parser.prog)).split())
        assert "".join(text.split()) in flat, f"{command} {flag}: help not shown"
        if action.nargs == 0:  # a switch: off unless given
            continue
        if action.required:
            assert "(required)" in text, f"{command} {flag}"
            continue
        assert "(default: " in text, f"{command} {flag} does not state its default: {text!r}"
        if action.default is not None:
            assert f"(default: {action.default})" in text, f"{command} {flag}: {text!r}"


def test_help_states_the_defaults_the_model_really_uses():
    """--mask-factors said 4 while the shipped model read its dfusion.json's 1 2: every flag whose field the
    shipped model's dfusion.json sets to another value says so; the seed range is the engine's."""
    from dfusion_core import cli
    from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams, model_defaults
    from dfusion_core.engine.loading import DEFAULT_MODEL
    from dfusion_core.engine.sampling import MAX_SEED

    assert cli.SHIPPED_MODEL == DEFAULT_MODEL and cli.SEED_RANGE == f"0..{MAX_SEED}"
    shipped = model_defaults(DEFAULT_MODEL)
    fuse = _subcommands()["fuse"]
    helps = {a.option_strings[-1]: " ".join(a.help.split()) for a in fuse._actions if a.help}
    fmt = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    flags = {"guidance_scale": "--cfg", "eta": "--eta", "layer_factors": "--mask-factors", "start_step": "--start-step",
             "layers": "--layers", "union_base": "--union-base", "dilate": "--dilate", "hold_outside": "--hold-outside"}
    papers = {**vars(SamplingParams()), **vars(MaskParams()), **{k: v for k, v in vars(FusionParams()).items()
                                                                 if k != "mask"}}
    stated = 0
    for field, flag in flags.items():
        if field in shipped and fmt(shipped[field]) != fmt(papers[field]) and flag in helps:
            assert f"the shipped model's is {fmt(shipped[field])})" in helps[flag], (flag, helps[flag])
            stated += 1
    assert stated >= 2  # the shipped model sets its CFG and eta at least
    assert f"(default: {SamplingParams().num_steps})" in helps["--steps"]


# ---- the CLI keeps the app's rules (issue 15, items 3 and 11) -----------------------------------------------

def test_fuse_refuses_equal_seeds_before_loading_the_model(capsys):
    code, _, err = _main(capsys, "fuse", "--model", "/no/such/folder", "--prompt", "a red dog", "--base-seed", "4",
                         "--ref-seed", "4")
    assert code == 2 and err.strip() == "error: base and reference are the same seed (4): a pair needs two " \
                                        "different images"


@pytest.mark.slow
def test_fuse_scores_by_default_labels_by_verdict_and_a_rerun_adds_no_line(pipelines_dir, sd1, tmp_path):
    from dfusion_core.pairs.build import verdict

    args = ("fuse", "--model", str(pipelines_dir / "sd1"), "--prompt", "a red dog", "--base-seed", "1", "--ref-seed",
            "2", "--steps", "3", "--out", str(tmp_path))
    first, again = run(*args), run(*args)
    assert first.returncode == 0 and again.returncode == 0, first.stderr[-2000:] + again.stderr[-2000:]
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["stored"] is True and b["stored"] is False and a["pair_id"] == b["pair_id"]
    assert set(a["scores"]) == {"base", "reference", "target"}
    assert a["label"] == (verdict(a["scores"]["base"], a["scores"]["target"]) or "tie")
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["scores"] == a["scores"]
    assert json.loads(lines[0])["label"] == a["label"]


@pytest.mark.slow
def test_build_pairs_labels_by_score_reports_drops_and_writes_seeds_the_app_accepts(pipelines_dir, sd1, tmp_path):
    from app.service import parse_seed
    from dfusion_core.pairs.build import verdict

    args = ("build-pairs", "--model", str(pipelines_dir / "sd1"), "--prompt", "a red dog", "--num-candidates", "4",
            "--steps", "3", "--out", str(tmp_path))
    p = run(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert set(out["dropped"]) == {"tie", "gap"} and out["pairs"] + out["dropped"]["tie"] == 2  # 1 ref x 2 bases
    assert f"dropped {out['dropped']['tie']} ties" in p.stderr
    metas = [json.loads(ln) for ln in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(metas) == out["pairs"] == out["saved"]
    for m in metas:
        assert parse_seed(m["base_seed"], "base seed") != parse_seed(m["ref_seed"], "reference seed")
        assert m["label"] == verdict(m["scores"]["base"], m["scores"]["target"])  # the scorer's, not always target
    again = run(*args)
    assert again.returncode == 0 and json.loads(again.stdout)["already_stored"] == out["pairs"]
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == len(metas)


def test_fusion_fields_of_a_models_dfusion_json_reach_the_cli_and_flags_override_them():
    import torch

    from dfusion_core.cli import build_parser
    from dfusion_core.cli.common import params_from_args as _params
    from dfusion_core.engine.loading import LoadedModel

    model = LoadedModel(pipe=None, model_id="m", kind="sd1", device=torch.device("cpu"), dtype=torch.float32,
                        defaults={"start_step": 1, "layers": "all", "hold_outside": True, "dilate": 1})
    a = build_parser().parse_args(["fuse", "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2"])
    _, f = _params(a, model)
    assert (f.start_step, f.layers, f.hold_outside, f.mask.dilate) == (1, "all", True, 1)
    a = build_parser().parse_args(["fuse", "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2",
                                   "--start-step", "4", "--no-mask"])
    _, f = _params(a, model)
    assert (f.start_step, f.use_mask, f.hold_outside) == (4, False, True)


def test_import_reports_per_file_and_skips_what_the_store_holds(tmp_path, capsys):
    """A folder or an archive; the same report the app shows; exit 1 when a pair failed, 2 on a missing source."""
    import shutil

    from test_preference_store import fake_record

    from dfusion_core.data.preference_store import PreferenceStore

    src = PreferenceStore(tmp_path / "src")
    for i in (1, 2):
        src.add(fake_record(i), "base")
    src.export(tmp_path / "export")
    store = str(tmp_path / "store")
    code, out, err = _main(capsys, "import", "--source", str(tmp_path / "export"), "--store", store)
    assert code == 0 and out.startswith("imported 2 pairs from export, skipped 0") and "- pairs.jsonl: 2 imported" in out
    archive = shutil.make_archive(str(tmp_path / "set"), "gztar", tmp_path, "export")
    (tmp_path / "export" / "pair00002.safetensors").write_bytes(b"truncated")
    code, out, _ = _main(capsys, "import", "--source", archive, "--store", store, "--json")
    report = json.loads(out)
    assert code == 0 and (report["imported"], report["skipped"], report["failed"]) == (0, 2, 0)
    assert report["files"][0]["source"] == "export/pairs.jsonl"
    code, out, _ = _main(capsys, "import", "--source", str(tmp_path / "export"), "--store", str(tmp_path / "other"))
    assert code == 1 and "imported 1 pair from export" in out and "failed pair00002: pair00002.safetensors is unreadable" in out
    code, out, err = _main(capsys, "import", "--source", str(tmp_path / "missing"), "--store", str(tmp_path / "new"))
    assert code == 2 and out == "" and err.strip() == f"error: {tmp_path / 'missing'} does not exist"
    assert not (tmp_path / "new").exists()  # no store created for nothing


@pytest.mark.slow
def test_size_not_divisible_by_the_patch_is_one_clear_line(pipelines_dir, sd3, tmp_path):
    """On an 8x autoencoder with patch 2 an image side must be a multiple of 16: 72 px is refused up front (exit 2,
    one line) by sample and fuse, instead of the transformer's RuntimeError."""
    import shutil

    from dfusion_core.testing.tiny import _vae

    folder = tmp_path / "sd3-x8"
    shutil.copytree(pipelines_dir / "sd3", folder, symlinks=True)
    shutil.rmtree(folder / "vae")
    _vae(blocks=(32, 32, 32, 64)).save_pretrained(folder / "vae")
    for cmd, extra in [("sample", ["--seeds", "0"]), ("fuse", ["--base-seed", "1", "--ref-seed", "2"])]:
        p = run(cmd, "--model", str(folder), "--prompt", "a red dog", "--steps", "4", "--height", "72",
                "--width", "64", *extra)
        assert p.returncode == 2, p.stderr
        assert "multiples of 16" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_library_defaults_are_the_models_as_on_the_command_line(pipelines_dir, sd3, tmp_path):
    """sample() with no settings uses the model's dfusion.json (here CFG 2, eta 0.4), as `sample` does: the same
    image from Python and from the CLI. A sampling-only command ignores fusion settings (2 steps is fine although
    the paper's fusion starts at step 3)."""
    import shutil

    import numpy as np
    from PIL import Image

    from dfusion_core.engine.loading import load_model
    from dfusion_core.engine.sampling import sample

    folder = tmp_path / "sd3-defaults"
    shutil.copytree(pipelines_dir / "sd3", folder, symlinks=True)
    (folder / "dfusion.json").write_text(json.dumps({"guidance_scale": 2.0, "eta": 0.4, "num_steps": 2}))
    model = load_model(folder, device="cpu")
    s = model.default_sampling()
    assert (s.guidance_scale, s.eta, s.num_steps) == (2.0, 0.4, 2)
    lib = np.asarray(sample(model, "a red dog", [3]).images[0], dtype=np.int16)
    p = run("sample", "--model", str(folder), "--prompt", "a red dog", "--seeds", "3", "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    cli = np.asarray(Image.open(tmp_path / "out" / "seed3.png"), dtype=np.int16)
    assert np.abs(lib - cli).max() <= 1
    p = run("sample", "--model", str(folder), "--prompt", "a red dog", "--seeds", "3", "--steps", "1",
            "--out", str(tmp_path / "out1"))
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_build_pairs_pick_checker(pipelines_dir, sd1, tmp_path):
    """On the embedded ShapesWorld model every reference passes the world's checker and every base fails it; a
    model of no world is refused in one line."""
    import numpy as np
    from PIL import Image

    from dfusion_core.pairs.build import load_pairs
    from dfusion_core.worlds.shapesworld.checker import check

    prompt = "a red and striped circle"
    p = run("build-pairs", "--prompt", prompt, "--num-candidates", "8", "--steps", "4", "--pick", "checker",
            "--label", "target", "--out", str(tmp_path / "pairs"))
    assert p.returncode == 0, p.stderr
    assert "; 1 process," in p.stderr  # not '1 processes'
    recs = load_pairs(tmp_path / "pairs", with_images=True)
    assert recs  # this prompt's 8 candidates hold both kinds on the shipped model
    for r in recs:
        assert check(np.asarray(r.images["reference"]), prompt).correct
        assert not check(np.asarray(r.images["base"]), prompt).correct
    p = run("build-pairs", "--model", str(pipelines_dir / "sd1"), "--prompt", "a red dog", "--num-candidates", "4",
            "--steps", "3", "--pick", "checker", "--out", str(tmp_path / "none"))
    assert p.returncode == 2 and "pick=checker needs a model trained on a world" in p.stderr, p.stderr


def test_help_names_every_command():
    """The --help text's 'Commands:' sentence lists every subcommand the parser has."""
    from dfusion_core import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sentence = " ".join(cli.__doc__.split("Commands:")[1].split(".")[0].split())
    named = {w.strip(",") for w in sentence.split()}
    assert set(sub.choices) <= named, set(sub.choices) - named


def test_a_missing_model_folder_is_refused_before_torch_or_diffusers_import():
    """`fuse --model /nonexistent` answered in 16 s on a loaded machine: the refusal waited for torch and diffusers.
    Nothing but the flags and the folder check runs before the message now."""
    import subprocess
    import sys

    code = ("import sys\nfrom dfusion_core.cli import main\n"
            "for cmd in (['fuse', '--base-seed', '1', '--ref-seed', '2'], ['sample']):\n"
            "    assert main([*cmd, '--model', '/no/such/folder', '--prompt', 'a red circle']) == 2\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr)
    assert p.stderr.count("error: model folder /no/such/folder does not exist") == 2, p.stderr
