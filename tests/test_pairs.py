"""Pair building end to end, pairing rules and storage that survives a killed writer."""
import json

import numpy as np
import pytest
import torch

from dfusion_core.engine.config import SamplingParams
from dfusion_core.engine.pairs import PairingParams, build_pairs, candidate_seeds, choose_pairs, load_pairs, save_pairs


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
                                        (dict(min_gap=-1), "min_gap")])
def test_invalid_pairing(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        PairingParams(**kwargs).validate()


def test_load_rejects_non_pair_folder(tmp_path):
    with pytest.raises(ValueError, match="no pairs.jsonl"):
        load_pairs(tmp_path)
