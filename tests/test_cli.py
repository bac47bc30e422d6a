"""The CLI: JSON out, clear one-line errors (exit 2), the bench keys the README reports."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dfusion_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_tokens_prints_words_with_token_indices():
    p = run("tokens", "--prompt", "a black and woolen bus")
    assert p.returncode == 0, p.stderr
    words = json.loads(p.stdout)
    assert {"word": "woolen", "token_indices": [4, 5], "tokens": ["woo", "len</w>"]} in words


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


def test_bad_input_is_one_clear_line(pipelines_dir, sd1):
    model = str(pipelines_dir / "sd1")
    for args, msg in [(["--start-step", "9", "--end-step", "2"], "start_step"), (["--keywords", "horse"], "not in the prompt")]:
        p = run("fuse", "--model", model, "--prompt", "a red dog", "--base-seed", "1", "--ref-seed", "2", "--steps", "4",
                *args)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    p = run("sample", "--model", "/no/such/folder", "--prompt", "x")
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_bench_prints_a_table_and_with_json_one_json_line(monkeypatch, capsys):
    """--json is read: one JSON object on one line for scripts (benchmarks/*.sh), a `key  value` table otherwise."""
    from dfusion_core import cli

    result = {"plain_sample_s": 0.5, "fused_pair_over_plain": 1.9, "peak_mem_mib": {"plain": 0, "fused_pair": 0}}
    monkeypatch.setattr(cli, "cmd_bench", lambda a: result)
    assert cli.main(["bench", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == result
    assert cli.main(["bench"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(result)
    assert lines[1].split() == ["fused_pair_over_plain", "1.9"] and lines[2].split()[1:] == ["plain=0", "fused_pair=0"]


def test_train_refuses_deterministic_pairs_for_trajectory_methods(pipelines_dir, sd1, tmp_path):
    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.pairs import PairingParams, build_pairs, save_pairs

    scorer = lambda ims, ps: [float(i) for i in range(len(ims))]  # noqa: E731 - distinct scores, any order
    save_pairs(build_pairs(sd1, ["a red dog"], scorer, SamplingParams(num_steps=3, eta=0.0),
                           pairing=PairingParams(num_candidates=4)), tmp_path / "pairs")
    p = run("train", "--model", str(pipelines_dir / "sd1"), "--data", str(tmp_path / "pairs"), "--algo", "traj-dpo",
            "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: traj-dpo") and "eta = 0" in lines[0], p.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained
