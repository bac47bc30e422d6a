"""train, train-on-policy and pair-signal: offline fine-tuning on a pair set (dpo | traj-dpo | ddpo | dpok), DDPO /
DPOK in on-policy rounds, and a pair set's signal before training.

    python -m dfusion_core train --data PAIRS --out runs/dpo [--algo dpo] [--config cfg.json]
    python -m dfusion_core train-on-policy --algo ddpo --prompt-set shapesworld:attribute:train --scorer default \
        --rounds 10 --arm dfusion --out runs/ddpo-rounds
    accelerate launch --num_processes N -m dfusion_core train ...   # data parallel; rounds split prompts likewise
    python -m dfusion_core pair-signal --data PAIRS [--model M] [--json]
"""
from __future__ import annotations

from pathlib import Path

from ..engine.config import model_defaults
from .common import (SCORER_HELP, add_fusion_flags, add_model_flags, add_prompt_flags, add_sampling_flags,
                     add_setting_flags, check_model_arg, config_from_args, finish_processes, int_at_least,
                     load_model_arg, params_from_args, prompts_arg, scorer_arg, start_processes)

SKIPPED_FIELDS = ("steps", "ckpt_every", "dpo_beta", "traj_beta", "val_fraction", "patience")  # rounds decide
# the steps; a checkpoint after every round; the DPO betas and held-out pairs belong to the offline methods


def cmd_train(a) -> dict:
    from ..training.data import load_training_pairs
    from ..training.trainer import TrainConfig, Trainer

    cfg = config_from_args(a, TrainConfig)
    pairs = load_training_pairs(a.data, cfg.algo)  # refused data (e.g. eta = 0 for traj-dpo) before the model loads
    model = load_model_arg(a)
    trainer = Trainer(model, pairs, cfg, a.out)
    res = trainer.run(resume=not a.no_resume)
    finish_processes(trainer.acc.state)
    if not trainer.acc.is_main_process:
        return None  # one report per run, from the main process
    last = res.history[-1] if res.history else {}
    out = {"out": str(res.out_dir), "steps": res.steps, "pairs": len(pairs), "processes": trainer.acc.num_processes,
           "last": last}
    if trainer.validations:  # held-out pairs: the exported weights are the best checkpoint's
        es = trainer.stopper
        out |= {"held_out_pairs": len(trainer.val_pairs), "best_step": es.best_step, "best_held_out_acc": es.best_score,
                "stopped_early": es.should_stop}
    return out


def cmd_train_on_policy(a) -> dict:
    from ..pairs.build import PairingParams
    from ..engine.sampling import validate_prompt
    from ..training.onpolicy import OnPolicyConfig, train_on_policy
    from ..worlds import discover

    discover()  # world plug-ins register their WORLD:FAMILY:SPLIT prompt lists
    cfg = config_from_args(a, OnPolicyConfig, skip=SKIPPED_FIELDS)
    prompts = prompts_arg(a)
    for p in prompts:
        validate_prompt(p)
    pairing = PairingParams(num_candidates=a.num_candidates, min_gap=a.min_gap, seed=a.pairing_seed,
                            label=a.label).validate()
    if a.scorer == "none":
        raise ValueError("on-policy rounds need a scorer: the rewards are its scores")
    if a.eta == 0 or a.flow_sampler == "ode":  # before the model loads (the trainer checks the model's defaults)
        raise ValueError(f"{cfg.algo} learns from the sampling steps' log-probabilities: sample with eta > 0 "
                         "(and, on a flow model, flow_sampler sde or ddim)")
    state, device = start_processes(a)  # under accelerate launch: process i on GPU i, its share of the prompts
    check_model_arg(a)
    scorer = scorer_arg(a.scorer, device)
    model = load_model_arg(a, device, state)
    s, f = params_from_args(a, model)
    summary = train_on_policy(model, prompts, scorer, cfg, a.out, s, f, pairing, resume=not a.no_resume)
    finish_processes(state)
    return summary if state.is_main_process else None  # one summary per run, from the main process


def _checker_for(a, records):
    """The checker of the world the pairs' model was trained on: --model's dfusion.json, else the records' model
    folder, else none."""
    from ..worlds.registry import world_of
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


def _add_train(sub) -> None:
    from ..training.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune on pairs: dpo | traj-dpo | ddpo | dpok (accelerate launch for N GPUs)")
    p.add_argument("--data", required=True, help="preference store folder or pair folder (required)")
    p.add_argument("--out", required=True, help="output folder: LoRA, checkpoints, log.jsonl (required)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields; flags override it "
                   "(default: none)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    add_setting_flags(p, TrainConfig)
    add_model_flags(p)
    p.set_defaults(fn=cmd_train)


def _add_on_policy(sub) -> None:
    from ..training.config import OnPolicyConfig

    p = sub.add_parser("train-on-policy", help="DDPO / DPOK in on-policy rounds: sample from the current LoRA, pair "
                       "(D-Fusion or random), score, train; repeat")
    p.add_argument("--out", required=True, help="output folder: LoRA, checkpoints, log.jsonl, rounds.jsonl (required)")
    add_prompt_flags(p)
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP} (default: %(default)s)")
    p.add_argument("--num-candidates", type=int_at_least(2, 4096), default=16,
                   help="images sampled per prompt per round (default: %(default)s)")
    p.add_argument("--min-gap", type=float, default=0.0, help="drop pairs whose reference scores less than this "
                   "above the base (default: %(default)s)")
    p.add_argument("--label", choices=("score", "target"), default="target", help="who wins a fused pair (on-policy "
                   "rewards are the scores either way; score drops ties) (default: %(default)s)")
    p.add_argument("--pairing-seed", type=int_at_least(0), default=0, help="candidate seeds derive from "
                   "(this, round, prompt) (default: %(default)s)")
    p.add_argument("--config", default=None, help="JSON file of OnPolicyConfig fields; flags override it "
                   "(default: none)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    add_setting_flags(p, OnPolicyConfig, skip=SKIPPED_FIELDS)
    add_model_flags(p), add_sampling_flags(p), add_fusion_flags(p)
    p.set_defaults(fn=cmd_train_on_policy)


def _add_pair_signal(sub) -> None:
    p = sub.add_parser("pair-signal", help="a pair set's signal before training: checker gap, score gap, "
                       "consistency inside / outside the mask")
    p.add_argument("--data", required=True, help="pair folder or preference store (required)")
    p.add_argument("--model", default=None, help="model folder whose world's checker to use (default: the pairs' "
                   "model folder, if it names a world)")
    p.add_argument("--no-checker", action="store_true", help="skip the ground-truth checker")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.set_defaults(fn=cmd_pair_signal)


def add_parsers(sub) -> None:
    _add_train(sub)
    _add_on_policy(sub)
    _add_pair_signal(sub)
