"""Retrain the ShapesWorld models with one command, then measure them and write their model card.

    python -m recipes.shapesworld.retrain --out runs/retrain [--install]                 # the default model
    python -m recipes.shapesworld.retrain --out runs/retrain-unet --world-version 1      # the UNet model

Stages, in order; each resumes from its checkpoints or is skipped when its output exists, so the command can
simply be run again after an interruption:
  generator  world 2: train_mmdit (the UNet model's autoencoder fine-tuned on v2, then the SD3-shaped
             transformer)                                -> <out>/shapesworld/pipeline
             world 1: train_generator (autoencoder, text encoder + UNet from scratch)
  clip       the OpenCLIP scorer on scenes of the world   -> <out>/shapesworld-clip/model
  checker    the checker's validation, clean and noisy    -> <out>/checker.json, <out>/checker-noise.json
  install    (--install) copy the models into assets/     -> world 2: assets/shapesworld + assets/shapesworld-clip;
             world 1: assets/shapesworld-unet (its text encoder stays the folder shared with the default model)
  eval       test-prompt evaluation of the installed (or run's) models -> <out>/eval.json
  fusion     world 2: ground-truth fusion-transfer table  -> <out>/fusion.json
  card       the model card from the measured files       -> assets/MODEL_CARD.md (--install) or <out>/MODEL_CARD.md
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dfusion_core.data.atomic import replace_folder
from dfusion_core.engine.loading import ASSETS
from dfusion_core.engine.schema import setting

STAGES = ("generator", "clip", "checker", "install", "eval", "fusion", "card")


@dataclass
class RetrainConfig:
    world_version: int = setting(2, "2: the default SD3-shaped model; 1: the second, UNet model")
    minutes: float = setting(150.0, "world 2: the transformer's training-time cap (max_steps usually stops it first)")
    max_steps: int = setting(14531, "world 2: transformer steps, the shipped model's (0 = only the time budget)")
    unet_steps: int = setting(10000, "world 1: UNet steps")
    clip_steps: int = setting(2500, "scorer steps")
    threads: int = setting(2, "torch threads of every stage")
    eval_prompts: int = setting(40, "test prompts per family")
    eval_seeds: int = setting(5, "seeds per test prompt")
    fusion_prompts: int = setting(8, "train prompts per family of the fusion-transfer table")


def _install(src: Path, dest: Path) -> None:
    """Replace dest by a copy of src (links kept as links); the old folder goes only once the copy is complete."""
    if not src.is_dir():
        raise SystemExit(f"error: {src} does not exist; run the stage that writes it first")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    replace_folder(tmp, dest)


def _install_unet_model(src: Path) -> None:
    """The UNet model beside the default one; its text encoder becomes a link to the default model's when both
    hold the same weights (the default model froze this encoder), so it is shipped once."""
    import torch
    from transformers import CLIPTextModel

    from dfusion_core.engine.loading import quiet_shared_encoder_reports

    dest, shared = ASSETS / "shapesworld-unet", ASSETS / "shapesworld" / "text_encoder"
    _install(src, dest)
    if not shared.is_dir():
        return
    quiet_shared_encoder_reports()
    a = CLIPTextModel.from_pretrained(dest / "text_encoder").state_dict()
    b = CLIPTextModel.from_pretrained(shared).state_dict()
    if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a):
        shutil.rmtree(dest / "text_encoder")
        (dest / "text_encoder").symlink_to("../shapesworld/text_encoder", target_is_directory=True)


def _generator(cfg: RetrainConfig, gen: Path) -> None:
    if cfg.world_version == 1:
        from . import train_generator

        train_generator.main(["--out", str(gen), "--unet-steps", str(cfg.unet_steps), "--threads", str(cfg.threads)])
        return
    from . import train_mmdit

    args = ["--out", str(gen), "--minutes", str(cfg.minutes), "--max-steps", str(cfg.max_steps),
            "--threads", str(cfg.threads)]
    train_mmdit.main(args + (["--resume"] if (gen / "state.pt").exists() else []))


def _measure(cfg: RetrainConfig, out: Path, stages, model_dir: Path, scorer_dir: Path) -> None:
    from dfusion_core.engine.config import MaskParams, SamplingParams, apply_model_defaults
    from dfusion_core.engine.loading import load_model

    if "eval" in stages:
        from dfusion_core.pairs.scoring import make_scorer
        from dfusion_core.worlds.shapesworld.evaluate import evaluate

        model = load_model(str(model_dir))
        sampling, _ = apply_model_defaults(model.defaults, SamplingParams(), MaskParams())  # as `eval` samples
        report = evaluate(model, make_scorer(str(scorer_dir)), "test", cfg.eval_prompts, cfg.eval_seeds, sampling)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
    if "fusion" in stages and cfg.world_version == 2:
        from . import fusion_transfer

        fusion_transfer.main(["--model", str(model_dir), "--prompts", str(cfg.fusion_prompts),
                              "--out", str(out / "fusion.json")])


def run(out: Path, cfg: RetrainConfig, stages=STAGES, install: bool = False, extra: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gen, clip = out / "shapesworld", out / "shapesworld-clip"
    installed = ASSETS / ("shapesworld" if cfg.world_version == 2 else "shapesworld-unet")
    model_dir = installed if install else gen / "pipeline"
    scorer_dir = ASSETS / "shapesworld-clip" if install and cfg.world_version == 2 else clip / "model"
    if "generator" in stages:
        _generator(cfg, gen)
    if "clip" in stages:
        from . import train_clip

        train_clip.main(["--out", str(clip), "--steps", str(cfg.clip_steps), "--vae", str(gen / "vae.pt"),
                         "--world-version", str(cfg.world_version), "--threads", str(cfg.threads)])
    if "checker" in stages:
        from .validate_checker import validate

        for name, n, degrade in (("checker.json", 2400, None), ("checker-noise.json", 1200, "noise")):
            if not (out / name).exists():
                (out / name).write_text(json.dumps(validate(n, 0, degrade, world=cfg.world_version), indent=2))
    if "install" in stages and install:
        if cfg.world_version == 2:
            _install(gen / "pipeline", ASSETS / "shapesworld")
            _install(clip / "model", ASSETS / "shapesworld-clip")
        else:
            _install_unet_model(gen / "pipeline")
    _measure(cfg, out, stages, model_dir, scorer_dir)
    if "card" in stages:
        from . import model_card

        card = ASSETS / "MODEL_CARD.md" if install and cfg.world_version == 2 else out / "MODEL_CARD.md"
        argv = ["--model", str(model_dir), "--eval", str(out / "eval.json"), "--checker", str(out / "checker.json"),
                "--checker-noisy", str(out / "checker-noise.json"), "--gen-log", str(gen / "log.jsonl"),
                "--clip-log", str(clip / "log.jsonl"), "--out", str(card)]
        if (out / "fusion.json").is_file():
            argv += ["--fusion", str(out / "fusion.json")]
        model_card.main(argv + (["--extra", extra] if extra else []))


def main(argv=None) -> None:
    from dfusion_core.engine.schema import help_of as field_comments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/retrain", help="folder of all runs, logs and measurements (runs/retrain)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--install", action="store_true", help="replace the shipped models in assets/ and their card")
    helps, defaults = field_comments(RetrainConfig), RetrainConfig()
    for name, value in vars(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                        help=f"{helps.get(name, '')} ({value})")
    ap.add_argument("--extra", default=None, help="markdown appended to the model card (default: "
                    "docs/model_card_extra.md; world 1: docs/model_card_extra_unet.md)")
    a = ap.parse_args(argv)
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    if a.world_version not in (1, 2):
        ap.error(f"--world-version must be 1 or 2, got {a.world_version}")
    cfg = RetrainConfig(**{k: getattr(a, k) for k in vars(defaults)})
    extra = a.extra or ("docs/model_card_extra.md" if cfg.world_version == 2 else "docs/model_card_extra_unet.md")
    if a.extra and not Path(a.extra).is_file():
        ap.error(f"--extra {a.extra} does not exist")
    run(Path(a.out), cfg, stages, a.install, extra if Path(extra).is_file() else None)


if __name__ == "__main__":
    main()
