"""fuse, build-pairs and import: one fused pair, pairs in bulk (split over accelerate processes), and adding a pair
folder or archive to a preference store."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import (SCORER_HELP, SEED_RANGE, add_fusion_flags, add_model_flags, add_prompt_flags, add_sampling_flags,
                     check_model_arg, finish_processes, int_at_least, load_model_arg, params_from_args, plural,
                     progress_bar, prompts_arg, scorer_arg, seed_arg, start_processes, world_checker)


def cmd_fuse(a) -> dict:
    from ..engine.inputs import check_pair_seeds, validate_prompt

    validate_prompt(a.prompt)
    check_pair_seeds(a.base_seed, a.ref_seed)  # the app's rule: in range and two different images
    check_model_arg(a)  # all before torch loads: a wrong folder is said at once
    from ..engine.fusion import fuse
    from ..pairs.build import record_from_result, save_new_pairs, verdict

    scorer = scorer_arg(a.scorer)
    model = load_model_arg(a)
    s, f = params_from_args(a, model)
    res = fuse(model, a.prompt, a.base_seed, a.ref_seed, s, f)
    scores = {}
    if scorer is not None:
        vals = scorer([res.base_image, res.reference_image, res.target_image], [a.prompt] * 3)
        scores = dict(zip(("base", "reference", "target"), map(float, vals)))
    rec = record_from_result(res, model.model_id, scores)
    if scores:  # the scorer's verdict; unscored, the paper's assumption (the fused target wins)
        rec.label = verdict(scores["base"], scores["target"]) or "tie"
    saved, _ = save_new_pairs([rec], a.out)
    return {"pair_id": rec.pair_id, "out": str(a.out), "stored": bool(saved), "label": rec.label,
            "keywords": res.keywords, "token_groups": [list(g) for g in res.token_groups],
            "mask_factors": list(res.mask_factors), "mask_coverage": res.mask_coverage, "scores": scores}


def cmd_build_pairs(a) -> dict | None:
    from ..worlds import discover

    discover()  # world plug-ins register their WORLD:FAMILY:SPLIT prompt lists
    from ..pairs.build import PairingParams, build_into, done_markers, merge_reports
    from ..engine.sampling import validate_prompt

    prompts = prompts_arg(a)
    for p in prompts:
        validate_prompt(p)  # before the model loads
    pairing = PairingParams(num_candidates=a.num_candidates, min_gap=a.min_gap, seed=a.seed, label=a.label,
                            pick=a.pick).validate()
    if a.scorer == "none":
        raise ValueError("build-pairs needs a scorer: pairs are chosen and labelled by score")
    if a.random and a.pick == "checker":
        raise ValueError("--random pairs candidates at random: --pick checker does not apply to it")
    state, device = start_processes(a)
    check_model_arg(a)
    scorer = scorer_arg(a.scorer, device)  # one per process, beside its model (README: Command line)
    model = load_model_arg(a, device, state)
    s, f = params_from_args(a, model)
    check = world_checker(model) if pairing.pick == "checker" else None  # refused here, once, not per prompt
    done = done_markers(a.out)
    state.wait_for_everyone()  # every process has read the markers before any writes one
    report = build_into(a.out, model, prompts, scorer, s, f, pairing, random=a.random, batch_size=a.batch_size,
                        rank=state.process_index, world=state.num_processes, done=done,
                        progress=progress_bar(state), check=check)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        reports = gather_object([report])
    else:
        reports = [report]
    finish_processes(state)
    if not state.is_main_process:
        return None  # one summary per run, from the main process
    return _build_summary(a, merge_reports(reports), len(dict.fromkeys(prompts)))


def _build_summary(a, m: dict, n_prompts: int) -> dict:
    """The merged report: one readable summary on stderr, the JSON result for stdout."""
    print(f"kept {m['pairs']} pairs of {n_prompts} prompts ({m['written']} written now, {m['already_present']} "
          f"already stored; {m['prompts_done_before']} prompts were done before this run); dropped "
          f"{m['dropped_tie']} ties (scores closer than --min-gap {a.min_gap}) and {m['dropped_gap']} pairs whose "
          f"reference was under --min-gap above its base; {plural(m['processes'], 'process', 'processes')}, "
          f"{m['seconds']:.1f} s",
          file=sys.stderr, flush=True)
    if m["failed"]:
        print(f"{plural(len(m['failed']), 'prompt', 'prompts')} failed (a rerun retries them):", file=sys.stderr)
        for fail in m["failed"]:
            print(f"  {fail['prompt']!r} (process {fail['rank']}): {fail['error']}", file=sys.stderr, flush=True)
    return {"pairs": m["pairs"], "labels": m["labels"], "dropped": {"tie": m["dropped_tie"], "gap": m["dropped_gap"]},
            "saved": m["written"], "already_stored": m["already_present"], "prompts": n_prompts,
            "prompts_built": m["prompts_built"], "prompts_done_before": m["prompts_done_before"],
            "failed": m["failed"], "processes": m["processes"], "build_s": round(m["seconds"], 3), "out": a.out}


def cmd_import(a):
    """A pair folder (an export, build-pairs output, or folders holding them) or a .zip / .tar / .tar.gz of one
    into a preference store: the import report (per index file: imported, skipped as duplicates, failed, why)."""
    from ..data.preference_store import PreferenceStore

    if not Path(a.source).expanduser().exists():  # before the store folder is created
        raise ValueError(f"{a.source} does not exist")
    return PreferenceStore(a.store).import_pairs(a.source)


def _add_fuse_build(sub) -> None:
    out_help = "pair folder: pairs.jsonl plus each pair's files; a pair it already lists is not added again " \
               "(default: %(default)s)"
    p = sub.add_parser("fuse", help="fuse one (base, reference) pair, score it and store it")
    p.add_argument("--prompt", required=True, help="what the images should show (required)")
    p.add_argument("--base-seed", type=seed_arg, required=True, help=f"the base image's seed, {SEED_RANGE} (required)")
    p.add_argument("--ref-seed", type=seed_arg, required=True,
                   help=f"the reference image's seed, {SEED_RANGE}, not the base's (required)")
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP}; the label is its verdict (the higher of "
                   "base and target wins, equal scores: tie); 'none' stores no scores and labels the target the "
                   "winner, the paper's assumption (default: %(default)s)")
    p.add_argument("--out", default="out/pairs", help=out_help)
    add_model_flags(p), add_sampling_flags(p), add_fusion_flags(p)
    p.set_defaults(fn=cmd_fuse)

    p = sub.add_parser("build-pairs", help="sample N per prompt, score, pair, fuse, label by score; under "
                       "`accelerate launch` the prompts are split over the processes; a rerun resumes")
    add_prompt_flags(p)
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP} (default: %(default)s)")
    p.add_argument("--num-candidates", type=int_at_least(2, 4096), default=16,
                   help="images sampled and scored per prompt (default: %(default)s)")
    p.add_argument("--min-gap", type=float, default=0.0, help="score gap: a pair whose reference scores less "
                   "than this above its base is not fused, and a target and base closer than this are a tie "
                   "and dropped (default: %(default)s)")
    p.add_argument("--label", choices=("score", "target"), default="score", help="who wins a fused pair: score = "
                   "the higher-scored of base and target (ties dropped); target = the fused image always (the "
                   "paper's labelling) (default: %(default)s)")
    p.add_argument("--pick", choices=("scorer", "checker"), default="scorer", help="who may be a reference or a "
                   "base: scorer = the best / worst scored (the paper); checker = references among the candidates "
                   "the model's world checker passes, bases among those it rejects (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="candidate seeds derive from (this, prompt) (default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="images per denoiser call (default: %(default)s)")
    p.add_argument("--random", action="store_true", help="the paper's baseline: random pairs, no fusion")
    p.add_argument("--out", default="out/pairs", help="pair folder: pairs.jsonl (process N of several: "
                   "pairs.pN.jsonl), each pair's files, and done/ with a marker per finished prompt; a rerun skips "
                   "prompts marked done and adds no pair already listed (default: %(default)s)")
    add_model_flags(p), add_sampling_flags(p), add_fusion_flags(p)
    p.set_defaults(fn=cmd_build_pairs)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="add the pairs of a pair folder or a .zip / .tar / .tar.gz to a preference "
                       "store; pairs already there (or listed twice) are skipped, bad lines and files are named")
    p.add_argument("--source", required=True, help="an export, a build-pairs folder, a folder holding such "
                   "folders, or a .zip / .tar / .tar.gz of one (required)")
    p.add_argument("--store", default="dfusion_data/store", help="preference store folder, created if missing "
                   "(the app's --store) (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: one line per file)")
    p.set_defaults(fn=cmd_import)


def add_parsers(sub) -> None:
    _add_fuse_build(sub)
    _add_import(sub)
