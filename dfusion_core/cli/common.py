"""What every command shares: argument types, the model / sampling / fusion flag groups, loading, scorers,
prompt lists and accelerate processes."""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from ..engine.config import FUSION_LAYER_PRESETS, FusionParams, MaskParams, SamplingParams, missing_model_folder, \
    model_defaults, read_config_json
from ..engine.schema import default_of, flag_of, help_of

# engine.loading.DEFAULT_MODEL without importing torch (the help must not wait for it); tests check they agree
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "shapesworld"
SEED_RANGE = "0..2147483647"  # engine.sampling.MAX_SEED, spelled out so --help needs no torch (a test checks)
SCORER_HELP = "'default' (the shipped ShapesWorld CLIP), openclip:NAME:TAG_OR_FILE or an OpenCLIP folder"


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's contract for bad input: status 2 and one line starting with `error:`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def int_at_least(lo: int, hi: int | None = None):
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


def seed_arg(text: str) -> int:
    """An argparse type: one seed, checked by the engine's seed rule (the app's too)."""
    from ..engine.inputs import check_seed

    try:
        return check_seed(int(text), "a seed")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.strip().lstrip("-").isdigit()
                                         else f"{text!r} is not an integer seed") from None


def seed_list_arg(s: str) -> list[int]:
    """'0 1 2', '0,3,7' or '0-15' (inclusive) -> seeds, each checked by the engine's seed rule."""
    out = []
    for part in s.replace(",", " ").split():
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            lo, hi = seed_arg(a), seed_arg(b)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"the range {part} is empty: write it low-high, e.g. {hi}-{lo}")
            out += list(range(lo, hi + 1))
        else:
            out.append(seed_arg(part))
    if not out:
        raise argparse.ArgumentTypeError("no seeds given: e.g. '0 1 2' or '0-15'")
    return out


def fmt_default(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else repr(v) if v == "" else str(v)


@functools.lru_cache(maxsize=1)
def _shipped_defaults() -> dict:
    return model_defaults(SHIPPED_MODEL)  # read once, not once per flag


def field_help(cls, name: str) -> str:
    """A config field's help (engine/schema) and its default, and where the shipped model's dfusion.json sets
    another value, that too (the default --model uses it)."""
    f = cls.__dataclass_fields__[name]
    default = default_of(f)
    shipped = _shipped_defaults().get(name)
    note = f"; the model's dfusion.json may set another: the shipped model's is {fmt_default(shipped)}" \
        if shipped is not None and fmt_default(shipped) != fmt_default(default) else ""
    return f"{help_of(cls)[name]} (default: {fmt_default(default)}{note})"


def add_setting_flags(g, cls, skip=()) -> None:
    """One flag per field of a settings dataclass, generated from its schema (engine/schema.setting): the flag,
    its help, choices and type; dest is the field's name and None means not given (the model's default, or for
    a training config its --config file or the field's default)."""
    for f in fields(cls):
        flag = flag_of(f)
        if flag is None or f.name in skip:
            continue
        kind, default = str(f.type), default_of(f)
        kw = {"dest": f.name, "default": None, "help": field_help(cls, f.name)}
        if isinstance(default, bool) and flag.startswith("--no-"):  # e.g. --no-mask: use_mask False
            kw.update(action="store_false", help=help_of(cls)[f.name])
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "tuple" in kind:
            kw.update(nargs="+", type=int if "tuple[int" in kind else str)
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        else:
            kw["type"] = float if "float" in kind else int if "int" in kind else str
        g.add_argument(flag, **kw)


def given_settings(a, cls) -> dict:
    """The fields of `cls` whose flags were given (lists as tuples; one layer preset as its name)."""
    out = {}
    for f in fields(cls):
        v = getattr(a, f.name, None) if flag_of(f) else None
        if v is None:
            continue
        if isinstance(v, list):
            v = v[0] if f.name == "layers" and len(v) == 1 and v[0] in FUSION_LAYER_PRESETS else tuple(v)
        out[f.name] = v
    return out


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder or hub id; 'tiny:KIND' builds a random pipeline "
                   "(tiny:sd1, tiny:sd15-full for benchmarks, ...) (default: the shipped ShapesWorld model, "
                   "assets/shapesworld)")
    p.add_argument("--lora", default=None, help="LoRA folder to load on top, e.g. the output of train "
                   "(default: none)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights' precision (default: fp32 on CPU, fp16 on CUDA)")


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """--prompt / --prompt-set / --limit: the prompts a bulk command runs on (read by prompts_arg)."""
    p.add_argument("--prompt", action="append", help="a prompt, repeatable (default: none; give --prompt or "
                   "--prompt-set)")
    p.add_argument("--prompt-set", action="append", help="paper:FAMILY:SPLIT, shapesworld:FAMILY:SPLIT or a file, "
                   "repeatable (default: none)")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N prompts "
                   "(default: all)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (paper defaults unless the model's dfusion.json says otherwise)")
    add_setting_flags(g, SamplingParams)


