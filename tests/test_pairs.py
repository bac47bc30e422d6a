"""Pair building end to end, pairing rules and storage that survives a killed writer."""
import json

import numpy as np
import pytest
import torch

from dfusion_core.engine.config import SamplingParams
from dfusion_core.pairs.build import (PairingParams, build_pairs, build_random_pairs, candidate_seeds, choose_pairs,
                                       load_pairs, save_new_pairs, save_pairs, verdict)
from dfusion_core.engine.sampling import MAX_SEED, check_pair_seeds, check_seed


def brightness_scorer(images, prompts):
    return np.array([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])


def test_paper_pairing_best_quarter_twice_against_worst_half():
    seeds = list(range(100, 116))
    scores = np.arange(16, dtype=float)  # seed 115 best, 100 worst
    pairs = choose_pairs(seeds, scores, PairingParams())
    assert len(pairs) == 8
    refs = [r for _, r in pairs]
    assert sorted(set(refs)) == [112, 113, 114, 115] and all(refs.count(r) == 2 for r in set(refs))
    assert sorted(b for b, _ in pairs) == list(range(100, 108))
    assert pairs[0] == (100, 115)  # best reference with the worst base


def test_min_gap_filters_close_pairs():
    seeds = list(range(8))
    scores = np.array([0.50, 0.51, 0.52, 0.53, 0.54, 0.55, 0.56, 0.90])
    pairs = choose_pairs(seeds, scores, PairingParams(num_candidates=8, min_gap=0.2))
    assert pairs == [(0, 7)] or all(scores[r] - scores[b] >= 0.2 for b, r in pairs)


def test_candidate_seeds_are_stable_per_prompt():
    assert candidate_seeds("a dog", 4) == candidate_seeds("a dog", 4)
    assert candidate_seeds("a dog", 4) != candidate_seeds("a cat", 4)


@pytest.mark.slow
def test_build_save_load_roundtrip(sd1, tmp_path):
    sp = SamplingParams(num_steps=4)
    recs = build_pairs(sd1, ["a red dog", "a blue cat"], brightness_scorer, sp,
                       pairing=PairingParams(num_candidates=4), batch_size=8)
    assert len(recs) == 4  # 1 reference x 2 bases per prompt
    for r in recs:
        assert r.scores["reference"] >= r.scores["base"]
        assert torch.equal(r.target.latents[0], r.base.latents[0])  # shared starting noise
        assert r.target.latents.shape == (5, 4, 16, 16)
    save_pairs(recs, tmp_path)
    back = load_pairs(tmp_path)
    assert [b.pair_id for b in back] == [r.pair_id for r in recs]
    assert torch.equal(back[0].target.latents, recs[0].target.latents)
    assert back[0].images["target"].size == recs[0].images["target"].size
    assert back[0].fusion["start_step"] == 3


def test_torn_index_line_is_skipped(sd1, tmp_path):
    recs = build_pairs(sd1, ["a red dog"], brightness_scorer, SamplingParams(num_steps=3),
                       pairing=PairingParams(num_candidates=4))
    save_pairs(recs, tmp_path)
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write('{"format": 1, "pair_id": "abc", "prom')  # a writer killed mid-line
    assert len(load_pairs(tmp_path)) == len(recs)


@pytest.mark.parametrize("kwargs,msg", [(dict(num_candidates=1), "num_candidates"), (dict(ref_fraction=0.9), "ref_fraction"),
                                        (dict(min_gap=-1), "min_gap"), (dict(label="winner"), "label")])
def test_invalid_pairing(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        PairingParams(**kwargs).validate()


def test_load_rejects_non_pair_folder(tmp_path):
    with pytest.raises(ValueError, match="no pairs.jsonl"):
        load_pairs(tmp_path)


# ---- one seed range, labels from the scorer's verdict, no duplicate lines (issue 15, items 3 and 11) --------

def test_candidate_seeds_lie_in_the_one_seed_range_the_app_accepts():
    """build-pairs wrote seeds up to 2^62 that the app refused, so imported CLI pairs could not be re-fused."""
    from app.service import MAX_SEED as APP_MAX_SEED, parse_seed

    assert APP_MAX_SEED == MAX_SEED == 2 ** 31 - 1
    seeds = [s for i in range(200) for s in candidate_seeds(f"prompt {i}", 16, seed=i)]
    assert all(0 <= s <= MAX_SEED for s in seeds) and max(seeds) > 2 ** 30  # the whole range is used
    assert all(parse_seed(s, "seed") == check_seed(s) for s in seeds[:50])
    assert len(set(candidate_seeds("a dog", 4096))) == 4096


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 2 ** 62, 1.0, True, "3"])
def test_the_engine_refuses_seeds_outside_the_range(bad):
    with pytest.raises(ValueError, match=f"0..{MAX_SEED}"):
        check_seed(bad)


