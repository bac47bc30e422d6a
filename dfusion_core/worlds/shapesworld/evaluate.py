"""Evaluate a model on ShapesWorld with the ground-truth checker, the CLIP scorer and mask localisation.

    python -m dfusion_core eval --split test --n-prompts 40 --seeds 5 --out eval.json

Per family: checker accuracy (Wilson 95% interval over samples, and a bootstrap interval resampling
prompts), CLIP score (bootstrap interval over prompts), diversity across seeds, objects found, colours /
shapes / textures / relation sub-scores. Masks: for each requested object the checker found, the automatic
(Otsu) mask of its words (colour + shape, + texture) against the object's silhouette: IoU and whether the
map's peak lies inside. Scorer: AUROC of the CLIP score for checker-correct vs checker-wrong images, and how often the true
caption outscores all its perturbations (on checker-correct images, where the caption is known true).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.config import SamplingParams
from ...engine.fusion import record_attention
from ...engine.loading import LoadedModel
from ...engine.masks import otsu_threshold
from ...engine.tokens import word_tokens
from .checker import check
from .world import FAMILIES, IMAGE_SIZE, PromptSpec, perturbations, prompt_list


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def bootstrap_ci(rows: list[dict], key: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of rows[key], resampling whole prompts (seeds of a prompt are not independent)."""
    by_prompt: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            by_prompt.setdefault(r["prompt"], []).append(float(r[key]))
    if not by_prompt:
        return (float("nan"), float("nan"))
    return grouped_bootstrap(list(by_prompt.values()), n_boot, seed)


