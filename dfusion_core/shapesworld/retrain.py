"""Retrain every ShapesWorld model from scratch with one command, then measure it and write its model card.

    python -m dfusion_core.shapesworld.retrain --out runs [--install]

Stages, in order; each resumes from its checkpoints or is skipped when its output exists, so the command can
simply be run again after an interruption:
  generator  autoencoder, latents, text encoder + UNet   -> <out>/shapesworld/pipeline
  clip       the OpenCLIP scorer                          -> <out>/shapesworld-clip/model
  checker    the checker's validation, clean and noisy    -> <out>/checker.json, <out>/checker-noise.json
  install    (--install) copy both models into assets/    -> assets/shapesworld, assets/shapesworld-clip
  eval       test-prompt evaluation of the installed (or run's) models -> <out>/eval.json
  card       the model card from the measured files       -> assets/MODEL_CARD.md (--install) or <out>/MODEL_CARD.md
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..data.atomic import replace_folder
from ..engine.loading import ASSETS

STAGES = ("generator", "clip", "checker", "install", "eval", "card")


def _install(src: Path, dest: Path) -> None:
    """Replace dest by a copy of src; the old folder is removed only once the copy is complete."""
    if not src.is_dir():
        raise SystemExit(f"error: {src} does not exist; run the stage that writes it first")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_folder(tmp, dest)


def run(out: Path, stages=STAGES, install: bool = False, unet_steps: int = 10000, clip_steps: int = 1500,
        threads: int = 2, eval_prompts: int = 40, eval_seeds: int = 5, extra: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gen, clip = out / "shapesworld", out / "shapesworld-clip"
    model_dir = ASSETS / "shapesworld" if install else gen / "pipeline"
    scorer_dir = ASSETS / "shapesworld-clip" if install else clip / "model"
    if "generator" in stages:
        from . import train_generator

        train_generator.main(["--out", str(gen), "--unet-steps", str(unet_steps), "--threads", str(threads)])
    if "clip" in stages:
        from . import train_clip

        train_clip.main(["--out", str(clip), "--steps", str(clip_steps), "--vae", str(gen / "vae.pt"),
                         "--threads", str(threads)])
    if "checker" in stages:
        from .validate_checker import validate

        for name, degrade in (("checker.json", None), ("checker-noise.json", "noise")):
            if not (out / name).exists():
                (out / name).write_text(json.dumps(validate(2400 if degrade is None else 1200, 0, degrade), indent=2))
    if "install" in stages and install:
        _install(gen / "pipeline", ASSETS / "shapesworld")
        _install(clip / "model", ASSETS / "shapesworld-clip")
    if "eval" in stages:
        from ..engine.loading import load_model
        from ..engine.scoring import make_scorer
        from .evaluate import evaluate

        report = evaluate(load_model(str(model_dir)), make_scorer(str(scorer_dir)), "test", eval_prompts, eval_seeds)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
    if "card" in stages:
        from . import model_card

        argv = ["--eval", str(out / "eval.json"), "--checker", str(out / "checker.json"),
                "--checker-noisy", str(out / "checker-noise.json"), "--gen-log", str(gen / "log.jsonl"),
                "--clip-log", str(clip / "log.jsonl"), "--out", str(ASSETS / "MODEL_CARD.md" if install else out / "MODEL_CARD.md")]
        model_card.main(argv + (["--extra", extra] if extra else []))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs", help="folder of all runs, logs and measurements")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--install", action="store_true", help="replace the shipped models in assets/ and their card")
    ap.add_argument("--unet-steps", type=int, default=10000)
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-prompts", type=int, default=40, help="test prompts per family")
    ap.add_argument("--eval-seeds", type=int, default=5)
    ap.add_argument("--extra", default="docs/model_card_extra.md", help="markdown appended to the model card")
    a = ap.parse_args(argv)
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    run(Path(a.out), stages, a.install, a.unet_steps, a.clip_steps, a.threads, a.eval_prompts, a.eval_seeds,
        a.extra if a.extra and Path(a.extra).is_file() else None)


if __name__ == "__main__":
    main()
