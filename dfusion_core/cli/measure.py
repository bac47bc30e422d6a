"""eval and bench: a world's evaluation of a model (checker accuracy, CLIP score, mask localisation) and plain vs
fused timings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import (SCORER_HELP, add_fusion_flags, add_model_flags, add_sampling_flags, int_at_least, load_model_arg,
    params_from_args)


def cmd_eval(a) -> dict:
    from ..pairs.scoring import DEFAULT_SCORER, make_scorer
    from ..worlds.registry import world_of
    from ..worlds import discover

    discover()
    model = load_model_arg(a)
    world = world_of(model.defaults)
    if world is None or world.evaluate is None:
        raise ValueError(f"eval needs a model trained on a registered world (its dfusion.json names one); "
                         f"{model.model_id} names {model.defaults.get('world')!r}")
    evaluate = world.evaluate
    s, _ = params_from_args(a, model)
    scorer = None
    if a.scorer != "none" and (a.scorer != "default" or DEFAULT_SCORER.is_dir()):
        scorer = make_scorer(None if a.scorer == "default" else a.scorer)
    families = tuple(a.families) if a.families else None
    res = evaluate(model, scorer, a.split, a.n_prompts, a.seeds, s, **({"families": families} if families else {}),
                   progress=lambda i, n: print(f"[{i}/{n}] prompts", file=sys.stderr, flush=True))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return {k: v for k, v in res.items() if k != "rows"}


def cmd_bench(a) -> dict:
    from ..bench.fusion import run_bench

    model = load_model_arg(a)
    s, f = params_from_args(a, model)
    return run_bench(model, a.prompt, s, f, repeats=a.repeats)


def _add_eval_bench(sub) -> None:
    p = sub.add_parser("eval", help="ShapesWorld evaluation: checker accuracy, CLIP score, mask localisation")
    p.add_argument("--split", choices=["train", "test"], default="test", help="prompt split (default: %(default)s)")
    p.add_argument("--n-prompts", type=int_at_least(1), default=40, help="prompts per family (default: %(default)s)")
    p.add_argument("--seeds", type=int_at_least(1), default=5, help="samples per prompt (default: %(default)s)")
    p.add_argument("--families", nargs="+", choices=["action", "attribute", "spatial"], default=None,
                   help="prompt families (default: all three)")
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP}, or 'none' for no CLIP score; 'default' "
                   "is skipped when that scorer is missing (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the full report (with per-sample rows) here as JSON "
                   "(default: none, the summary goes to stdout only)")
    add_model_flags(p), add_sampling_flags(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="plain vs fused vs cached re-fusion timings")
    p.add_argument("--prompt", default="a red circle above a blue square",
                   help="the prompt to time (default: %(default)s)")
    p.add_argument("--repeats", type=int_at_least(1), default=5, help="timed runs of each kind; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on one line (default: a table)")
    add_model_flags(p), add_sampling_flags(p), add_fusion_flags(p)
    p.set_defaults(fn=cmd_bench)


def add_parsers(sub) -> None:
    _add_eval_bench(sub)
