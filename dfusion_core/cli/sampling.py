"""tokens and sample: prompt words to token positions; images with their trajectories."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from .common import (SEED_RANGE, add_model_flags, add_sampling_flags, check_model_arg, load_model_arg, params_from_args,
                     seed_list_arg)


def cmd_tokens(a) -> dict | list:
    from transformers import CLIPTokenizer

    from ..engine.sampling import validate_prompt
    from ..engine.tokens import default_keywords, word_tokens

    validate_prompt(a.prompt)
    if a.model and not a.model.startswith("tiny:"):
        from ..engine.loading import load_model
        tok = load_model(a.model, device="cpu").tokenizer
    else:
        from ..engine.loading import DEFAULT_MODEL
        from ..engine.tokenizer_build import write_clip_tokenizer
        d = DEFAULT_MODEL / "tokenizer"
        tok = CLIPTokenizer.from_pretrained(d if d.is_dir() else write_clip_tokenizer(tempfile.mkdtemp()))
    words = [w.as_json() for w in word_tokens(tok, a.prompt)]
    if a.with_keywords:
        return {"words": words, "default_keywords": default_keywords(tok, a.prompt)}
    return words


def cmd_sample(a) -> dict:
    from ..engine.inputs import validate_prompt

    validate_prompt(a.prompt)  # before the model loads
    check_model_arg(a)  # and before torch does: a wrong folder is said at once
    from safetensors.torch import save_file

    from ..engine.sampling import sample

    model = load_model_arg(a)
    s, _ = params_from_args(a, model)
    seeds = a.seeds  # parsed and range-checked by seed_list_arg
    res = sample(model, a.prompt, seeds, s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed, im, tr in zip(seeds, res.images, res.trajectories):
        im.save(out / f"seed{seed}.png")
        save_file({k: v.contiguous() for k, v in tr.tensors("trajectory").items()}, str(out / f"seed{seed}.safetensors"))
        files.append(str(out / f"seed{seed}.png"))
    return {"prompt": a.prompt, "seeds": seeds, "images": files, "sampling": asdict(s)}


def _add_tokens_sample(sub) -> None:
    p = sub.add_parser("tokens", help="prompt words -> token positions (JSON)")
    p.add_argument("--prompt", required=True, help="the prompt to split into words and tokens (required)")
    p.add_argument("--with-keywords", action="store_true", help="also print the default keywords")
    p.add_argument("--model", default=None, help="pipeline folder or hub id whose tokenizer to use "
                   "(default: the shipped model's CLIP tokenizer)")
    p.set_defaults(fn=cmd_tokens)

    p = sub.add_parser("sample", help="sample images with trajectories")
    p.add_argument("--prompt", required=True, help="what the images should show (required)")
    p.add_argument("--seeds", type=seed_list_arg, default="0", help="one image per seed, e.g. '0 1 2', '0,3,7' or "
                   "'0-15' (inclusive), each in " + SEED_RANGE + " (default: %(default)s)")
    p.add_argument("--out", default="out/sample", help="folder for seedN.png and seedN.safetensors (the "
                   "trajectory) (default: %(default)s)")
    add_model_flags(p), add_sampling_flags(p)
    p.set_defaults(fn=cmd_sample)


def add_parsers(sub) -> None:
    _add_tokens_sample(sub)
