"""Retrain the ShapesWorld models with one command, then measure them and write their model card.

    python -m recipes.shapesworld.retrain --out runs/retrain [--install]                 # the default (v3) model
    python -m recipes.shapesworld.retrain --out runs/retrain-v2 --world-version 2        # the v2 model it starts from
    python -m recipes.shapesworld.retrain --out runs/retrain-unet --world-version 1      # the UNet model

Stages, in order; each resumes from its checkpoints or is skipped when its output exists, so the command can
simply be run again after an interruption:
  generator  world 3: train_mmdit at patch 1 (16x16 image tokens) on v3 scenes, its blocks started from the v2
             model (--v3-init), --v3-steps at lr 1e-3, then --v3-anneal-steps at --v3-anneal-lr
             world 2: train_mmdit (the UNet model's autoencoder fine-tuned on v2, then the SD3-shaped
             transformer)                                -> <out>/shapesworld/pipeline
             world 1: train_generator (autoencoder, text encoder + UNet from scratch)
  clip       the OpenCLIP scorer on scenes of the world   -> <out>/shapesworld-clip/model
  checker    the checker's validation, clean and noisy    -> <out>/checker.json, <out>/checker-noise.json
  install    (--install) copy the models into assets/     -> world 3: assets/shapesworld + assets/shapesworld-clip;
             world 2: assets/shapesworld-v2; world 1: assets/shapesworld-unet (a component that holds the same
             weights as the default model's - text encoder, tokenizer, autoencoder - becomes a link to it)
  eval       test-prompt evaluation of the installed (or run's) models -> <out>/eval.json
  fusion     worlds 2 and 3: ground-truth fusion-transfer table -> <out>/fusion.json
  card       the model card from the measured files       -> assets/MODEL_CARD.md (world 3 with --install) or
             <out>/MODEL_CARD.md

The shipped v3 model was trained in several resumed runs (docs/shapesworld-v3.md: 4,452 steps at lr 1e-3, the
first 3,139 from a checkpoint whose optimizer state was not kept, then 499 at 2e-4) and its scorer was tuned
further on the generator's own checker-labelled samples (sample_bank.py, train_clip --bank); this command runs
the same schedule in one go, so its numbers are a re-run's, not the shipped bits.
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
INSTALLED = {3: "shapesworld", 2: "shapesworld-v2", 1: "shapesworld-unet"}  # world version -> its assets/ folder


@dataclass
class RetrainConfig:
    world_version: int = setting(3, "3: the default SD3-shaped model (16x16 image tokens); 2: the v2 model (8x8) it "
                                    "starts from; 1: the UNet model")
    minutes: float = setting(600.0, "worlds 2 and 3: each transformer run's training-time cap (the step counts stop "
                                     "it first)")
    max_steps: int = setting(14531, "world 2: transformer steps, the shipped model's (0 = only the time budget)")
    unet_steps: int = setting(10000, "world 1: UNet steps")
    clip_steps: int = setting(2500, "scorer steps")
    threads: int = setting(2, "torch threads of every stage")
    eval_prompts: int = setting(40, "test prompts per family")
    eval_seeds: int = setting(5, "seeds per test prompt")
    fusion_prompts: int = setting(8, "train prompts per family of the fusion-transfer table")
    v3_init: str = setting(str(ASSETS / "shapesworld-v2"), "world 3: the v2 pipeline whose blocks it starts from")
    v3_steps: int = setting(4452, "world 3: transformer steps at lr 1e-3")
    v3_anneal_steps: int = setting(499, "world 3: then this many steps at v3_anneal_lr (the shipped model's anneal)")
    v3_anneal_lr: float = setting(2e-4, "world 3: the anneal's learning rate")


def _install(src: Path, dest: Path) -> None:
    """Replace dest by a copy of src (links kept as links); the old folder goes only once the copy is complete."""
    if not src.is_dir():
        raise SystemExit(f"error: {src} does not exist; run the stage that writes it first")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    replace_folder(tmp, dest)


SHARED_PARTS = ("text_encoder", "tokenizer", "vae")  # components the shipped models may share with the default


def _same_weights(a: Path, b: Path) -> bool:
    """Two component folders hold the same files (weights and configs), byte for byte."""
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())  # noqa: E731
    return files(a) == files(b) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def _install_beside_default(src: Path, dest: Path) -> None:
    """A second model beside the default one: each component that holds the same files as the default model's
    (the default model froze this text encoder and reuses v2's autoencoder) becomes a link to it, so it is shipped
    once; a retrained one that differs is kept as its own folder."""
    _install(src, dest)
    default = ASSETS / "shapesworld"
    for part in SHARED_PARTS:
        mine, shared = dest / part, default / part
        if shared.is_dir() and mine.is_dir() and not mine.is_symlink() and _same_weights(mine, shared):
            shutil.rmtree(mine)
            mine.symlink_to(f"../shapesworld/{part}", target_is_directory=True)


def _generator(cfg: RetrainConfig, gen: Path) -> None:
    if cfg.world_version == 1:
        from . import train_generator

        train_generator.main(["--out", str(gen), "--unet-steps", str(cfg.unet_steps), "--threads", str(cfg.threads)])
        return
    from . import train_mmdit

    if cfg.world_version == 3:
        return _v3_generator(cfg, gen)
    args = ["--out", str(gen), "--minutes", str(cfg.minutes), "--max-steps", str(cfg.max_steps),
            "--threads", str(cfg.threads)]
    train_mmdit.main(args + (["--resume"] if (gen / "state.pt").exists() else []))


def _v3_generator(cfg: RetrainConfig, gen: Path) -> None:
    """Patch 1 on v3 scenes from the v2 model's blocks at lr 1e-3, then the anneal from that run's weights
    (each run resumes; the first is skipped once the anneal has started)."""
    from . import train_mmdit

    common = ["--world-version", "3", "--patch", "1", "--no-bf16", "--minutes", str(cfg.minutes),
              "--threads", str(cfg.threads)]
    main_run = gen.with_name(gen.name + "-lr1e-3")
    if not (gen / "state.pt").exists():
        resume = ["--resume"] if (main_run / "state.pt").exists() else []
        train_mmdit.main(["--out", str(main_run), "--init", cfg.v3_init, "--max-steps", str(cfg.v3_steps),
                          *common, *resume])
    resume = ["--resume"] if (gen / "state.pt").exists() else []
    train_mmdit.main(["--out", str(gen), "--init", str(main_run / "pipeline"), "--lr", str(cfg.v3_anneal_lr),
                      "--warmup", "20", "--max-steps", str(cfg.v3_anneal_steps), *common, *resume])


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
    if "fusion" in stages and cfg.world_version in (2, 3):
        from . import fusion_transfer

        fusion_transfer.main(["--model", str(model_dir), "--prompts", str(cfg.fusion_prompts),
                              "--out", str(out / "fusion.json")])


def run(out: Path, cfg: RetrainConfig, stages=STAGES, install: bool = False, extra: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gen, clip = out / "shapesworld", out / "shapesworld-clip"
    installed = ASSETS / INSTALLED[cfg.world_version]
    model_dir = installed if install else gen / "pipeline"
    scorer_dir = ASSETS / "shapesworld-clip" if install and cfg.world_version == 3 else clip / "model"
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
        if cfg.world_version == 3:
            _install(gen / "pipeline", ASSETS / "shapesworld")
            _install(clip / "model", ASSETS / "shapesworld-clip")
        else:
            _install_beside_default(gen / "pipeline", installed)
    _measure(cfg, out, stages, model_dir, scorer_dir)
    if "card" in stages:
        from . import model_card

        card = ASSETS / "MODEL_CARD.md" if install and cfg.world_version == 3 else out / "MODEL_CARD.md"
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
                    "docs/model_card_extra.md; world 2: docs/model_card_extra_v2.md; world 1: "
                    "docs/model_card_extra_unet.md)")
    a = ap.parse_args(argv)
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    if a.world_version not in INSTALLED:
        ap.error(f"--world-version must be 1, 2 or 3, got {a.world_version}")
    cfg = RetrainConfig(**{k: getattr(a, k) for k in vars(defaults)})
    extra = a.extra or {3: "docs/model_card_extra.md", 2: "docs/model_card_extra_v2.md",
                        1: "docs/model_card_extra_unet.md"}[cfg.world_version]
    if a.extra and not Path(a.extra).is_file():
        ap.error(f"--extra {a.extra} does not exist")
    run(Path(a.out), cfg, stages, a.install, extra if Path(extra).is_file() else None)


if __name__ == "__main__":
    main()