def test_a_pair_needs_two_different_seeds_in_the_cli_and_the_app():
    from app.service import AppService, UserError

    with pytest.raises(ValueError, match="same seed"):
        check_pair_seeds(5, 5)
    assert check_pair_seeds(5, 6) == (5, 6)
    svc = AppService.__new__(AppService)  # the check runs before any model call
    with pytest.raises(UserError, match="same seed"):
        svc.fuse(None, "a red dog", 5, "5", None, None)


def test_verdict_the_higher_score_wins_and_a_gap_under_min_gap_is_a_tie():
    assert verdict(0.2, 0.5) == "target" and verdict(0.5, 0.2) == "base"
    assert verdict(0.5, 0.5) is None and verdict(0.5, 0.5, min_gap=0.1) is None
    assert verdict(0.50, 0.55, min_gap=0.1) is None and verdict(0.55, 0.50, min_gap=0.1) is None
    assert verdict(0.50, 0.65, min_gap=0.1) == "target"


class _ScriptedScorer:
    """Candidates score 0..n-1 (index order); the targets get the scores given, in the order fused."""

    def __init__(self, target_scores):
        self.target_scores, self.calls = list(target_scores), 0

    def __call__(self, images, prompts):
        self.calls += 1
        return np.arange(len(images), dtype=float) if self.calls == 1 else np.array(self.target_scores[:len(images)])


def test_label_score_records_the_scorers_verdict_and_drops_ties(sd1):
    """4 candidates: reference = score 3, bases = scores 0 and 1. Target 1 scores below its base (-1 < 0): the
    base wins; target 2 ties its base (1 = 1): dropped and counted. The paper's labelling keeps both as target."""
    sp, pairing = SamplingParams(num_steps=3), PairingParams(num_candidates=4, label="score")
    stats = {}
    recs = build_pairs(sd1, ["a red dog"], _ScriptedScorer([-1.0, 1.0]), sp, pairing=pairing, stats=stats)
    assert [(r.label, r.scores["base"], r.scores["target"]) for r in recs] == [("base", 0.0, -1.0)]
    assert stats == {"fused": 2, "dropped_gap": 0, "dropped_tie": 1, "kept": 1}
    paper = build_pairs(sd1, ["a red dog"], _ScriptedScorer([-1.0, 1.0]), sp, pairing=PairingParams(num_candidates=4))
    assert [r.label for r in paper] == ["target", "target"]
    stats = {}  # min_gap 2.5: base 1 is only 2 below the reference (not fused); target 2.0 vs base 0 is a tie
    gap = build_pairs(sd1, ["a red dog"], _ScriptedScorer([2.0]), sp,
                      pairing=PairingParams(num_candidates=4, label="score", min_gap=2.5), stats=stats)
    assert gap == [] and stats == {"fused": 1, "dropped_gap": 1, "dropped_tie": 1, "kept": 0}


def test_random_pairs_count_the_ties_they_drop(sd1):
    stats = {}
    flat = lambda ims, ps: np.zeros(len(ims))  # noqa: E731 - every pair a tie
    assert build_random_pairs(sd1, ["a red dog"], flat, SamplingParams(num_steps=3), PairingParams(num_candidates=4),
                              stats=stats) == []
    assert stats == {"dropped_tie": 2, "kept": 0}


def test_saving_the_same_pairs_again_adds_no_line(sd1, tmp_path):
    recs = build_pairs(sd1, ["a red dog"], brightness_scorer, SamplingParams(num_steps=3),
                       pairing=PairingParams(num_candidates=4))
    assert save_new_pairs(recs, tmp_path) == (len(recs), 0)
    assert save_new_pairs(recs + recs[:1], tmp_path) == (0, len(recs) + 1)
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == len(recs)
    assert [r.pair_id for r in load_pairs(tmp_path)] == [r.pair_id for r in recs]


# ---- one pair folder from several processes, resumable (issue 16) -----------------------------------------

from dfusion_core.pairs.build import (build_into, done_markers, index_files, merge_reports,  # noqa: E402
                                       save_record, shard_prompts, stored_pair_ids)

PROMPTS = ["a red dog", "a blue cat", "a red dog", "a green bird"]  # a repeat: built once, by one process


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_each_prompt_goes_to_exactly_one_process_whatever_their_number(world):
    shards = [shard_prompts(PROMPTS, r, world) for r in range(world)]
    assert sorted(p for s in shards for p in s) == sorted(set(PROMPTS))
    assert shard_prompts(PROMPTS, world - 1, world) == shards[world - 1]  # deterministic
    with pytest.raises(ValueError, match="rank"):
        shard_prompts(PROMPTS, world, world)


def _ids_and_latents(folder):
    return {r.pair_id: (r.base_seed, r.ref_seed, r.label, r.scores, r.target.latents) for r in load_pairs(folder)}


