"""Command line: `python -m dfusion_core <command> --help`.

Commands: sample, fuse, build-pairs, train, train-on-policy, pair-signal, tokens, eval, bench, import. One module
per group of commands (sampling, pairs, train, measure) and the flag groups they share (common). Every model
command takes --model (a diffusers pipeline folder or hub id; default: the embedded ShapesWorld model) and prints
JSON on stdout (bench: a readable table, import: its report, unless --json). Bad input exits with status 2 and
one line starting with `error:`, never a traceback; flags are checked before a model loads where they alone show
the mistake. `accelerate launch ... -m dfusion_core build-pairs` splits the prompts over the processes (train too:
data parallel); build-pairs exits with status 1 when a prompt failed (each is listed with its error; a rerun
retries it). Seeds and pairs follow the engine's rules (engine.sampling.check_seed / check_pair_seeds), which the
app uses too.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..engine import offline  # noqa: F401
from . import measure, pairs, sampling, train
from .common import SCORER_HELP, SEED_RANGE, SHIPPED_MODEL, Parser


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dfusion_core", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for group in (sampling, pairs, train, measure):
        group.add_parsers(sub)
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
    if a.command == "import":  # exit 1 when a pair failed, as build-pairs does when a prompt failed
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) if a.json else result.text(shown=None))
        return 1 if result.failed else 0
    if result is not None and a.command == "bench" and not a.json:
        from ..bench.fusion import format_report
        print(format_report(result))
    elif result is not None:
        print(json.dumps(result, indent=None if a.command == "bench" else 2, ensure_ascii=False))  # words as typed
    return 1 if isinstance(result, dict) and result.get("failed") else 0  # build-pairs: a prompt failed


__all__ = ["SCORER_HELP", "SEED_RANGE", "SHIPPED_MODEL", "build_parser", "main"]