def grouped_bootstrap(groups: list[list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the overall mean when whole groups (a prompt's seeds) are resampled with replacement."""
    sums = np.array([sum(g) for g in groups])
    counts = np.array([len(g) for g in groups])
    idx = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def diversity(images) -> float:
    """Mean pairwise absolute pixel difference (0..1) between the seeds of one prompt: collapse shows as ~0."""
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    if len(x) < 2:
        return float("nan")
    d = [np.abs(x[i] - x[j]).mean() for i in range(len(x)) for j in range(i + 1, len(x))]
    return float(np.mean(d))


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    if not pos or not neg:
        return float("nan")
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def within_prompt_auroc(rows: list[dict], key: str = "clip") -> float:
    """AUROC of `key` for checker-correct vs wrong images of the SAME prompt, pooled over prompts by pair count
    (a pair is chosen among one prompt's candidates, so this is the ranking that counts); nan when no prompt
    has both."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    wins = pairs = 0.0
    for rs in by_prompt.values():
        pos = [r[key] for r in rs if r["correct"]]
        neg = [r[key] for r in rs if not r["correct"]]
        if pos and neg:
            wins += auroc(pos, neg) * len(pos) * len(neg)
            pairs += len(pos) * len(neg)
    return wins / pairs if pairs else float("nan")


def object_token_indices(tokenizer, spec: PromptSpec) -> list[tuple[int, ...]]:
    """Token positions of each object's own words (colours differ, so 'colour ... shape' is unique)."""
    words = word_tokens(tokenizer, spec.text, warn=False)
    low = [w.word.lower() for w in words]
    out = []
    for obj_words in spec.object_words():
        start = low.index(obj_words[0])
        idx, j = [], start
        for ow in obj_words:
            j = low.index(ow, j)
            idx.extend(words[j].token_indices)
        out.append(tuple(idx))
    return out


def localisation(token_maps: torch.Tensor, tokens: tuple[int, ...], silhouette: np.ndarray) -> tuple[float, bool]:
    """(IoU of the object's automatic mask with its silhouette, peak inside the silhouette)."""
    m = token_maps[list(tokens)].mean(0)
    up = F.interpolate(m[None, None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0, 0]
    mask = (up >= otsu_threshold(up)).numpy()
    sil = silhouette.astype(bool)
    iou = float((mask & sil).sum() / max(1, (mask | sil).sum()))
    peak = np.unravel_index(int(torch.argmax(up)), up.shape)
    return iou, bool(sil[peak])


def evaluate(model: LoadedModel, scorer=None, split: str = "test", n_prompts: int = 40, seeds_per_prompt: int = 5,
             sampling: SamplingParams | None = None, families=FAMILIES, seed: int = 0, progress=None,
             localise: bool = True, prompt_lists: dict | None = None) -> dict:
    """`localise=False` samples plainly (no attention recording, no mask rows): the evidence harness's many arms
    need accuracy, CLIP score and diversity only. `prompt_lists` ({family: [PromptSpec]}) replaces the split's
    fixed sample of `n_prompts` (e.g. the harness's stratified training and validation prompts)."""
    from ...engine.sampling import sample

    sampling = sampling or model.default_sampling()
    factors = tuple(model.defaults.get("layer_factors", (4,)))
    rng = random.Random(seed)
    rows = []
    specs = [(fam, s) for fam in families
             for s in (prompt_lists[fam] if prompt_lists is not None else prompt_list(fam, split, n_prompts))]
    for i, (fam, spec) in enumerate(specs):
        seeds = [seed * 100_000 + i * 100 + k for k in range(seeds_per_prompt)]
        if localise:
            rec = record_attention(model, spec.text, seeds, sampling, layer_factors=factors)
            obj_tokens = object_token_indices(model.tokenizer, spec)
        else:
            rec, obj_tokens = sample(model, spec.text, seeds, sampling), []
        div = diversity(rec.images)
        if scorer is not None:
            wrong = [list(perturbations(spec, rng).values()) for _ in seeds]
            texts = [spec.text] * len(seeds) + [w.text for ws in wrong for w in ws]
            ims = list(rec.images) + [im for im, ws in zip(rec.images, wrong) for _ in ws]
            sc = np.asarray(scorer(ims, texts), dtype=float)
            true_sc, wrong_sc = sc[:len(seeds)], sc[len(seeds):]
        for k, (s, im) in enumerate(zip(seeds, rec.images)):
            v = check(np.asarray(im), spec)
            row = {"family": fam, "prompt": spec.text, "seed": s, **v.as_dict(), "diversity": div}
            by_colour = {}
            for o in v.objects:
                by_colour.setdefault(o.colour, []).append(o)
            loc = []
            for j, (obj, toks) in enumerate(zip(spec.objects, obj_tokens)):
                cands = by_colour.get(obj.colour, [])
                if len(cands) == 1:
                    iou, inside = localisation(rec.token_maps[k], toks, cands[0].silhouette)
                    loc.append({"object": j, "iou": iou, "peak_inside": inside})
            row["localisation"] = loc
            if scorer is not None:
                row["clip"] = float(true_sc[k])
                nw = len(wrong[k])
                start = sum(len(w) for w in wrong[:k])
                row["clip_beats_perturbations"] = bool(true_sc[k] > wrong_sc[start:start + nw].max())
            rows.append(row)
        if progress:
            progress(i + 1, len(specs))
    return summarise(rows, split, sampling, seeds_per_prompt, scorer is not None) | {"rows": rows}


def _mean_defined(values) -> float:
    """Mean of the values that are not nan; nan (without numpy's empty-slice warning) when none is."""
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(rows: list[dict], split: str, sampling: SamplingParams, seeds_per_prompt: int, scored: bool) -> dict:
    out = {"split": split, "samples": len(rows), "seeds_per_prompt": seeds_per_prompt, "sampling": asdict(sampling),
           "families": {}}
    for fam in sorted({r["family"] for r in rows}) + ["all"]:
        rs = [r for r in rows if fam == "all" or r["family"] == fam]
        k = sum(r["correct"] for r in rs)
        loc = [l for r in rs for l in r["localisation"]]
        loc0 = [l for l in loc if l["object"] == 0]
        loc1 = [l for l in loc if l["object"] == 1]
        d = {
            "n": len(rs), "prompts": len({r["prompt"] for r in rs}),
            "accuracy": k / len(rs), "accuracy_ci95": wilson(k, len(rs)),
            "accuracy_ci95_prompts": bootstrap_ci(rs, "correct"),
            "diversity": _mean_defined(r.get("diversity", float("nan")) for r in rs),  # nan with one seed a prompt
            "objects_found": float(np.mean([r["objects_found"] for r in rs])),
            "colours_right": float(np.mean([r["colours_right"] for r in rs])),
            "shapes_right": float(np.mean([r["shapes_right"] for r in rs])),
            "textures_right": float(np.mean([r["textures_right"] for r in rs])),
            "mask_iou": float(np.mean([l["iou"] for l in loc])) if loc else float("nan"),
            "mask_peak_inside": float(np.mean([l["peak_inside"] for l in loc])) if loc else float("nan"),
            "mask_iou_first_object": float(np.mean([l["iou"] for l in loc0])) if loc0 else float("nan"),
            "mask_iou_second_object": float(np.mean([l["iou"] for l in loc1])) if loc1 else float("nan"),
            "objects_localised": len(loc),
        }
        rel = [r["relation_right"] for r in rs if r["relation_right"] is not None]
        if rel:
            d["relation_right"] = float(np.mean(rel))
        if scored:
            d["clip_mean"] = float(np.mean([r["clip"] for r in rs]))
            d["clip_ci95"] = bootstrap_ci(rs, "clip")
            d["clip_auroc_correct_vs_wrong"] = auroc([r["clip"] for r in rs if r["correct"]],
                                                     [r["clip"] for r in rs if not r["correct"]])
            d["clip_auroc_within_prompt"] = within_prompt_auroc(rs)
            ok = [r["clip_beats_perturbations"] for r in rs if r["correct"]]
            d["clip_true_caption_wins"] = float(np.mean(ok)) if ok else float("nan")
        out["families"][fam] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
    return out
