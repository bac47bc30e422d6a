"""`accelerate launch ... build-pairs`: the prompts split over 2 CPU processes (gloo) make the very pairs one
process makes, in one folder; a run killed half-way and restarted (with another process count) ends with the
same pairs, none listed twice. `accelerate launch ... train-on-policy`: a round collected by 2 processes is the
round one process collects, and the processes train one LoRA in step."""
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

from dfusion_core.pairs.build import index_files, load_pairs

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red dog", "a blue cat", "a green bird", "a black horse", "a white boat", "a yellow car"]
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.distributed  # every test here launches processes


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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- on-policy rounds (train-on-policy) under accelerate launch --------------------------------------------
ON_POLICY_PROMPTS = PROMPTS[:3]  # 2 + 1 over 2 processes: uneven shards, so one process wraps around its samples


def _on_policy_args(model_dir, out, rounds):
    """4 candidates, 3 steps: 2 fused pairs per prompt (2 targets + 2 bases); a global batch of 6 trajectories =
    3 per process; micro-batches of 6 (trajectory, step) rows = 2 trajectories."""
    prompts = [a for p in ON_POLICY_PROMPTS for a in ("--prompt", p)]
    return ["-m", "dfusion_core", "train-on-policy", "--model", str(model_dir), *prompts, "--num-candidates", "4",
            "--steps", "3", "--rounds", str(rounds), "--batch-size", "6", "--micro-batch", "6", "--lr", "1e-2",
            "--inner-epochs", "1", "--out", str(out)]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sample_key(s):
    return (s["round"], s["prompt"], s["seed"], s["ref_seed"], s["fused"])


@pytest.mark.slow
def test_on_policy_rounds_split_over_two_processes(pipelines_dir, sd1, tmp_path, capsys):
    """A round collected by 2 processes (gloo) is the round one process collects: the same (prompt, seeds)
    samples with the same rewards and per-prompt advantages. Both processes end with the same finite, trained
    LoRA; only the main process writes (no log line twice); a rerun (here with one process) goes on at the next
    round."""
    from safetensors.torch import load_file

    from dfusion_core import cli

    model = pipelines_dir / "sd1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        assert cli.main(_on_policy_args(model, tmp_path / "one", 1)[2:]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads(capsys.readouterr().out)
    two = _run([*LAUNCH_2, *_on_policy_args(model, tmp_path / "two", 1)])
    assert one["processes"] == 1 and two["processes"] == 2 and two["rounds"] == 1
    a, b = _jsonl(tmp_path / "one" / "samples.jsonl"), _jsonl(tmp_path / "two" / "samples.jsonl")
    assert len(a) == len(b) == len({_sample_key(s) for s in b}) == 4 * len(ON_POLICY_PROMPTS)  # each once
    assert {_sample_key(s) for s in a} == {_sample_key(s) for s in b} and {s["rank"] for s in b} == {0, 1}
    by_key = {_sample_key(s): s for s in a}
    for s in b:
        # same seeds, same per-prompt batches, one thread each: the same numbers (measured: bit-identical)
        assert s["reward"] == pytest.approx(by_key[_sample_key(s)]["reward"], rel=1e-6, abs=1e-7)
        assert s["advantage"] == pytest.approx(by_key[_sample_key(s)]["advantage"], abs=1e-5)
    r1, r2 = one["per_round"][0], two["per_round"][0]
    assert (r2["samples"], r2["pairs"], r2["fused"]) == (r1["samples"], r1["pairs"], r1["fused"]) == (12, 6, 6)
    assert r2["reward_mean"] == pytest.approx(r1["reward_mean"], rel=1e-5)
    # shards of 8 and 4 samples, 3 per process per step: process 0 takes 3 + 3 + 2, process 1 3 + 1 and then 3
    # wrapped around its own, so both take 3 steps; their micro-batch counts differ (2, 2 / 2, 1 / 1, 2), and
    # a gradient synchronised on every micro-batch would leave one process waiting for good
    assert r1["optimizer_steps"] == 2 and r2["optimizer_steps"] == 3

    out = tmp_path / "two"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "latest_checkpoint", "log.jsonl",
                                                     "pytorch_lora_weights.safetensors", "rank_checksums.jsonl",
                                                     "rounds.jsonl", "samples.jsonl", "train_config.json"]
    log = _jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and [r["rows"] for r in log] == [18, 12, 15]  # 3 steps each
    assert [r["round"] for r in _jsonl(out / "rounds.jsonl")] == [0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert [p.name for p in (out / "checkpoints" / "step-000003").iterdir()] == ["state.pt"]
    ranks = _jsonl(out / "rank_checksums.jsonl")  # without averaged gradients each would drift off on its shard
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"],
                                                                                          rel=1e-9)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in lora.values())
    ups = [float(v.abs().max()) for k, v in lora.items() if ".lora.up." in k]  # LoRA B: starts at 0
    assert len(ups) == len(lora) // 2 and min(ups) > 0  # every adapted layer trained

    assert cli.main(_on_policy_args(model, out, 2)[2:]) == 0  # resumed after round 0, one process this time
    again = json.loads(capsys.readouterr().out)
    assert again["rounds"] == 2 and [r["round"] for r in _jsonl(out / "rounds.jsonl")] == [0, 1]
    c = _jsonl(out / "samples.jsonl")
    assert c[:len(b)] == b and [s["round"] for s in c[len(b):]] == [1] * 12  # round 0 not redone
