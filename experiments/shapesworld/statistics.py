"""The evidence harness's statistics: paired differences and pooled means with bootstrap intervals over prompts,
and the hardware a run was measured on (shared by experiment.py and experiment_report.py)."""
from __future__ import annotations

import os
import platform

import numpy as np
import torch

from dfusion_core.worlds.shapesworld.evaluate import grouped_bootstrap

SPLITS = ("train", "test")
METRICS = ("correct", "clip", "diversity")  # checker accuracy, CLIP score, diversity across a prompt's seeds


def _runs(rows) -> list[list[dict]]:
    """One run's rows (a list of dicts) or several runs' (a list of lists) -> a list of runs."""
    return [rows] if not rows or isinstance(rows[0], dict) else list(rows)


def paired_difference(rows_a, rows_b, family: str, key: str = "correct", n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same (prompt, seed) samples, with a 95% bootstrap interval resampling prompts.

    rows_a / rows_b: one run's evaluation rows, or several runs' (training seeds). Runs are paired in order (a
    single run of b, the base model, pairs with every run of a); a sample's difference is averaged over the runs
    first, so the interval is over prompts, not over seeds. `per_run`: each run's own mean difference (the spread
    over training seeds)."""
    ra, rb = _runs(rows_a), _runs(rows_b)
    if len(rb) == 1:
        rb = rb * len(ra)
    if len(ra) != len(rb):
        raise ValueError(f"{len(ra)} runs against {len(rb)}: pair runs one to one, or against a single run")
    pick = lambda rows: {(r["prompt"], r["seed"]): float(r[key]) for r in rows
                         if (family == "all" or r["family"] == family) and r.get(key) is not None}
    per_sample: dict[tuple, list[float]] = {}
    per_run = []
    for a_rows, b_rows in zip(ra, rb):
        a, b = pick(a_rows), pick(b_rows)
        common = sorted(a.keys() & b.keys())  # a fixed order: the bootstrap resamples prompts by position
        per_run.append(float(np.mean([a[k] - b[k] for k in common])) if common else None)
        for k in common:
            per_sample.setdefault(k, []).append(a[k] - b[k])
    by_prompt: dict[str, list[float]] = {}
    for (prompt, _), diffs in per_sample.items():
        by_prompt.setdefault(prompt, []).append(float(np.mean(diffs)))
    if not by_prompt:
        return {"diff": None, "ci95": [None, None], "per_run": per_run}
    groups = list(by_prompt.values())
    diff = sum(map(sum, groups)) / sum(map(len, groups))
    return {"diff": float(diff), "ci95": list(grouped_bootstrap(groups, n_boot, seed)), "per_run": per_run}


def pooled_summary(runs: list[list[dict]], family: str, key: str = "correct") -> dict:
    """Mean of `key` over several runs' rows with a 95% interval resampling prompts (a prompt's samples from every
    run form one group), and each run's mean."""
    by_prompt: dict[str, list[float]] = {}
    per_run = []
    for rows in runs:
        vals = [(r["prompt"], float(r[key])) for r in rows
                if (family == "all" or r["family"] == family) and r.get(key) is not None]
        per_run.append(float(np.mean([v for _, v in vals])) if vals else None)
        for p, v in vals:
            by_prompt.setdefault(p, []).append(v)
    if not by_prompt:
        return {"mean": None, "ci95": [None, None], "per_run": per_run}
    groups = list(by_prompt.values())
    return {"mean": sum(map(sum, groups)) / sum(map(len, groups)), "ci95": list(grouped_bootstrap(groups)),
            "per_run": per_run}


def hardware() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}
