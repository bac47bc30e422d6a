"""Build D-Fusion preference pairs (docs/METHOD.md steps 1-6 end to end).

Per prompt: sample N candidates, score them, take the best quarter as references (each used twice) and
the worst half as bases, fuse every (base, reference) pair, and return pair records. Who wins is
`PairingParams.label`: "target" (the paper: the fused image) or "score" (the scorer's verdict between base and
target; a tie is dropped). How a record is stored is the data layer's (dfusion_core/data/records.py;
re-exported here).

Building into a pair folder (`build_into`) works prompt by prompt and may be split over processes: process
`rank` of `world` takes every world-th prompt (`shard_prompts`); a prompt's pairs do not depend on which process
builds it (its candidate seeds are a hash of (seed, prompt)). Each prompt's pairs are saved, then a marker says
the prompt is done, so a rerun skips it whatever the new process count; pair ids are checked on every write.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.records import (FORMAT_VERSION, PairRecord, done_markers, index_files, index_name,  # noqa: F401
                            is_pair_folder, load_pairs, mark_done, record_from_files, record_tensors, save_pairs,
                            save_record, start_index, stored_pair_ids, write_record_files)
from ..engine.config import FusionParams, SamplingParams
from ..engine.fusion import FusionResult, fuse_batch
from ..engine.loading import LoadedModel
from ..engine.sampling import MAX_SEED, sample, validate_prompt
from ..engine.schema import setting

PICK_RULES = ("scorer", "checker")
LABEL_RULES = ("target", "score")  # PairingParams.label


@dataclass(frozen=True)
class PairingParams:
    """How candidates become pairs (paper: N=16, best quarter x2 vs worst half, no gap filter)."""

    num_candidates: int = setting(16, "images sampled per prompt")
    ref_fraction: float = setting(0.25, "best fraction used as references", flag=False)
    base_fraction: float = setting(0.5, "worst fraction used as bases", flag=False)
    min_gap: float = setting(0.0, "drop pairs whose reference scores less than this above the base (and, label=score,"
                                  " ties)")
    seed: int = setting(0, "candidate seeds derive from (seed, prompt)")
    label: str = setting("target", "who wins: target (paper: the fused image) | score (the higher-scored of base and "
                                   "target)")
    pick: str = setting("scorer", "who may be a reference or a base: scorer (paper: the best / worst scored) | "
                                  "checker (a world's ground-truth checker: references among the candidates it "
                                  "passes, bases among those it rejects, each ranked by score)")

    def validate(self) -> "PairingParams":
        if not (isinstance(self.num_candidates, int) and 2 <= self.num_candidates <= 4096):
            raise ValueError(f"num_candidates must be an integer in 2..4096, got {self.num_candidates!r}")
        if not (0 < self.ref_fraction <= 0.5 and 0 < self.base_fraction <= 1 - self.ref_fraction):
            raise ValueError("need 0 < ref_fraction <= 0.5 and 0 < base_fraction <= 1 - ref_fraction")
        if self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap}")
        if self.pick not in PICK_RULES:
            raise ValueError(f"pick must be one of {', '.join(PICK_RULES)}, got {self.pick!r}")
        if self.label not in LABEL_RULES:
            raise ValueError(f"label must be one of {', '.join(LABEL_RULES)}, got {self.label!r}")
        return self


def candidate_seeds(prompt: str, n: int, seed: int = 0) -> list[int]:
    """Stable per-prompt seeds in the engine's range 0..MAX_SEED: the same prompt and seed always give the same
    candidates (so the app can re-fuse any stored pair)."""
    h = int(hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()[:12], 16)
    return [(h + i) % (MAX_SEED + 1) for i in range(n)]


def verdict(base_score: float, target_score: float, min_gap: float = 0.0) -> str | None:
    """The scorer's preference within a pair: "target" or "base", whichever scores higher; None (a tie) when
    the scores are equal or closer than `min_gap`."""
    gap = float(target_score) - float(base_score)
    if gap == 0 or abs(gap) < min_gap:
        return None
    return "target" if gap > 0 else "base"


def choose_pairs(seeds: list[int], scores: np.ndarray, params: PairingParams,
                 verdicts: list[bool] | None = None) -> list[tuple[int, int]]:
    """(base_seed, ref_seed) pairs: reference k (k-th best) with bases 2k and 2k+1 of the worst half. With
    pick=checker (`verdicts`: the checker's pass / fail per candidate) references come only from the passing
    candidates and bases only from the failing ones, each side still ranked by score, a reference used as often as
    the scorer's pick uses one; none when a side is empty. There the checker decides, so a reference may score
    below its base: only a min_gap > 0 asks for a score gap as well."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    n = len(seeds)
    n_ref = max(1, int(round(n * params.ref_fraction)))
    n_base = max(1, int(round(n * params.base_fraction)))
    per_ref = max(1, n_base // n_ref)  # bases per reference (the paper: each reference twice)
    if params.pick == "checker":
        if verdicts is None or len(verdicts) != n:
            raise ValueError("pick=checker needs the checker's verdict on every candidate (a world with a checker)")
        refs = [int(i) for i in order if verdicts[i]][:n_ref]
        bases = [int(i) for i in order[::-1] if not verdicts[i]][:n_base]
        if not refs or not bases:
            return []
        per_ref = min(per_ref, max(1, len(bases) // len(refs)))
    else:
        refs = [int(i) for i in order[:n_ref]]
        bases = [int(i) for i in order[::-1][:n_base]]  # worst first
    gap_free = params.pick == "checker" and params.min_gap == 0
    pairs = []
    for k, r in enumerate(refs):
        for b in bases[k * per_ref:(k + 1) * per_ref]:
            if b != r and (gap_free or scores[r] - scores[b] >= params.min_gap):
                pairs.append((seeds[b], seeds[r]))
    return pairs


def record_from_result(res: FusionResult, model_id: str, scores: dict) -> PairRecord:
    if not res.log_probs_exact:  # a stored trajectory's log-probs must be those of the model it trains
        raise ValueError("the target's log-probs are the fused sampler's: call fusion.finish_log_probs first")
    pid = hashlib.sha256(f"{model_id}|{res.prompt}|{res.base_seed}|{res.ref_seed}|{res.fusion}|{res.sampling}"
                         .encode()).hexdigest()[:16]
    return PairRecord(prompt=res.prompt, base_seed=res.base_seed, ref_seed=res.ref_seed, scores=scores,
                      sampling=asdict(res.sampling), fusion=asdict(res.fusion), keywords=list(res.keywords),
                      model_id=model_id, target=res.target, base=res.base, masks=res.masks,
                      images={"base": res.base_image, "reference": res.reference_image, "target": res.target_image},
                      pair_id=pid)


def _candidates(model: LoadedModel, prompt: str, scorer, sampling: SamplingParams, pairing: PairingParams,
                batch_size: int, memo: dict | None):
    validate_prompt(prompt)
    key = (model.model_id, prompt, sampling, pairing.num_candidates, pairing.seed)
    if memo is not None and key in memo:
        return memo[key]
    seeds = candidate_seeds(prompt, pairing.num_candidates, pairing.seed)
    cands = sample(model, prompt, seeds, sampling, batch_size=batch_size)
    if scorer is None:  # the images alone (a control re-drawing its references): not kept as scored candidates
        return seeds, cands, None
    scores = np.asarray(scorer(cands.images, [prompt] * len(seeds)), dtype=np.float64)
    if memo is not None:
        memo[key] = (seeds, cands, scores)
    return seeds, cands, scores


def _fuse_prompt(model: LoadedModel, prompt: str, pairs, seeds, cands, scores, scorer, sampling, fusion,
                 batch_size: int) -> list[PairRecord]:
    """Fuse one prompt's (base, reference) pairs in batches and score the targets; records labelled 'target'."""
    by_seed = dict(zip(seeds, cands.trajectories))
    image_of = dict(zip(seeds, cands.images))
    score_of = dict(zip(seeds, scores.tolist()))
    per_call = max(1, batch_size // 3)
    results = []
    for j in range(0, len(pairs), per_call):
        chunk = pairs[j:j + per_call]
        results += fuse_batch(model, prompt, chunk, sampling, fusion, {b: by_seed[b] for b, _ in chunk},
                              base_images={b: image_of[b] for b, _ in chunk})
    t_scores = scorer([r.target_image for r in results], [prompt] * len(results))
    return [record_from_result(r, model.model_id, {"base": score_of[r.base_seed], "reference": score_of[r.ref_seed],
                                                   "target": float(ts)})
            for r, ts in zip(results, t_scores)]


def _count(stats: dict | None, key: str, n: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def build_pairs(model: LoadedModel, prompts: list[str], scorer, sampling: SamplingParams | None = None,
                fusion: FusionParams | None = None, pairing: PairingParams | None = None,
                batch_size: int = 16, progress=None, candidates: dict | None = None,
                stats: dict | None = None, check=None) -> list[PairRecord]:
    """Sample, score, pair and fuse for every prompt (`candidates`: see build_random_pairs).

    With `pairing.label == "score"` each record's label is the scorer's verdict (base or target) and ties
    within `min_gap` are dropped. `stats` (a dict) receives counts: fused, dropped_gap (reference less than
    min_gap above the base: not fused), dropped_tie (target and base tied: fused, not kept), kept.
    `check`: (images, prompt) -> pass / fail per image, a world's ground-truth checker, needed by pick=checker."""
    sampling = (sampling or model.default_sampling()).validate()
    fusion = (fusion or model.default_fusion()).validate(sampling.num_steps)
    pairing = (pairing or PairingParams()).validate()
    if not prompts:
        raise ValueError("no prompts given")
    if pairing.pick == "checker" and check is None:
        raise ValueError("pick=checker needs a checker: pass check=(images, prompt) -> pass / fail per image")
    check = check if pairing.pick == "checker" else None
    for key in ("fused", "dropped_gap", "dropped_tie", "kept"):
        _count(stats, key, 0)
    records = []
    for i, prompt in enumerate(prompts):
        seeds, cands, scores = _candidates(model, prompt, scorer, sampling, pairing, batch_size, candidates)
        verdicts = check(cands.images, prompt) if check is not None else None
        pairs = choose_pairs(seeds, scores, pairing, verdicts)
        if stats is not None and pairing.min_gap > 0:
            _count(stats, "dropped_gap",
                   len(choose_pairs(seeds, scores, replace(pairing, min_gap=0.0), verdicts)) - len(pairs))
        recs = _fuse_prompt(model, prompt, pairs, seeds, cands, scores, scorer, sampling, fusion,
                            batch_size) if pairs else []
        _count(stats, "fused", len(recs))
        if pairing.label == "score":
            for r in recs:
                r.label = verdict(r.scores["base"], r.scores["target"], pairing.min_gap) or "tie"
            _count(stats, "dropped_tie", sum(r.label == "tie" for r in recs))
            recs = [r for r in recs if r.label != "tie"]
        _count(stats, "kept", len(recs))
        records += recs
        if progress is not None:
            progress(i + 1, len(prompts))
    return records


def build_control_pairs(model: LoadedModel, records: list[PairRecord], sampling: SamplingParams | None = None,
                        pairing: PairingParams | None = None, batch_size: int = 16,
                        candidates: dict | None = None) -> list[PairRecord]:
    """The paper's control for D-Fusion pairs: each pair's unfused reference as winner over the same base. The
    same prompts, candidates, selection and label rule as `records` (D-Fusion pairs built with `candidates`,
    `sampling` and `pairing`); what differs is visual consistency alone. No fusion runs: the references are
    candidates already sampled. With the scorer's label rule the verdict is the reference's against the base."""
    sampling = (sampling or model.default_sampling()).validate()
    pairing = (pairing or PairingParams()).validate()
    out, drawn = [], {}
    for rec in records:
        if rec.prompt not in drawn:  # once a prompt (a memo miss re-draws its candidates)
            drawn[rec.prompt] = _candidates(model, rec.prompt, None, sampling, pairing, batch_size, candidates)
        seeds, cands, _ = drawn[rec.prompt]
        i = seeds.index(rec.ref_seed)
        label = "target"
        if pairing.label == "score":
            label = verdict(rec.scores["base"], rec.scores["reference"], pairing.min_gap) or "tie"
            if label == "tie":
                continue
        pid = hashlib.sha256(f"control|{rec.pair_id}".encode()).hexdigest()[:16]
        out.append(PairRecord(
            prompt=rec.prompt, base_seed=rec.base_seed, ref_seed=rec.ref_seed,
            scores={**rec.scores, "target": rec.scores["reference"]}, sampling=rec.sampling, fusion={}, keywords=[],
            model_id=rec.model_id, target=cands.trajectories[i], base=rec.base,
            masks=torch.zeros(sampling.num_steps, 1, 1),
            images={"base": rec.images.get("base"), "target": cands.images[i], "reference": cands.images[i]},
            label=label, pair_id=pid, extra={"kind": "control", "dfusion_pair": rec.pair_id}))
    return out


def build_random_pairs(model: LoadedModel, prompts: list[str], scorer, sampling: SamplingParams | None = None,
                       pairing: PairingParams | None = None, batch_size: int = 16,
                       candidates: dict | None = None, stats: dict | None = None, check=None) -> list[PairRecord]:
    """The paper's baseline in the same record format: per prompt, candidates paired at random, the higher
    score as winner ('target', not fused) and the lower as loser ('base'); masks empty. A tie (`verdict`:
    scores equal or closer than min_gap) is dropped; `stats` receives dropped_tie and kept. With `check` (a
    world's checker, (images, prompt) -> pass / fail per image) the checker labels instead: the passing image
    wins, and a pair both pass or both fail is a tie; the records keep the scorer's scores.

    `candidates` (a dict, shared between calls) keeps each prompt's sampled and scored candidates, so the
    random and the D-Fusion pairs of an experiment come from the very same images at half the cost."""
    sampling = (sampling or model.default_sampling()).validate()
    pairing = (pairing or PairingParams()).validate()
    records = []
    _count(stats, "dropped_tie", 0)
    for prompt in prompts:
        seeds, cands, scores = _candidates(model, prompt, scorer, sampling, pairing, batch_size, candidates)
        order = np.random.default_rng(int(seeds[0]) % (2 ** 32)).permutation(len(seeds))
        passes = check(cands.images, prompt) if check is not None else None
        for a, b in zip(order[0::2], order[1::2]):
            if passes is not None:
                v = None if bool(passes[a]) == bool(passes[b]) else "target" if passes[b] else "base"
            else:
                v = verdict(scores[a], scores[b], pairing.min_gap)  # a as "base", b as "target"
            if v is None:
                _count(stats, "dropped_tie", 1)
                continue
            w, l = (b, a) if v == "target" else (a, b)
            tw, tl = cands.trajectories[w], cands.trajectories[l]
            pid = hashlib.sha256(f"random|{model.model_id}|{prompt}|{seeds[l]}|{seeds[w]}|{sampling}".encode()).hexdigest()[:16]
            records.append(PairRecord(
                prompt=prompt, base_seed=seeds[l], ref_seed=seeds[w],
                scores={"base": float(scores[l]), "reference": float(scores[w]), "target": float(scores[w])},
                sampling=asdict(sampling), fusion={}, keywords=[], model_id=model.model_id, target=tw, base=tl,
                masks=torch.zeros(sampling.num_steps, 1, 1),
                images={"base": cands.images[l], "target": cands.images[w], "reference": cands.images[w]},
                pair_id=pid, extra={"kind": "random"}))
    _count(stats, "kept", len(records))
    return records


def save_new_pairs(records: list[PairRecord], out_dir: str | Path, rank: int = 0,
                   seen: set[str] | None = None) -> tuple[int, int]:
    """Save the records whose pair id the folder does not list yet (a re-run adds no duplicate line) to process
    `rank`'s index; `seen` (the ids listed, kept up to date here) spares re-reading the indexes. Returns
    (saved, skipped)."""
    seen = stored_pair_ids(out_dir) if seen is None else seen
    saved = 0
    for r in records:
        if r.pair_id in seen:
            continue
        save_record(r, out_dir, rank)
        seen.add(r.pair_id)
        saved += 1
    return saved, len(records) - saved


# ---- building into a pair folder, split over processes, resumable ----------------------------------------

def prompt_key(model_id: str, prompt: str, sampling: SamplingParams, fusion: FusionParams | None,
               pairing: PairingParams) -> str:
    """The name of a prompt's done marker: a hash of everything that decides its pairs (model, prompt, sampling,
    pairing, and fusion - None for random pairs), never of the process count."""
    pick = asdict(pairing)
    if pick.pop("pick") != "scorer":  # folders built before the choice keep their markers
        pick["pick"] = pairing.pick
    spec = {"model": model_id, "prompt": prompt, "sampling": asdict(sampling), "pairing": pick,
            "fusion": asdict(fusion) if fusion is not None else "random"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shard_prompts(prompts: list[str], rank: int = 0, world: int = 1) -> list[str]:
    """Process `rank`'s share of `world`: the prompts without repeats (first occurrence kept, so no two
    processes build the same pair), then every world-th one from position `rank`."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank {rank!r} of {world!r}")
    return list(dict.fromkeys(prompts))[rank::world]


REPORT_COUNTS = ("prompts_built", "prompts_done_before", "pairs", "written", "already_present", "dropped_tie",
                 "dropped_gap")


def _new_report(rank: int) -> dict:
    """One process's report: counts over its prompts (done before or built now), its failures, its time."""
    return {"rank": rank, **{k: 0 for k in REPORT_COUNTS}, "labels": {"target": 0, "base": 0}, "failed": [],
            "seconds": 0.0}


def _count_prompt(report: dict, info: dict, built: bool) -> None:
    """Add one prompt's marker `info` to a report; pairs of a prompt done before are all already present."""
    written = info.get("written", 0) if built else 0
    report["prompts_built" if built else "prompts_done_before"] += 1
    report["pairs"] += len(info["pairs"])
    report["written"] += written
    report["already_present"] += len(info["pairs"]) - written
    report["dropped_tie"] += info.get("dropped_tie", 0)
    report["dropped_gap"] += info.get("dropped_gap", 0)
    for k, n in info.get("labels", {}).items():
        report["labels"][k] = report["labels"].get(k, 0) + n


def _build_prompt(out_dir, model, prompt, scorer, sampling, fusion, pairing, batch_size, rank, seen, check) -> dict:
    """One prompt's pairs (fused, or random when `fusion` is None), saved; returns its done marker's content."""
    stats: dict = {}
    if fusion is None:
        recs = build_random_pairs(model, [prompt], scorer, sampling, pairing, batch_size, stats=stats)
    else:
        recs = build_pairs(model, [prompt], scorer, sampling, fusion, pairing, batch_size, stats=stats, check=check)
    written, _ = save_new_pairs(recs, out_dir, rank, seen)
    return {"prompt": prompt, "pairs": [r.pair_id for r in recs], "written": written,
            "labels": {k: sum(r.label == k for r in recs) for k in ("target", "base")},
            "dropped_tie": stats.get("dropped_tie", 0), "dropped_gap": stats.get("dropped_gap", 0)}


def build_into(out_dir: str | Path, model: LoadedModel, prompts: list[str], scorer,
               sampling: SamplingParams | None = None, fusion: FusionParams | None = None,
               pairing: PairingParams | None = None, *, random: bool = False, batch_size: int = 16, rank: int = 0,
               world: int = 1, done: dict | None = None, progress=None, check=None) -> dict:
    """Build process `rank`'s share (of `world`) of the prompts' pairs into the pair folder `out_dir`.

    Prompts marked done in `done` (default: the folder's markers now) are skipped; the rest are dealt round
    robin, prompt by prompt: sample, score, pair, fuse (`random`: the random baseline), save the pairs not
    listed yet to this process's index, then mark the prompt done. With several processes the caller reads
    `done` once and waits for all of them before any calls this, so all deal out the same remaining list. A
    prompt that raises is reported in "failed" with its error and left unmarked (a rerun retries it).
    `progress(i, n)`: i of this process's n prompts built. Returns this process's report (merge_reports)."""
    sampling = (sampling or model.default_sampling()).validate()
    fusion = None if random else (fusion or model.default_fusion()).validate(sampling.num_steps)
    pairing = (pairing or PairingParams()).validate()
    done = done_markers(out_dir) if done is None else done
    keys = {p: prompt_key(model.model_id, p, sampling, fusion, pairing) for p in dict.fromkeys(prompts)}
    report = _new_report(rank)
    for p in shard_prompts([p for p in keys if keys[p] in done], rank, world):
        _count_prompt(report, done[keys[p]], built=False)
    todo = shard_prompts([p for p in keys if keys[p] not in done], rank, world)
    start_index(out_dir, rank)
    seen = stored_pair_ids(out_dir)
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, len(todo))
    for i, p in enumerate(todo, 1):
        try:
            info = _build_prompt(out_dir, model, p, scorer, sampling, fusion, pairing, batch_size, rank, seen, check)
        except Exception as e:  # noqa: BLE001 - reported per prompt; the other prompts go on
            report["failed"].append({"prompt": p, "error": f"{type(e).__name__}: {e}", "rank": rank})
        else:
            mark_done(out_dir, keys[p], info)
            _count_prompt(report, info, built=True)
        if progress is not None:
            progress(i, len(todo))
    report["seconds"] = time.perf_counter() - t0
    return report


def merge_reports(reports: list[dict]) -> dict:
    """The processes' reports as one: counts summed, failures listed, seconds = the slowest process's."""
    out = _new_report(0)
    del out["rank"]
    for r in reports:
        for k in REPORT_COUNTS:
            out[k] += r[k]
        for k, n in r["labels"].items():
            out["labels"][k] = out["labels"].get(k, 0) + n
        out["failed"] += r["failed"]
        out["seconds"] = max(out["seconds"], r["seconds"])
    out["processes"] = len(reports)
    return out
