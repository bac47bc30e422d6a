"""The CLI's on-policy training and pair-signal subcommands (registered by dfusion_core/cli.py's build_parser):

    python -m dfusion_core train-on-policy --algo ddpo --prompt-set shapesworld:attribute:train --scorer default \
        --rounds 10 --arm dfusion --out runs/ddpo-rounds
    accelerate launch --num_processes N -m dfusion_core train-on-policy ...   # rounds split over N processes
    python -m dfusion_core pair-signal --data PAIRS [--model M] [--json]

Same contract as every command: JSON on stdout (pair-signal: a table unless --json), bad input exits 2 with one
'error:' line, checked before a model loads where the flags alone show the mistake.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from .. import cli as _cli
from ..engine.config import field_comments, model_defaults, read_config_json

SKIPPED_FIELDS = ("steps", "ckpt_every", "dpo_beta", "traj_beta")  # rounds decide the steps; a checkpoint after
# every round; the DPO betas belong to the offline methods


def _on_policy_config(a):
    from ..training.onpolicy import OnPolicyConfig

    names = {f.name for f in fields(OnPolicyConfig)} - set(SKIPPED_FIELDS)
    base = read_config_json(a.config, names) if a.config else {}
    flags = {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}
    cfg = {**base, **flags}
    if isinstance(cfg.get("lora_targets"), list):
        cfg["lora_targets"] = tuple(cfg["lora_targets"])
    return OnPolicyConfig(**cfg).validate()


def cmd_train_on_policy(a) -> dict:
    from ..engine.pairs import PairingParams
    from ..engine.sampling import validate_prompt
    from ..training.onpolicy import train_on_policy
    from ..worlds import discover

    discover()  # world plug-ins register their WORLD:FAMILY:SPLIT prompt lists
    cfg = _on_policy_config(a)
    prompts = _cli._prompts(a)
    for p in prompts:
        validate_prompt(p)
    pairing = PairingParams(num_candidates=a.num_candidates, min_gap=a.min_gap, seed=a.pairing_seed,
                            label=a.label).validate()
    if a.scorer == "none":
        raise ValueError("on-policy rounds need a scorer: the rewards are its scores")
    if a.eta == 0 or a.flow_sampler == "ode":  # before the model loads (the trainer checks the model's defaults)
        raise ValueError(f"{cfg.algo} learns from the sampling steps' log-probabilities: sample with eta > 0 "
                         "(and, on a flow model, flow_sampler sde or ddim)")
    state, device = _cli._processes(a)  # under accelerate launch: process i on GPU i, its share of the prompts
    _cli._check_model(a)
    scorer = _cli._scorer(a.scorer, device)
    model = _cli._load(a, device, state)
    s, f = _cli._params(a, model)
    summary = train_on_policy(model, prompts, scorer, cfg, a.out, s, f, pairing, resume=not a.no_resume)
    _cli._finish_processes(state)
    return summary if state.is_main_process else None  # one summary per run, from the main process


def _checker_for(a, records):
    """The checker of the world the pairs' model was trained on: --model's dfusion.json, else the records' model
    folder, else none."""
    from ..engine.worlds import world_of
    from ..worlds import discover

    discover()
    folders = [a.model] if a.model else list(dict.fromkeys(r.model_id for r in records))
    for folder in folders:
        if folder and Path(folder).expanduser().is_dir():
            world = world_of(model_defaults(Path(folder).expanduser()))
            if world is not None and world.check is not None:
                return world.name, world.check
    return None, None


def cmd_pair_signal(a) -> dict | None:
    from ..training.pair_signal import format_signal, load_records, pair_signal

    records = load_records(a.data, with_images=True)
    if not records:
        raise ValueError(f"{a.data} holds no pairs")
    world, check = (None, None) if a.no_checker else _checker_for(a, records)
    sig = pair_signal(records, check)
    if a.json:
        return {"data": str(a.data), "checker": world, **sig.as_dict()}
    print(format_signal(sig, str(a.data)) + f"\n  {'checker':<20} {world or '-'}")
    return None


def _add_config_flags(p) -> None:
    from ..training.onpolicy import OnPolicyConfig
    from ..training.trainer import TrainConfig

    notes = {**field_comments(TrainConfig), **field_comments(OnPolicyConfig)}
    for fld in fields(OnPolicyConfig):
        if fld.name in SKIPPED_FIELDS:
            continue
        flag, doc = "--" + fld.name.replace("_", "-"), f"{notes.get(fld.name, '')} (default: {_cli._fmt(fld.default)})"
        if fld.name == "lora_targets":
            p.add_argument(flag, nargs="+", default=None, help=doc)
        elif isinstance(fld.default, str):
            p.add_argument(flag, default=None, help=doc)
        else:
            typ = float if isinstance(fld.default, float) or fld.default is None else int
            p.add_argument(flag, type=typ, default=None, help=doc)


def add_parsers(sub) -> None:
    p = sub.add_parser("train-on-policy", help="DDPO / DPOK in on-policy rounds: sample from the current LoRA, pair "
                       "(D-Fusion or random), score, train; repeat")
    p.add_argument("--out", required=True, help="output folder: LoRA, checkpoints, log.jsonl, rounds.jsonl (required)")
    p.add_argument("--prompt", action="append", help="a prompt, repeatable (default: none; give --prompt or "
                   "--prompt-set)")
    p.add_argument("--prompt-set", action="append", help="paper:FAMILY:SPLIT, shapesworld:FAMILY:SPLIT or a file, "
                   "repeatable (default: none)")
    p.add_argument("--limit", type=_cli._int_at_least(1), default=None, help="use only the first N prompts "
                   "(default: all)")
    p.add_argument("--scorer", default="default", help=f"{_cli.SCORER_HELP} (default: %(default)s)")
    p.add_argument("--num-candidates", type=_cli._int_at_least(2, 4096), default=16,
                   help="images sampled per prompt per round (default: %(default)s)")
    p.add_argument("--min-gap", type=float, default=0.0, help="drop pairs whose reference scores less than this "
                   "above the base (default: %(default)s)")
    p.add_argument("--label", choices=("score", "target"), default="target", help="who wins a fused pair (on-policy "
                   "rewards are the scores either way; score drops ties) (default: %(default)s)")
    p.add_argument("--pairing-seed", type=_cli._int_at_least(0), default=0, help="candidate seeds derive from "
                   "(this, round, prompt) (default: %(default)s)")
    p.add_argument("--config", default=None, help="JSON file of OnPolicyConfig fields; flags override it "
                   "(default: none)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    _add_config_flags(p)
    _cli._add_model(p), _cli._add_sampling(p), _cli._add_fusion(p)
    p.set_defaults(fn=cmd_train_on_policy)

    p = sub.add_parser("pair-signal", help="a pair set's signal before training: checker gap, score gap, "
                       "consistency inside / outside the mask")
    p.add_argument("--data", required=True, help="pair folder or preference store (required)")
    p.add_argument("--model", default=None, help="model folder whose world's checker to use (default: the pairs' "
                   "model folder, if it names a world)")
    p.add_argument("--no-checker", action="store_true", help="skip the ground-truth checker")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.set_defaults(fn=cmd_pair_signal)


if __name__ == "__main__":  # pragma: no cover - use python -m dfusion_core
    sys.exit(_cli.main())
