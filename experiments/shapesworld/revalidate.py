"""Finished arms' adapters on a larger validation set than the harness's own (a second look at a calibration).

    python -m experiments.shapesworld.revalidate --out runs/ev3 --model PIPELINE --prompts 12 --seeds 6 \
        --arms dpo__random@lr0.0003__s0 dpo__random@lr0.001__s0

The harness chooses its learning rate on 6 validation prompts a family x 4 seeds, which resolve about +-0.04. This
evaluates the plain model and each named arm (OUT/train/ARM: the adapter the arm was evaluated with) on
`--prompts` TRAIN-split prompts a family after the trained ones (never trained on) x `--seeds` fresh seeds, and
gives each arm's paired difference from the plain model (95% interval resampling prompts). It reads TEST nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfusion_core.engine.config import MaskParams, SamplingParams, apply_model_defaults
from dfusion_core.engine.loading import load_model
from dfusion_core.worlds.shapesworld.evaluate import evaluate
from dfusion_core.worlds.shapesworld.world import FAMILIES, stratified_prompt_list

from .experiment import ExperimentConfig
from .statistics import paired_difference


def revalidate(out: Path, model_path: str | None, arms: list[str], prompts: int, seeds: int, seed: int,
               train_prompts: int = ExperimentConfig.train_prompts, num_steps: int = ExperimentConfig.num_steps) -> dict:
    lists = {f: stratified_prompt_list(f, "train", prompts, offset=train_prompts) for f in FAMILIES}
    missing = [out / "train" / a for a in arms if not (out / "train" / a / "pytorch_lora_weights.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no adapter (is the arm finished?)")
    reports = {}
    for arm in ["base", *arms]:
        folder = None if arm == "base" else out / "train" / arm
        model = load_model(model_path, device="cpu", lora=str(folder) if folder else None)
        sampling, _ = apply_model_defaults(model.defaults, SamplingParams(num_steps=num_steps), MaskParams())
        reports[arm] = evaluate(model, None, "train", 0, seeds, sampling, seed=seed, localise=False, prompt_lists=lists)
    base = reports["base"]["rows"]
    return {"prompts_per_family": prompts, "seeds": seeds, "seed": seed,
            "arms": {a: {"accuracy": {f: r["families"][f]["accuracy"] for f in r["families"]},
                         **({"movement": paired_difference(r["rows"], base, "all")} if a != "base" else {})}
                     for a, r in reports.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the experiment's output folder")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded ShapesWorld model)")
    ap.add_argument("--arms", nargs="+", required=True, help="arm folder names under OUT/train")
    ap.add_argument("--prompts", type=int, default=12, help="validation prompts per family (12)")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per prompt (6)")
    ap.add_argument("--seed", type=int, default=2001, help="evaluation seeds derive from it (2001: not the harness's)")
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.seeds < 1:
        ap.error("--prompts and --seeds must be >= 1")
    try:
        res = revalidate(a.out, a.model, a.arms, a.prompts, a.seeds, a.seed)
    except FileNotFoundError as e:
        ap.error(str(e))
    (a.out / "revalidate.json").write_text(json.dumps(res, indent=1))
    for arm, r in res["arms"].items():
        m = r.get("movement")
        print(arm, f"{r['accuracy']['all']:.3f}", "" if m is None else
              f"{m['diff']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]")


if __name__ == "__main__":
    main()