@pytest.mark.slow
def test_two_processes_writing_one_folder_give_the_pairs_of_one_process(sd1, tmp_path):
    """Ranks 0 and 1 of 2 (run here one after the other) each append to their own index; read together they
    are the single-process folder's pairs. Both read the done markers before either writes (as the CLI does)."""
    sp, pairing = SamplingParams(num_steps=3), PairingParams(num_candidates=4)
    one = build_into(tmp_path / "one", sd1, PROMPTS, brightness_scorer, sp, pairing=pairing)
    done = done_markers(tmp_path / "two")
    reports = [build_into(tmp_path / "two", sd1, PROMPTS, brightness_scorer, sp, pairing=pairing, rank=r, world=2,
                          done=done) for r in (0, 1)]
    assert [r["prompts_built"] for r in reports] == [2, 1]
    assert [f.name for f in index_files(tmp_path / "two")] == ["pairs.jsonl", "pairs.p1.jsonl"]
    a, b = _ids_and_latents(tmp_path / "one"), _ids_and_latents(tmp_path / "two")
    assert set(a) == set(b) and len(a) == 6  # 3 prompts x 2 pairs
    for pid in a:
        assert a[pid][:4] == b[pid][:4] and torch.equal(a[pid][4], b[pid][4])
    merged = merge_reports(reports)
    assert {k: merged[k] for k in ("pairs", "written", "already_present", "prompts_built", "processes")} == \
        {"pairs": one["pairs"], "written": 6, "already_present": 0, "prompts_built": 3, "processes": 2}


@pytest.mark.slow
def test_a_rerun_skips_prompts_marked_done_and_retries_the_failed_one(sd1, tmp_path):
    sp, pairing = SamplingParams(num_steps=3), PairingParams(num_candidates=4)

    def broken_for_cats(images, prompts):
        if "cat" in prompts[0]:
            raise RuntimeError("scorer down")
        return brightness_scorer(images, prompts)
    first = build_into(tmp_path, sd1, PROMPTS, broken_for_cats, sp, pairing=pairing)
    assert first["failed"] == [{"prompt": "a blue cat", "error": "RuntimeError: scorer down", "rank": 0}]
    assert len(done_markers(tmp_path)) == 2 and first["written"] == 4
    again = build_into(tmp_path, sd1, PROMPTS, brightness_scorer, sp, pairing=pairing, world=1)
    assert (again["prompts_done_before"], again["prompts_built"], again["failed"]) == (2, 1, [])
    assert (again["pairs"], again["written"], again["already_present"]) == (6, 2, 4)
    lines = [json.loads(ln)["pair_id"] for f in index_files(tmp_path) for ln in f.read_text().splitlines()]
    assert len(lines) == len(set(lines)) == 6


def test_every_index_is_read_a_pair_id_once_and_a_torn_line_never_swallows_the_next(sd1, tmp_path):
    recs = build_pairs(sd1, ["a red dog"], brightness_scorer, SamplingParams(num_steps=3),
                       pairing=PairingParams(num_candidates=4))
    save_record(recs[0], tmp_path)  # an old-style folder: pairs.jsonl only
    with open(tmp_path / "pairs.jsonl", "a") as f:
        f.write('{"format": 1, "pair_id": "abc", "prom')  # a writer killed mid-line
    save_record(recs[1], tmp_path)  # appended after the torn line: must start a line of its own
    save_record(recs[0], tmp_path, rank=3)  # the same pair listed again, by another process's index
    assert [f.name for f in index_files(tmp_path)] == ["pairs.jsonl", "pairs.p3.jsonl"]
    assert [r.pair_id for r in load_pairs(tmp_path)] == [recs[0].pair_id, recs[1].pair_id]
    assert stored_pair_ids(tmp_path) == {recs[0].pair_id, recs[1].pair_id}
    assert save_new_pairs(recs, tmp_path, rank=3) == (0, 2)


def test_control_pairs_are_the_dfusion_pairs_with_the_unfused_reference_as_winner(sd1):
    """The paper's control: same prompts, bases and references as the D-Fusion pairs; the winner is the reference
    as sampled (its own trajectory, no mask), so only visual consistency differs from the D-Fusion set."""
    from dfusion_core.pairs.build import build_control_pairs

    sp, pairing = SamplingParams(num_steps=3), PairingParams(num_candidates=4)
    score = lambda ims, ps: [float(np.asarray(im).mean()) for im in ims]
    memo = {}
    fused = build_pairs(sd1, ["a red dog"], score, sp, pairing=pairing, candidates=memo)
    control = build_control_pairs(sd1, fused, sp, pairing, candidates=memo)
    again = build_control_pairs(sd1, fused, sp, pairing)  # no memo (a re-run from stored pairs): drawn again
    assert len(control) == len(fused) > 0
    seeds, cands, _ = memo[next(iter(memo))]
    for f, c, a in zip(fused, control, again):
        ref = cands.trajectories[seeds.index(f.ref_seed)]
        assert (c.base_seed, c.ref_seed, c.label) == (f.base_seed, f.ref_seed, "target")
        assert torch.equal(c.target.latents, ref.latents) and torch.equal(c.base.latents, f.base.latents)
        assert not torch.equal(c.target.latents, f.target.latents)  # the fused target is not the reference
        assert c.masks.sum() == 0 and c.extra == {"kind": "control", "dfusion_pair": f.pair_id}
        assert c.scores["target"] == f.scores["reference"]
        torch.testing.assert_close(a.target.latents, c.target.latents)
