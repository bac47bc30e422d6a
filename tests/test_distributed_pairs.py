"""`accelerate launch ... build-pairs`: the prompts split over 2 CPU processes (gloo) make the very pairs one
process makes, in one folder; a run killed half-way and restarted (with another process count) ends with the
same pairs, none listed twice."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil  # comes with accelerate
import pytest
import torch

from dfusion_core.engine.pairs import index_files, load_pairs

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red dog", "a blue cat", "a green bird", "a black horse", "a white boat", "a yellow car"]
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(model_dir, out):
    """8 candidates, 6 steps: 4 pairs per prompt, about 2 s a prompt here (the kill lands mid-run)."""
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return ["-m", "dfusion_core", "build-pairs", "--model", str(model_dir), *prompts, "--num-candidates", "8",
            "--steps", "6", "--out", str(out)]


def _run(cmd):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def one_process(pipelines_dir, sd1, tmp_path_factory):
    """The reference: one process builds every prompt (the tiny pipeline built once, into a folder all runs load,
    so every process computes with the same weights and names the same model id)."""
    out = tmp_path_factory.mktemp("one") / "pairs"
    return _run([sys.executable, *_args(pipelines_dir / "sd1", out)]), out


def _index_ids(folder):
    """Every pair id every index file lists (torn lines skipped), repeats included."""
    ids = []
    for f in index_files(folder):
        for line in f.read_text().splitlines():
            try:
                ids.append(json.loads(line)["pair_id"])
            except json.JSONDecodeError:
                continue
    return ids


def _assert_same_pairs(folder, reference):
    a = {r.pair_id: r for r in load_pairs(reference)}
    b = {r.pair_id: r for r in load_pairs(folder)}
    assert set(a) == set(b) and len(a) == 4 * len(PROMPTS)
    for pid, ra in a.items():
        rb = b[pid]
        assert (ra.prompt, ra.base_seed, ra.ref_seed, ra.label) == (rb.prompt, rb.base_seed, rb.ref_seed, rb.label)
        assert ra.scores == pytest.approx(rb.scores, rel=1e-5, abs=1e-6)
        for role in ("base", "reference", "target"):
            d = np.abs(np.asarray(ra.images[role], dtype=int) - np.asarray(rb.images[role], dtype=int))
            assert d.max() <= 1, (pid, role)  # 8-bit images: rounding may move one level
        assert torch.allclose(ra.target.latents, rb.target.latents, atol=1e-4)
        assert torch.allclose(ra.base.latents, rb.base.latents, atol=1e-4)


def test_two_processes_build_the_same_pairs_as_one(one_process, pipelines_dir, tmp_path):
    ref_out, ref = one_process
    two = _run([*LAUNCH_2, *_args(pipelines_dir / "sd1", tmp_path / "pairs")])
    assert two["processes"] == 2 and two["failed"] == [] and two["prompts_built"] == len(PROMPTS)
    assert {k: two[k] for k in ("pairs", "labels", "dropped", "saved")} == \
        {k: ref_out[k] for k in ("pairs", "labels", "dropped", "saved")}
    assert [f.name for f in index_files(tmp_path / "pairs")] == ["pairs.jsonl", "pairs.p1.jsonl"]
    assert len(_index_ids(tmp_path / "pairs")) == len(set(_index_ids(tmp_path / "pairs"))) == ref_out["pairs"]
    _assert_same_pairs(tmp_path / "pairs", ref)
    from dfusion_core.training.data import load_training_pairs

    assert len(load_training_pairs(tmp_path / "pairs", "dpo")) == ref_out["pairs"]  # `train --data` reads it whole


def test_a_run_killed_half_way_resumes_to_the_same_pairs_without_duplicates(one_process, pipelines_dir, tmp_path):
    """Two processes killed (SIGKILL, the launcher and every process under it: torch starts the workers in
    sessions of their own) once the first prompt is marked done; the rerun, with one process, builds only the
    prompts not marked done and lists no pair twice."""
    ref_out, ref = one_process
    out = tmp_path / "pairs"
    p = subprocess.Popen([*LAUNCH_2, *_args(pipelines_dir / "sd1", out)], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "done").glob("*.json")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for proc in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        p.wait()
    done_at_kill = len(list((out / "done").glob("*.json")))
    assert 1 <= done_at_kill < len(PROMPTS), "the kill must land half-way for this test to mean anything"
    again = _run([sys.executable, *_args(pipelines_dir / "sd1", out)])
    assert again["prompts_done_before"] == done_at_kill and again["failed"] == []
    assert again["prompts_built"] == len(PROMPTS) - done_at_kill
    assert again["pairs"] == ref_out["pairs"] and again["saved"] + again["already_stored"] == ref_out["pairs"]
    ids = _index_ids(out)
    assert len(ids) == len(set(ids)) == ref_out["pairs"]
    _assert_same_pairs(out, ref)
