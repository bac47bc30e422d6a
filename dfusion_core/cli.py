"""Command line: `python -m dfusion_core <command> --help`.

Commands: sample, fuse, build-pairs, train, train-on-policy, pair-signal, tokens, eval, bench, import. Every model
command takes --model (a
diffusers pipeline folder or hub id; default: the embedded ShapesWorld model) and prints JSON on stdout (bench: a
readable table, import: its report, unless --json). Bad input exits with status 2 and one line starting with `error:`, never a traceback;
flags are checked before a model loads where they alone show the mistake. `accelerate launch ... -m dfusion_core
build-pairs` splits the prompts over the processes (train too: data parallel); build-pairs exits with status 1
when a prompt failed (each is listed with its error; a rerun retries it). Seeds and pairs follow the engine's
rules (engine.sampling.check_seed / check_pair_seeds), which the app uses too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from .engine import offline  # noqa: F401
from .engine.config import COMBINE_MODES, FUSION_LAYER_PRESETS, RESIZE_MODES, THRESHOLD_MODES, FusionParams, MaskParams, \
    SamplingParams, field_comments, missing_model_folder, model_defaults, read_config_json

# engine.loading.DEFAULT_MODEL without importing torch (the help must not wait for it); tests check they agree
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapesworld"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's contract for bad input: status 2 and one line starting with `error:`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _int_at_least(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi (hi: no upper bound when None)."""
    def integer(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'in {lo}..{hi}' if hi is not None else f'at least {lo}'}, "
                                             f"got {v}")
        return v
    return integer


def _seed(text: str) -> int:
    """An argparse type: one seed, checked by the engine's seed rule (the app's too)."""
    from .engine.sampling import check_seed

    try:
        return check_seed(int(text), "a seed")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.strip().lstrip("-").isdigit()
                                         else f"{text!r} is not an integer seed") from None


def _seed_list(s: str) -> list[int]:
    """'0 1 2', '0,3,7' or '0-15' (inclusive) -> seeds, each checked by the engine's seed rule."""
    out = []
    for part in s.replace(",", " ").split():
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            lo, hi = _seed(a), _seed(b)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"the range {part} is empty: write it low-high, e.g. {hi}-{lo}")
            out += list(range(lo, hi + 1))
        else:
            out.append(_seed(part))
    if not out:
        raise argparse.ArgumentTypeError("no seeds given: e.g. '0 1 2' or '0-15'")
    return out


def _fmt(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else repr(v) if v == "" else str(v)


def _doc(cls, name: str, text: str | None = None) -> str:
    """A config field's help: its comment (or `text`) and its default, and where the shipped model's dfusion.json
    sets another value, that too (the default --model uses it)."""
    default = cls.__dataclass_fields__[name].default
    shipped = model_defaults(SHIPPED_MODEL).get(name)
    note = f"; the model's dfusion.json may set another: the shipped model's is {_fmt(shipped)}" \
        if shipped is not None and _fmt(shipped) != _fmt(default) else ""
    return f"{text or field_comments(cls)[name]} (default: {_fmt(default)}{note})"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or hub id; 'tiny:KIND' builds a random pipeline "
                   "(tiny:sd1, tiny:sd15-full for benchmarks, ...) (default: the shipped ShapesWorld model, "
                   "assets/shapesworld)")
    p.add_argument("--lora", default=None, help="LoRA folder to load on top, e.g. the output of train "
                   "(default: none)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights' precision (default: fp32 on CPU, fp16 on CUDA)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (paper defaults unless the model's dfusion.json says otherwise)")
    g.add_argument("--steps", type=int, default=None, help=_doc(SamplingParams, "num_steps"))
    g.add_argument("--eta", type=float, default=None, help=_doc(
        SamplingParams, "eta", "DDIM eta: 0 deterministic, 1 DDPM-like (log-probs need > 0); SD3-family models: "
                               "the SDE's noise level, whose default is 0.7"))
    g.add_argument("--flow-sampler", default=None, choices=["sde", "ddim", "ode"], help=_doc(
        SamplingParams, "flow_sampler", "SD3-family models: sde (Flow-GRPO), ddim (DDIM for rectified flow) or ode "
                                        "(deterministic: no log-probs)"))
    g.add_argument("--cfg", type=float, default=None, help=_doc(SamplingParams, "guidance_scale"))
    g.add_argument("--negative", default=None, help=_doc(SamplingParams, "negative_prompt"))
    for name in ("height", "width"):
        shipped = model_defaults(SHIPPED_MODEL).get(name)
        g.add_argument(f"--{name}", type=int, default=None,
                       help=f"image {name} in pixels, a multiple of 8 (default: the model's size"
                            f"{f'; the shipped model: {shipped}' if shipped else ''})")


