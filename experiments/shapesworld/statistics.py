"""The evidence harness's statistics: paired differences and pooled means with bootstrap intervals over prompts,
and the hardware a run was measured on (shared by experiment.py and experiment_report.py)."""
from __future__ import annotations

import os
import platform

import numpy as np
import torch

from dfusion_core.worlds.shapesworld.evaluate import grouped_bootstrap

SPLITS = ("train", "validation", "test")  # a report reads those its arms were evaluated on
METRICS = ("correct", "clip", "diversity")  # checker accuracy, CLIP score, diversity across a prompt's seeds


def _runs(rows) -> list[list[dict]]:
    """One run's rows (a list of dicts) or several runs' (a list of lists) -> a list of runs."""
    return [rows] if not rows or isinstance(rows[0], dict) else list(rows)


def paired_difference(rows_a, rows_b, family: str, key: str = "correct", n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same (prompt, seed) samples, a 95% interval and a two-sided bootstrap p-value.

    rows_a / rows_b: one run's evaluation rows, or several runs' (training seeds). Runs are paired in order (a
    single run of b, the base model, pairs with every run of a). The interval is two_stage_bootstrap's: training
    seeds and prompts both resampled, so it widens with the spread over seeds (one run: prompts alone).
    `per_run`: each run's own mean difference."""
    ra, rb = _runs(rows_a), _runs(rows_b)
    if len(rb) == 1:
        rb = rb * len(ra)
    if len(ra) != len(rb):
        raise ValueError(f"{len(ra)} runs against {len(rb)}: pair runs one to one, or against a single run")
    pick = lambda rows: {(r["prompt"], r["seed"]): float(r[key]) for r in rows
                         if (family == "all" or r["family"] == family) and r.get(key) is not None}
    cells: list[dict[str, list[float]]] = []
    per_run = []
    for a_rows, b_rows in zip(ra, rb):
        a, b = pick(a_rows), pick(b_rows)
        common = sorted(a.keys() & b.keys())  # a fixed order: the bootstrap resamples prompts by position
        per_run.append(float(np.mean([a[k] - b[k] for k in common])) if common else None)
        run: dict[str, list[float]] = {}
        for k in common:
            run.setdefault(k[0], []).append(a[k] - b[k])
        cells.append(run)
    prompts = sorted(set().union(*cells)) if cells else []
    if not prompts:
        return {"diff": None, "ci95": [None, None], "p": None, "per_run": per_run, "prompts": 0}
    if any(set(run) != set(prompts) for run in cells):
        raise ValueError("every run must be evaluated on the same prompts")
    per_prompt = [np.mean([np.mean(run[p]) for run in cells]) for p in prompts]
    diff = np.average(per_prompt, weights=[len(cells[0][p]) for p in prompts])  # a sample's mean over runs, averaged
    lo, hi, pval = two_stage_bootstrap([[run[p] for p in prompts] for run in cells], n_boot, seed)
    return {"diff": float(diff), "ci95": [lo, hi], "p": pval, "per_run": per_run, "prompts": len(prompts)}


def two_stage_bootstrap(cells: list[list[list[float]]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(2.5%, 97.5%, two-sided p) of a mean over runs x prompts. cells[r][p]: run r's values on prompt p (its
    evaluation seeds). Each replicate draws runs (training seeds) with replacement, then prompts with replacement,
    and averages the drawn cells; with one run it is the bootstrap over prompts. p = twice the smaller share of
    replicates on either side of 0 (at most 1): the test the report's Holm correction takes."""
    sums = np.array([[sum(c) for c in run] for run in cells], dtype=np.float64)  # [R, P]
    counts = np.array([[len(c) for c in run] for run in cells], dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_runs, n_prompts = sums.shape
    ri = rng.integers(0, n_runs, size=(n_boot, n_runs)) if n_runs > 1 else np.zeros((n_boot, 1), dtype=int)
    pi = rng.integers(0, n_prompts, size=(n_boot, n_prompts))
    s = sums[ri[:, :, None], pi[:, None, :]].sum((1, 2))
    n = counts[ri[:, :, None], pi[:, None, :]].sum((1, 2))
    means = s / n
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), p


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values of a family of tests (None: a test not made, left out)."""
    named = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    m, out, running = len(named), {k: None for k in pvalues}, 0.0
    for i, (p, k) in enumerate(named):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


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
