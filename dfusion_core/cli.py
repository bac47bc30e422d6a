"""Command line: `python -m dfusion_core <command> --help`.

Commands: sample, fuse, build-pairs, train, tokens, eval, bench. Every command takes --model (a diffusers pipeline
folder or hub id; default: the embedded ShapesWorld model) and prints JSON on stdout (bench: a readable
table unless --json). Bad input exits with status 2 and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

from .engine import offline  # noqa: F401
from .engine.config import COMBINE_MODES, FUSION_LAYER_PRESETS, RESIZE_MODES, THRESHOLD_MODES, FusionParams, MaskParams, SamplingParams, \
    apply_model_defaults


def _seed_list(s: str) -> list[int]:
    out = []
    for part in s.replace(",", " ").split():
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or hub id (default: assets/shapesworld); "
                   "'tiny:sd15-full' builds a random SD 1.5-shaped UNet for benchmarks")
    p.add_argument("--lora", default=None, help="LoRA folder to load on top (e.g. the output of train)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp32 on CPU, fp16 on CUDA")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (paper defaults unless the model's dfusion.json says otherwise)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (20)")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM eta (1.0); for SD3-family models the SDE's noise level (0.7)")
    g.add_argument("--flow-sampler", default=None, choices=["sde", "ddim", "ode"],
                   help="SD3-family models: sde (Flow-GRPO, default), ddim (DDIM for rectified flow) or ode "
                        "(deterministic: no log-probs)")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (5.0; ShapesWorld 2.0)")
    g.add_argument("--negative", default=None, help="negative prompt ('')")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)


def _add_fusion(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion")
    g.add_argument("--keywords", nargs="+", default=None, help="words to mask (default: content words)")
    g.add_argument("--threshold-mode", choices=THRESHOLD_MODES, default=None)
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--start-step", type=int, default=None, help="first fused step, 1-based (3)")
    g.add_argument("--end-step", type=int, default=None, help="last fused step (last)")
    g.add_argument("--layers", nargs="+", default=None, help=f"preset {FUSION_LAYER_PRESETS} or module-path prefixes")
    g.add_argument("--mask-factors", type=int, nargs="+", default=None, help="cross-attention downsampling factors (4)")
    g.add_argument("--combine", choices=COMBINE_MODES, default=None,
                   help="keywords' maps: mean then threshold (default) | threshold each, OR them (paper)")
    g.add_argument("--resize", choices=RESIZE_MODES, default=None)
    g.add_argument("--dilate", type=int, default=None)
    g.add_argument("--feather", type=float, default=None)
    g.add_argument("--no-mask", action="store_true", help="global fusion (ablation)")
    g.add_argument("--union-base", action="store_true", help="mask = reference's OR base's")


def _load(a):
    from .engine.loading import load_model

    if a.model and a.model.startswith("tiny:"):
        from .engine.tiny import build_tiny_pipeline

        path = build_tiny_pipeline(a.model.split(":", 1)[1], Path(tempfile.mkdtemp()) / "pipe")
        return load_model(path, device=a.device, dtype=a.dtype, lora=getattr(a, "lora", None))
    return load_model(a.model, device=a.device, dtype=a.dtype, lora=getattr(a, "lora", None))


def _params(a, model) -> tuple[SamplingParams, FusionParams]:
    s, m = apply_model_defaults(model.defaults, SamplingParams(), MaskParams())
    s = SamplingParams(**{**asdict(s), **{k: v for k, v in {
        "num_steps": a.steps, "eta": a.eta, "guidance_scale": a.cfg, "negative_prompt": a.negative,
        "height": a.height, "width": a.width, "flow_sampler": a.flow_sampler}.items() if v is not None}})
    f = FusionParams(mask=m)
    if hasattr(a, "threshold_mode"):
        mk = {k: v for k, v in {"keywords": tuple(a.keywords) if a.keywords else None,
                                "threshold_mode": a.threshold_mode, "threshold": a.threshold, "resize": a.resize,
                                "combine": a.combine,
                                "dilate": a.dilate, "feather": a.feather,
                                "layer_factors": tuple(a.mask_factors) if a.mask_factors else None}.items() if v is not None}
        if a.union_base:
            mk["union_base"] = True
        layers = None
        if a.layers:
            layers = a.layers[0] if len(a.layers) == 1 and a.layers[0] in FUSION_LAYER_PRESETS else tuple(a.layers)
        f = FusionParams(**{k: v for k, v in {"start_step": a.start_step, "end_step": a.end_step,
                                              "layers": layers}.items() if v is not None},
                         use_mask=not a.no_mask, mask=MaskParams(**{**asdict(m), **mk}))
    s.validate()
    f.validate(s.num_steps)
    return s, f


def cmd_tokens(a) -> dict | list:
    from transformers import CLIPTokenizer

    from .engine.tokens import default_keywords, word_tokens

    if a.model and not a.model.startswith("tiny:"):
        from .engine.loading import load_model
        tok = load_model(a.model, device="cpu").tokenizer
    else:
        from .engine.loading import DEFAULT_MODEL
        from .engine.tokenizer_build import write_clip_tokenizer
        d = DEFAULT_MODEL / "tokenizer"
        tok = CLIPTokenizer.from_pretrained(d if d.is_dir() else write_clip_tokenizer(tempfile.mkdtemp()))
    words = [w.as_json() for w in word_tokens(tok, a.prompt)]
    if a.with_keywords:
        return {"words": words, "default_keywords": default_keywords(tok, a.prompt)}
    return words


def cmd_sample(a) -> dict:
    from safetensors.torch import save_file

    from .engine.sampling import sample

    model = _load(a)
    s, _ = _params(a, model)
    seeds = _seed_list(a.seeds)
    res = sample(model, a.prompt, seeds, s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed, im, tr in zip(seeds, res.images, res.trajectories):
        im.save(out / f"seed{seed}.png")
        save_file({k: v.contiguous() for k, v in tr.tensors("trajectory").items()}, str(out / f"seed{seed}.safetensors"))
        files.append(str(out / f"seed{seed}.png"))
    return {"prompt": a.prompt, "seeds": seeds, "images": files, "sampling": asdict(s)}


def cmd_fuse(a) -> dict:
    from .engine.fusion import fuse
    from .engine.pairs import record_from_result, save_record

    model = _load(a)
    s, f = _params(a, model)
    res = fuse(model, a.prompt, a.base_seed, a.ref_seed, s, f)
    scores = {}
    if a.scorer:
        from .engine.scoring import make_scorer

        sc = make_scorer(None if a.scorer == "default" else a.scorer)
        vals = sc([res.base_image, res.reference_image, res.target_image], [a.prompt] * 3)
        scores = dict(zip(("base", "reference", "target"), map(float, vals)))
    rec = record_from_result(res, model.model_id, scores)
    out = save_record(rec, a.out)
    return {"pair_id": rec.pair_id, "out": str(out), "keywords": res.keywords,
            "token_groups": [list(g) for g in res.token_groups], "mask_factors": list(res.mask_factors),
            "mask_coverage": res.mask_coverage, "scores": scores}


def cmd_build_pairs(a) -> dict:
    from .worlds import discover

    discover()  # world plug-ins register their WORLD:FAMILY:SPLIT prompt lists
    from .engine.pairs import PairingParams, build_pairs, save_pairs
    from .engine.prompt_sets import load_prompt_set
    from .engine.scoring import make_scorer

    model = _load(a)
    s, f = _params(a, model)
    entries = []
    for spec in a.prompt_set or []:
        entries += load_prompt_set(spec)
    prompts = [e.prompt for e in entries] + list(a.prompt or [])
    if a.limit:
        prompts = prompts[:a.limit]
    if not prompts:
        raise ValueError("give prompts with --prompt or --prompt-set")
    scorer = make_scorer(None if a.scorer == "default" else a.scorer)
    pairing = PairingParams(num_candidates=a.num_candidates, min_gap=a.min_gap, seed=a.seed)
    if a.random:
        from .engine.pairs import build_random_pairs

        recs = build_random_pairs(model, prompts, scorer, s, pairing, batch_size=a.batch_size)
    else:
        recs = build_pairs(model, prompts, scorer, s, f, pairing, batch_size=a.batch_size,
                           progress=lambda i, n: print(f"[{i}/{n}] prompts", file=sys.stderr, flush=True))
    save_pairs(recs, a.out)
    return {"pairs": len(recs), "prompts": len(prompts), "out": a.out}


def cmd_train(a) -> dict:
    from dataclasses import fields as _fields

    from .training.data import load_training_pairs
    from .training.trainer import TrainConfig, Trainer

    base = {}
    if a.config:
        try:
            base = json.loads(Path(a.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {a.config}: {e}") from None
        unknown = set(base) - {f.name for f in _fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
    flags = {f.name: getattr(a, f.name) for f in _fields(TrainConfig) if getattr(a, f.name, None) is not None}
    cfg = TrainConfig(**{**base, **flags})
    if isinstance(cfg.lora_targets, list):
        cfg = TrainConfig(**{**asdict(cfg), "lora_targets": tuple(cfg.lora_targets)})
    cfg.validate()
    pairs = load_training_pairs(a.data, cfg.algo)  # refused data (e.g. eta = 0 for traj-dpo) before the model loads
    model = _load(a)
    trainer = Trainer(model, pairs, cfg, a.out)
    res = trainer.run(resume=not a.no_resume)
    if not trainer.acc.is_main_process:
        return None  # one report per run, from the main process
    last = res.history[-1] if res.history else {}
    return {"out": str(res.out_dir), "steps": res.steps, "pairs": len(pairs), "processes": trainer.acc.num_processes,
            "last": last}


def cmd_eval(a) -> dict:
    from .engine.scoring import DEFAULT_SCORER, make_scorer
    from .engine.worlds import world_of
    from .worlds import discover

    discover()
    model = _load(a)
    world = world_of(model.defaults)
    if world is None or world.evaluate is None:
        raise ValueError(f"eval needs a model trained on a registered world (its dfusion.json names one); "
                         f"{model.model_id} names {model.defaults.get('world')!r}")
    evaluate = world.evaluate
    s, _ = _params(a, model)
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
    from .engine.bench import run_bench

    model = _load(a)
    s, f = _params(a, model)
    return run_bench(model, a.prompt, s, f, repeats=a.repeats)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dfusion_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokens", help="prompt words -> token positions (JSON)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--with-keywords", action="store_true", help="also print the default keywords")
    p.add_argument("--model", default=None)
    p.set_defaults(fn=cmd_tokens)

    p = sub.add_parser("sample", help="sample images with trajectories")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", default="0", help="e.g. '0 1 2' or '0-15'")
    p.add_argument("--out", default="out/sample")
    _add_model(p), _add_sampling(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("fuse", help="fuse one (base, reference) pair and store it")
    p.add_argument("--prompt", required=True)
    p.add_argument("--base-seed", type=int, required=True)
    p.add_argument("--ref-seed", type=int, required=True)
    p.add_argument("--scorer", default=None, help="'default' (ShapesWorld CLIP) or openclip:NAME:CKPT")
    p.add_argument("--out", default="out/pairs")
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_fuse)

    p = sub.add_parser("build-pairs", help="sample N per prompt, score, pair and fuse")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-set", action="append", help="paper:FAMILY:SPLIT, shapesworld:FAMILY:SPLIT or a file")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--scorer", default="default")
    p.add_argument("--num-candidates", type=int, default=16)
    p.add_argument("--min-gap", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--random", action="store_true", help="the paper's baseline: random pairs, no fusion")
    p.add_argument("--out", default="out/pairs")
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_build_pairs)

    p = sub.add_parser("train", help="fine-tune on pairs: dpo | traj-dpo | ddpo | dpok (accelerate launch for N GPUs)")
    p.add_argument("--data", required=True, help="preference store folder or pair folder")
    p.add_argument("--out", required=True, help="output folder (LoRA, checkpoints, log.jsonl)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    from dataclasses import fields as _fields

    from .engine.config import field_comments
    from .training.trainer import TrainConfig
    notes = field_comments(TrainConfig)
    for fld in _fields(TrainConfig):
        flag, doc = "--" + fld.name.replace("_", "-"), f"{notes.get(fld.name, '')} (default: {fld.default})"
        if fld.name == "lora_targets":
            p.add_argument(flag, nargs="+", default=None, help=doc)
        elif fld.name in ("algo", "mixed_precision"):
            p.add_argument(flag, default=None, help=doc)
        else:
            typ = float if isinstance(fld.default, float) or fld.default is None else int
            p.add_argument(flag, type=typ, default=None, help=doc)
    _add_model(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="ShapesWorld evaluation: checker accuracy, CLIP score, mask localisation")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--n-prompts", type=int, default=40, help="prompts per family")
    p.add_argument("--seeds", type=int, default=5, help="samples per prompt")
    p.add_argument("--families", nargs="+", choices=["action", "attribute", "spatial"], default=None)
    p.add_argument("--scorer", default="default", help="'default' (ShapesWorld CLIP), 'none' or openclip:...")
    p.add_argument("--out", default=None, help="write the full report (with per-sample rows) here")
    _add_model(p), _add_sampling(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="plain vs fused vs cached re-fusion timings")
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object on one line (default: a table)")
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None and a.command == "bench" and not a.json:
        from .engine.bench import format_report
        print(format_report(result))
    elif result is not None:
        print(json.dumps(result, indent=None if a.command == "bench" else 2, ensure_ascii=False))  # words as typed
    return 0