def _add_fusion(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion (paper defaults unless the model's dfusion.json says otherwise)")
    g.add_argument("--keywords", nargs="+", default=None,
                   help="prompt words whose attention makes the mask (default: the prompt's content words)")
    g.add_argument("--threshold-mode", choices=THRESHOLD_MODES, default=None, help="how the map is cut into the mask: "
                   + _doc(MaskParams, "threshold_mode"))
    g.add_argument("--threshold", type=float, default=None, help=_doc(
        MaskParams, "threshold", "absolute: attention probability; relative: fraction of the map's max; area: "
                                 "fraction of the image kept; auto ignores it"))
    g.add_argument("--start-step", type=int, default=None, help=_doc(FusionParams, "start_step"))
    g.add_argument("--end-step", type=int, default=None, help="last fused step, 1-based inclusive "
                   "(default: the last step)")
    g.add_argument("--layers", nargs="+", default=None,
                   help=_doc(FusionParams, "layers", f"fusion layers: a preset {'|'.join(FUSION_LAYER_PRESETS)} "
                                                     "(mid+up = paper) or module-path prefixes"))
    g.add_argument("--mask-factors", type=int, nargs="+", default=None, help=_doc(
        MaskParams, "layer_factors", "read cross-attention at latent/F for each factor F (powers of two)"))
    g.add_argument("--combine", choices=COMBINE_MODES, default=None, help=_doc(
        MaskParams, "combine", "keywords' maps: mean = threshold their mean | union = threshold each, OR them "
                               "(paper)"))
    g.add_argument("--resize", choices=RESIZE_MODES, default=None, help=_doc(MaskParams, "resize"))
    g.add_argument("--dilate", type=int, default=None, help=_doc(MaskParams, "dilate"))
    g.add_argument("--feather", type=float, default=None, help=_doc(MaskParams, "feather"))
    g.add_argument("--no-mask", action="store_true", help="global fusion, no mask (the ablation)")
    g.add_argument("--union-base", action=argparse.BooleanOptionalAction, default=None, help=_doc(
        MaskParams, "union_base", "the mask covers the base's keyword objects too (reference OR base)"))
    g.add_argument("--hold-outside", action=argparse.BooleanOptionalAction, default=None, help=_doc(
        FusionParams, "hold_outside", "keep the base's latents outside the mask (log-probs recomputed under the "
                                      "plain model)"))


def _load(a, device: str | None = None, state=None):
    """The --model (on `device`, default --device); 'tiny:KIND' is built once, by the main process when several
    run (`state`, an accelerate PartialState), so that all load the very same pipeline folder."""
    from .engine.loading import load_model

    model = a.model
    if model and model.startswith("tiny:"):
        model = _build_tiny(model.split(":", 1)[1], state)
    return load_model(model, device=device or a.device, dtype=a.dtype, lora=getattr(a, "lora", None))


def _build_tiny(kind: str, state=None) -> str:
    from .engine.tiny import build_tiny_pipeline

    if state is None or state.num_processes == 1:
        return str(build_tiny_pipeline(kind, Path(tempfile.mkdtemp()) / "pipe"))
    from accelerate.utils import broadcast_object_list

    path = [str(build_tiny_pipeline(kind, Path(tempfile.mkdtemp()) / "pipe")) if state.is_main_process else None]
    broadcast_object_list(path)  # one machine: the folder is the main process's; several: pass a shared folder
    return path[0]


def _params(a, model) -> tuple[SamplingParams, FusionParams | None]:
    """The model's defaults (LoadedModel.default_sampling / default_fusion, as the library uses them) under the
    flags given; the fusion settings only for commands that fuse (None otherwise, and not validated)."""
    s = SamplingParams(**{**asdict(model.default_sampling()), **{k: v for k, v in {
        "num_steps": a.steps, "eta": a.eta, "guidance_scale": a.cfg, "negative_prompt": a.negative,
        "height": a.height, "width": a.width, "flow_sampler": a.flow_sampler}.items() if v is not None}})
    s.validate()
    if not hasattr(a, "threshold_mode"):
        return s, None
    f = model.default_fusion()
    mk = {k: v for k, v in {"keywords": tuple(a.keywords) if a.keywords else None,
                            "threshold_mode": a.threshold_mode, "threshold": a.threshold, "resize": a.resize,
                            "combine": a.combine,
                            "dilate": a.dilate, "feather": a.feather,
                            "layer_factors": tuple(a.mask_factors) if a.mask_factors else None}.items() if v is not None}
    if a.union_base is not None:
        mk["union_base"] = a.union_base
    layers = None
    if a.layers:
        layers = a.layers[0] if len(a.layers) == 1 and a.layers[0] in FUSION_LAYER_PRESETS else tuple(a.layers)
    f = replace(f, **{k: v for k, v in {"start_step": a.start_step, "end_step": a.end_step,
                                        "layers": layers, "hold_outside": a.hold_outside}.items() if v is not None},
                use_mask=f.use_mask and not a.no_mask, mask=MaskParams(**{**asdict(f.mask), **mk}))
    f.validate(s.num_steps)
    return s, f


def cmd_tokens(a) -> dict | list:
    from transformers import CLIPTokenizer

    from .engine.sampling import validate_prompt
    from .engine.tokens import default_keywords, word_tokens

    validate_prompt(a.prompt)
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

    from .engine.sampling import sample, validate_prompt

    validate_prompt(a.prompt)  # before the model loads
    model = _load(a)
    s, _ = _params(a, model)
    seeds = a.seeds  # parsed and range-checked by _seed_list
    res = sample(model, a.prompt, seeds, s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed, im, tr in zip(seeds, res.images, res.trajectories):
        im.save(out / f"seed{seed}.png")
        save_file({k: v.contiguous() for k, v in tr.tensors("trajectory").items()}, str(out / f"seed{seed}.safetensors"))
        files.append(str(out / f"seed{seed}.png"))
    return {"prompt": a.prompt, "seeds": seeds, "images": files, "sampling": asdict(s)}


def _world_checker(model):
    """The ground-truth checker of the world the model was trained on (its dfusion.json names it): (images,
    prompt) -> pass / fail per image. A model of no registered world, or of one without a checker, is refused."""
    from .engine.worlds import world_of
    from .worlds import discover

    discover()
    world = world_of(model.defaults)
    if world is None or world.check is None:
        raise ValueError(f"pick=checker needs a model trained on a world with a checker (its dfusion.json names "
                         f"one); {model.model_id} names {model.defaults.get('world')!r}: pick by scorer")
    return world.check


def _check_model(a) -> None:
    """A --model folder that does not exist, refused before the scorer or any weights load (the flags' own
    checks come first, so a wrong flag is named even with a wrong folder)."""
    missing = missing_model_folder(getattr(a, "model", None))
    if missing:
        raise ValueError(missing)


def _scorer(spec: str, device: str | None = None):
    """--scorer: 'default' (ShapesWorld CLIP), 'none' (None) or a make_scorer spec."""
    from .engine.scoring import make_scorer

    return None if spec == "none" else make_scorer(None if spec == "default" else spec, device=device)


def cmd_fuse(a) -> dict:
    from .engine.fusion import fuse
    from .engine.pairs import record_from_result, save_new_pairs, verdict
    from .engine.sampling import check_pair_seeds, validate_prompt

    validate_prompt(a.prompt)
    check_pair_seeds(a.base_seed, a.ref_seed)  # the app's rule: in range and two different images
    _check_model(a)
    scorer = _scorer(a.scorer)
    model = _load(a)
    s, f = _params(a, model)
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


def _prompts(a) -> list[str]:
    from .engine.prompt_sets import load_prompt_set

    entries = []
    for spec in a.prompt_set or []:
        entries += load_prompt_set(spec)
    prompts = [e.prompt for e in entries] + list(a.prompt or [])
    if a.limit:
        prompts = prompts[:a.limit]
    if not prompts:
        raise ValueError("give prompts with --prompt or --prompt-set")
    return prompts


def _processes(a):
    """accelerate's view of the processes (one when not launched with `accelerate launch`) and the device this
    one computes on: with several GPUs, process i takes GPU i unless --device says otherwise."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=(a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu")
    device = a.device
    if device in (None, "cuda") and state.device.type == "cuda":
        device = str(state.device)
    return state, device


def _finish_processes(state) -> None:
    """Every process done, then the process group closed: a gloo group left to the interpreter's exit can abort a
    process ('terminate called without an active exception') after its work is written."""
    state.wait_for_everyone()
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _progress_bar(state):
    """A progress bar per process (on stderr, one line each): prompts this process built of its share."""
    from tqdm import tqdm

    bar = tqdm(total=0, position=state.process_index, file=sys.stderr, unit="prompt", leave=True,
               desc=f"build-pairs rank {state.process_index}/{state.num_processes}")

    def update(i: int, n: int) -> None:
        bar.total = n
        bar.update(i - bar.n)
        if i == n:
            bar.close()
    return update


def cmd_build_pairs(a) -> dict | None:
    from .worlds import discover

    discover()  # world plug-ins register their WORLD:FAMILY:SPLIT prompt lists
    from .engine.pairs import PairingParams, build_into, done_markers, merge_reports
    from .engine.sampling import validate_prompt

    prompts = _prompts(a)
    for p in prompts:
        validate_prompt(p)  # before the model loads
    pairing = PairingParams(num_candidates=a.num_candidates, min_gap=a.min_gap, seed=a.seed, label=a.label,
                            pick=a.pick).validate()
    if a.scorer == "none":
        raise ValueError("build-pairs needs a scorer: pairs are chosen and labelled by score")
    if a.random and a.pick == "checker":
        raise ValueError("--random pairs candidates at random: --pick checker does not apply to it")
    state, device = _processes(a)
    _check_model(a)
    scorer = _scorer(a.scorer, device)  # one per process, beside its model (README: Command line)
    model = _load(a, device, state)
    s, f = _params(a, model)
    check = _world_checker(model) if pairing.pick == "checker" else None  # refused here, once, not per prompt
    done = done_markers(a.out)
    state.wait_for_everyone()  # every process has read the markers before any writes one
    report = build_into(a.out, model, prompts, scorer, s, f, pairing, random=a.random, batch_size=a.batch_size,
                        rank=state.process_index, world=state.num_processes, done=done,
                        progress=_progress_bar(state), check=check)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        reports = gather_object([report])
    else:
        reports = [report]
    _finish_processes(state)
    if not state.is_main_process:
        return None  # one summary per run, from the main process
    return _build_summary(a, merge_reports(reports), len(dict.fromkeys(prompts)))


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _build_summary(a, m: dict, n_prompts: int) -> dict:
    """The merged report: one readable summary on stderr, the JSON result for stdout."""
    print(f"kept {m['pairs']} pairs of {n_prompts} prompts ({m['written']} written now, {m['already_present']} "
          f"already stored; {m['prompts_done_before']} prompts were done before this run); dropped "
          f"{m['dropped_tie']} ties (scores closer than --min-gap {a.min_gap}) and {m['dropped_gap']} pairs whose "
          f"reference was under --min-gap above its base; {_plural(m['processes'], 'process', 'processes')}, "
          f"{m['seconds']:.1f} s",
          file=sys.stderr, flush=True)
    if m["failed"]:
        print(f"{_plural(len(m['failed']), 'prompt', 'prompts')} failed (a rerun retries them):", file=sys.stderr)
        for fail in m["failed"]:
            print(f"  {fail['prompt']!r} (process {fail['rank']}): {fail['error']}", file=sys.stderr, flush=True)
    return {"pairs": m["pairs"], "labels": m["labels"], "dropped": {"tie": m["dropped_tie"], "gap": m["dropped_gap"]},
            "saved": m["written"], "already_stored": m["already_present"], "prompts": n_prompts,
            "prompts_built": m["prompts_built"], "prompts_done_before": m["prompts_done_before"],
            "failed": m["failed"], "processes": m["processes"], "build_s": round(m["seconds"], 3), "out": a.out}


def cmd_train(a) -> dict:
    from dataclasses import fields as _fields

    from .training.data import load_training_pairs
    from .training.trainer import TrainConfig, Trainer

    base = read_config_json(a.config, {f.name for f in _fields(TrainConfig)}) if a.config else {}
    flags = {f.name: getattr(a, f.name) for f in _fields(TrainConfig) if getattr(a, f.name, None) is not None}
    cfg = TrainConfig(**{**base, **flags})
    if isinstance(cfg.lora_targets, list):
        cfg = TrainConfig(**{**asdict(cfg), "lora_targets": tuple(cfg.lora_targets)})
    cfg.validate()
    pairs = load_training_pairs(a.data, cfg.algo)  # refused data (e.g. eta = 0 for traj-dpo) before the model loads
    model = _load(a)
    trainer = Trainer(model, pairs, cfg, a.out)
    res = trainer.run(resume=not a.no_resume)
    _finish_processes(trainer.acc.state)
    if not trainer.acc.is_main_process:
        return None  # one report per run, from the main process
    last = res.history[-1] if res.history else {}
    return {"out": str(res.out_dir), "steps": res.steps, "pairs": len(pairs), "processes": trainer.acc.num_processes,
            "last": last}


def cmd_import(a):
    """A pair folder (an export, build-pairs output, or folders holding them) or a .zip / .tar / .tar.gz of one
    into a preference store: the import report (per index file: imported, skipped as duplicates, failed, why)."""
    from .data.preference_store import PreferenceStore

    if not Path(a.source).expanduser().exists():  # before the store folder is created
        raise ValueError(f"{a.source} does not exist")
    return PreferenceStore(a.store).import_pairs(a.source)


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


SEED_RANGE = "0..2147483647"  # engine.sampling.MAX_SEED, spelled out so --help needs no torch (a test checks)
SCORER_HELP = "'default' (the shipped ShapesWorld CLIP), openclip:NAME:TAG_OR_FILE or an OpenCLIP folder"


def _add_tokens_sample(sub) -> None:
    p = sub.add_parser("tokens", help="prompt words -> token positions (JSON)")
    p.add_argument("--prompt", required=True, help="the prompt to split into words and tokens (required)")
    p.add_argument("--with-keywords", action="store_true", help="also print the default keywords")
    p.add_argument("--model", default=None, help="pipeline folder or hub id whose tokenizer to use "
                   "(default: the shipped model's CLIP tokenizer)")
    p.set_defaults(fn=cmd_tokens)

    p = sub.add_parser("sample", help="sample images with trajectories")
    p.add_argument("--prompt", required=True, help="what the images should show (required)")
    p.add_argument("--seeds", type=_seed_list, default="0", help="one image per seed, e.g. '0 1 2', '0,3,7' or "
                   "'0-15' (inclusive), each in " + SEED_RANGE + " (default: %(default)s)")
    p.add_argument("--out", default="out/sample", help="folder for seedN.png and seedN.safetensors (the "
                   "trajectory) (default: %(default)s)")
    _add_model(p), _add_sampling(p)
    p.set_defaults(fn=cmd_sample)


def _add_fuse_build(sub) -> None:
    out_help = "pair folder: pairs.jsonl plus each pair's files; a pair it already lists is not added again " \
               "(default: %(default)s)"
    p = sub.add_parser("fuse", help="fuse one (base, reference) pair, score it and store it")
    p.add_argument("--prompt", required=True, help="what the images should show (required)")
    p.add_argument("--base-seed", type=_seed, required=True, help=f"the base image's seed, {SEED_RANGE} (required)")
    p.add_argument("--ref-seed", type=_seed, required=True,
                   help=f"the reference image's seed, {SEED_RANGE}, not the base's (required)")
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP}; the label is its verdict (the higher of "
                   "base and target wins, equal scores: tie); 'none' stores no scores and labels the target the "
                   "winner, the paper's assumption (default: %(default)s)")
    p.add_argument("--out", default="out/pairs", help=out_help)
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_fuse)

    p = sub.add_parser("build-pairs", help="sample N per prompt, score, pair, fuse, label by score; under "
                       "`accelerate launch` the prompts are split over the processes; a rerun resumes")
    p.add_argument("--prompt", action="append", help="a prompt, repeatable (default: none; give --prompt or "
                   "--prompt-set)")
    p.add_argument("--prompt-set", action="append", help="paper:FAMILY:SPLIT, shapesworld:FAMILY:SPLIT or a file, "
                   "repeatable (default: none)")
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="use only the first N prompts "
                   "(default: all)")
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP} (default: %(default)s)")
    p.add_argument("--num-candidates", type=_int_at_least(2, 4096), default=16,
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
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="candidate seeds derive from (this, prompt) (default: %(default)s)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16,
                   help="images per denoiser call (default: %(default)s)")
    p.add_argument("--random", action="store_true", help="the paper's baseline: random pairs, no fusion")
    p.add_argument("--out", default="out/pairs", help="pair folder: pairs.jsonl (process N of several: "
                   "pairs.pN.jsonl), each pair's files, and done/ with a marker per finished prompt; a rerun skips "
                   "prompts marked done and adds no pair already listed (default: %(default)s)")
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_build_pairs)


def _add_train(sub) -> None:
    from dataclasses import fields as _fields

    from .training.trainer import TrainConfig

    p = sub.add_parser("train", help="fine-tune on pairs: dpo | traj-dpo | ddpo | dpok (accelerate launch for N GPUs)")
    p.add_argument("--data", required=True, help="preference store folder or pair folder (required)")
    p.add_argument("--out", required=True, help="output folder: LoRA, checkpoints, log.jsonl (required)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields; flags override it "
                   "(default: none)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    notes = field_comments(TrainConfig)
    for fld in _fields(TrainConfig):
        flag, doc = "--" + fld.name.replace("_", "-"), f"{notes.get(fld.name, '')} (default: {_fmt(fld.default)})"
        if fld.name == "lora_targets":
            p.add_argument(flag, nargs="+", default=None, help=doc)
        elif isinstance(fld.default, str):  # algo, mixed_precision, weighting: validated by TrainConfig
            p.add_argument(flag, default=None, help=doc)
        else:
            typ = float if isinstance(fld.default, float) or fld.default is None else int
            p.add_argument(flag, type=typ, default=None, help=doc)
    _add_model(p)
    p.set_defaults(fn=cmd_train)


def _add_eval_bench(sub) -> None:
    p = sub.add_parser("eval", help="ShapesWorld evaluation: checker accuracy, CLIP score, mask localisation")
    p.add_argument("--split", choices=["train", "test"], default="test", help="prompt split (default: %(default)s)")
    p.add_argument("--n-prompts", type=_int_at_least(1), default=40, help="prompts per family (default: %(default)s)")
    p.add_argument("--seeds", type=_int_at_least(1), default=5, help="samples per prompt (default: %(default)s)")
    p.add_argument("--families", nargs="+", choices=["action", "attribute", "spatial"], default=None,
                   help="prompt families (default: all three)")
    p.add_argument("--scorer", default="default", help=f"{SCORER_HELP}, or 'none' for no CLIP score; 'default' "
                   "is skipped when that scorer is missing (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the full report (with per-sample rows) here as JSON "
                   "(default: none, the summary goes to stdout only)")
    _add_model(p), _add_sampling(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="plain vs fused vs cached re-fusion timings")
    p.add_argument("--prompt", default="a red circle above a blue square",
                   help="the prompt to time (default: %(default)s)")
    p.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed runs of each kind; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on one line (default: a table)")
    _add_model(p), _add_sampling(p), _add_fusion(p)
    p.set_defaults(fn=cmd_bench)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="add the pairs of a pair folder or a .zip / .tar / .tar.gz to a preference "
                       "store; pairs already there (or listed twice) are skipped, bad lines and files are named")
    p.add_argument("--source", required=True, help="an export, a build-pairs folder, a folder holding such "
                   "folders, or a .zip / .tar / .tar.gz of one (required)")
    p.add_argument("--store", default="dfusion_data/store", help="preference store folder, created if missing "
                   "(the app's --store) (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: one line per file)")
    p.set_defaults(fn=cmd_import)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m dfusion_core", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _add_tokens_sample(sub)
    _add_fuse_build(sub)
    _add_train(sub)
    _add_eval_bench(sub)
    _add_import(sub)
    from .faces.training_cli import add_parsers  # train-on-policy, pair-signal
    add_parsers(sub)
    return ap


def _quiet_loading() -> None:
    """No per-component loading bars on stderr: a command's stderr is its errors (one line each)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    _quiet_loading()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.command == "import":  # exit 1 when a pair failed, as build-pairs does when a prompt failed
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) if a.json else result.text(shown=None))
        return 1 if result.failed else 0
    if result is not None and a.command == "bench" and not a.json:
        from .engine.bench import format_report
        print(format_report(result))
    elif result is not None:
        print(json.dumps(result, indent=None if a.command == "bench" else 2, ensure_ascii=False))  # words as typed
    return 1 if isinstance(result, dict) and result.get("failed") else 0  # build-pairs: a prompt failed