def add_fusion_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion (paper defaults unless the model's dfusion.json says otherwise)")
    add_setting_flags(g, FusionParams)
    add_setting_flags(g, MaskParams)


def load_model_arg(a, device: str | None = None, state=None):
    """The --model (on `device`, default --device); 'tiny:KIND' is built once, by the main process when several
    run (`state`, an accelerate PartialState), so that all load the very same pipeline folder."""
    from ..engine.loading import load_model

    quiet_loading()
    model = a.model
    if model and model.startswith("tiny:"):
        model = build_tiny_model(model.split(":", 1)[1], state)
    return load_model(model, device=device or a.device, dtype=a.dtype, lora=getattr(a, "lora", None))


def build_tiny_model(kind: str, state=None) -> str:
    from ..testing.tiny import build_tiny_pipeline

    if state is None or state.num_processes == 1:
        return str(build_tiny_pipeline(kind, Path(tempfile.mkdtemp()) / "pipe"))
    from accelerate.utils import broadcast_object_list

    path = [str(build_tiny_pipeline(kind, Path(tempfile.mkdtemp()) / "pipe")) if state.is_main_process else None]
    broadcast_object_list(path)  # one machine: the folder is the main process's; several: pass a shared folder
    return path[0]


def params_from_args(a, model) -> tuple[SamplingParams, FusionParams | None]:
    """The model's defaults (LoadedModel.default_sampling / default_fusion, as the library uses them) under the
    flags given; the fusion settings only for commands that fuse (None otherwise, and not validated)."""
    s = replace(model.default_sampling(), **given_settings(a, SamplingParams)).validate()
    if not hasattr(a, "threshold_mode"):
        return s, None
    f = model.default_fusion()
    f = replace(f, **given_settings(a, FusionParams), mask=replace(f.mask, **given_settings(a, MaskParams)))
    return s, f.validate(s.num_steps)


def world_checker(model):
    """The ground-truth checker of the world the model was trained on (its dfusion.json names it): (images,
    prompt) -> pass / fail per image. A model of no registered world, or of one without a checker, is refused."""
    from ..worlds.registry import world_of
    from ..worlds import discover

    discover()
    world = world_of(model.defaults)
    if world is None or world.check is None:
        raise ValueError(f"pick=checker needs a model trained on a world with a checker (its dfusion.json names "
                         f"one); {model.model_id} names {model.defaults.get('world')!r}: pick by scorer")
    return world.check


def check_model_arg(a) -> None:
    """A --model folder that does not exist, refused before the scorer or any weights load (the flags' own
    checks come first, so a wrong flag is named even with a wrong folder)."""
    missing = missing_model_folder(getattr(a, "model", None))
    if missing:
        raise ValueError(missing)


def scorer_arg(spec: str, device: str | None = None):
    """--scorer: 'default' (ShapesWorld CLIP), 'none' (None) or a make_scorer spec."""
    from ..pairs.scoring import make_scorer

    quiet_loading()
    return None if spec == "none" else make_scorer(None if spec == "default" else spec, device=device)


def prompts_arg(a) -> list[str]:
    from ..pairs.prompt_sets import load_prompt_set

    entries = []
    for spec in a.prompt_set or []:
        entries += load_prompt_set(spec)
    prompts = [e.prompt for e in entries] + list(a.prompt or [])
    if a.limit:
        prompts = prompts[:a.limit]
    if not prompts:
        raise ValueError("give prompts with --prompt or --prompt-set")
    return prompts


def start_processes(a):
    """accelerate's view of the processes (one when not launched with `accelerate launch`) and the device this
    one computes on: with several GPUs, process i takes GPU i unless --device says otherwise."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=(a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu")
    device = a.device
    if device in (None, "cuda") and state.device.type == "cuda":
        device = str(state.device)
    return state, device


def finish_processes(state) -> None:
    """Every process done, then the process group closed: a gloo group left to the interpreter's exit can abort a
    process ('terminate called without an active exception') after its work is written."""
    state.wait_for_everyone()
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def progress_bar(state):
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


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def quiet_loading() -> None:
    """No per-component loading bars on stderr: a command's stderr is its errors (one line each). Called where a
    model loads, so that a command refused before that never imports the libraries."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def config_from_args(a, cls, skip=()):
    """The config dataclass from --config's JSON with the flags given over it, validated."""
    names = {f.name for f in fields(cls)} - set(skip)
    cfg = {**(read_config_json(a.config, names) if a.config else {}),
           **{n: getattr(a, n) for n in names if getattr(a, n, None) is not None}}
    if isinstance(cfg.get("lora_targets"), list):
        cfg["lora_targets"] = tuple(cfg["lora_targets"])
    return cls(**cfg).validate()
