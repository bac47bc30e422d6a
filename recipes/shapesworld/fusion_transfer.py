"""Does fusion transfer alignment? Ground-truth pairs on ShapesWorld (issue floor of the embedded model).

    python -m recipes.shapesworld.fusion_transfer --model DIR --prompts 8 --candidates 16 --out table.json

Per TRAIN prompt: sample N candidates, check each with the ground-truth checker, and pair every
checker-correct candidate (reference) with a checker-wrong one (base), at most `--pairs-per-prompt`. Each
pair is fused under several fusion forms; per family and form the table gives:
  * accept: the share of targets the checker passes (the reference's alignment carried over);
  * ratio: whole-image |target - base| / |reference - base| (how much of the pair's difference the target
    keeps: low = consistent with the base; a target that copies the reference scores ~1);
  * coverage: the median share of the image inside the fusion mask (a mask over the whole image is no mask);
  * keep: |target - base| outside the fusion mask / |reference - base| there (the base kept where the mask
    is not; read together with coverage: outside a 90% mask is 10% of the image);
  * moved: 1 - |target - reference| / |base - reference| over the whole image (how far the target went);
  * ideal: the ratio an ideal object-level fusion would score on the same pair: the reference's pixels inside
    the union of both images' objects (the checker's filled silhouettes), the base's elsewhere. The part of
    the pair's difference that lies on the objects; a form cannot be more consistent while moving every object;
  * excess: (ratio - ideal) / (1 - ideal), the share of the background's difference the target copied (0: an
    ideal fusion, 1: a copy of the reference).
The mask is the one the fusion used: its per-step masks (grown by the dilation) averaged over the fused steps,
> 0.5, upsampled (nearest). `--write-defaults` picks the form by both criteria at once (choose_form: the most
accepted form whose ratio and median coverage stay under their limits) and writes it to the model's dfusion.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams, apply_model_defaults, fusion_defaults
from dfusion_core.engine.fusion import fuse_batch
from dfusion_core.engine.loading import LoadedModel, load_model
from dfusion_core.engine.masks import resize_mask
from dfusion_core.engine.sampling import sample
from dfusion_core.worlds.shapesworld.checker import check, parse_image
from dfusion_core.worlds.shapesworld.world import FAMILIES, prompt_list


def fusion_forms(defaults: dict, mask: MaskParams) -> dict[str, FusionParams]:
    """The forms compared: the model's default; the reference-only mask; reference-union-base (dilated one
    cell) with and without the base's latents held outside the mask, held with a hard (nearest) mask, from
    step 3, dilated two cells (held softly, hard, from step 3); union masks cut at 30% of each map's peak; and a
    global swap from step 1 (how far fusion
    can move a target at all)."""
    union = replace(mask, union_base=True, dilate=1)
    held = FusionParams(start_step=1, layers="all", hold_outside=True, mask=union)
    reference_only = FusionParams(start_step=1, layers="all", mask=replace(mask, union_base=False, dilate=0))
    return {"default": fusion_defaults(defaults, mask),
            "reference_only": reference_only,
            "reference_only_held": replace(reference_only, hold_outside=True),
            "union_base_held": replace(held, mask=replace(union, dilate=0)),
            "union_base_held_from3": replace(held, start_step=3, mask=replace(union, dilate=0)),
            "union_base_dilated": FusionParams(start_step=1, layers="all", mask=union),
            "union_base_dilated_held": held,
            "union_base_dilated_held_nearest": replace(held, mask=replace(union, resize="nearest")),
            "union_base_dilated_held_from3": replace(held, start_step=3),
            "union_base_dilated2_held": replace(held, mask=replace(union, dilate=2)),
            "union_base_dilated2_held_nearest": replace(held, mask=replace(union, dilate=2, resize="nearest")),
            "union_base_dilated2_held_from3": replace(held, start_step=3, mask=replace(union, dilate=2)),
            # a lower cut (30% of each map's peak, not Otsu's): whole objects on a 16x16 grid without growing the mask
            "union_base_held_rel30": replace(held, mask=replace(union, dilate=0, threshold_mode="relative",
                                                                threshold=0.3)),
            "union_base_dilated_held_rel30": replace(held, mask=replace(union, threshold_mode="relative",
                                                                        threshold=0.3)),
            # the one-cell held form with each keyword's map cut on its own and OR-ed (the paper's union), with the
            # maps averaged over the steps so far, or with edges softened by a Gaussian of one cell
            "union_base_dilated_held_union": replace(held, mask=replace(union, combine="union")),
            "union_base_dilated_held_accumulated": replace(held, mask=replace(union, accumulate_steps=True)),
            "union_base_dilated_held_feather1": replace(held, mask=replace(union, feather=1.0)),
            # the per-keyword union without growth: each object's own map, so no cell is added around it
            "union_base_held_union": replace(held, mask=replace(union, combine="union", dilate=0)),
            "union_base_held_union_accumulated": replace(held, mask=replace(union, combine="union", dilate=0,
                                                                            accumulate_steps=True)),
            # the union without growth, the base's part grown one cell: its objects erased whole at the mask's edge
            "union_base_held_union_base1": replace(held, mask=replace(union, combine="union", dilate=0, dilate_base=1)),
            "global_from_step1": FusionParams(start_step=1, layers="all", use_mask=False, mask=mask)}


def _pixels(im) -> np.ndarray:
    return np.asarray(im).astype(np.float64)


def _pixel_mask(res, size: int) -> np.ndarray:
    """The region the fusion used: the fused steps' masks (already grown by the dilation), > 0.5 on average."""
    first, last = res.fusion.step_range(res.sampling.num_steps)
    m = (res.masks[first - 1:last].mean(0) > 0.5).float()
    return (resize_mask(m, (size, size), "nearest") > 0.5).numpy()


def ideal_ratio(base: np.ndarray, reference: np.ndarray) -> float:
    """Whole-image ratio of the ideal target: reference inside the union of both images' object silhouettes,
    base outside (so |ideal - base| is |reference - base| on the objects, 0 elsewhere)."""
    objects = np.zeros(base.shape[:2], bool)
    for im in (base, reference):
        for o in parse_image(im.astype(np.uint8)):
            objects |= o.silhouette
    diff = np.abs(reference - base).sum(-1)
    return float(diff[objects].sum() / diff.sum()) if diff.sum() > 0 else float("nan")


def pair_metrics(res, prompt: str, ideal: float | None = None) -> dict:
    """One fused pair's metrics; `ideal` depends on the pair alone (pass it to reuse it across forms)."""
    t, b, r = _pixels(res.target_image), _pixels(res.base_image), _pixels(res.reference_image)
    out = ~_pixel_mask(res, t.shape[0]) if res.fusion.use_mask else np.zeros(t.shape[:2], bool)
    rb_out = np.abs(r - b)[out].mean() if out.any() else float("nan")
    rb = np.abs(r - b).mean()
    return {"accept": bool(check(np.asarray(res.target_image), prompt).correct),
            "ratio": float(np.abs(t - b).mean() / rb) if rb > 0 else float("nan"),
            "coverage": float(1 - out.mean()),
            "keep": float(np.abs(t - b)[out].mean() / rb_out) if out.any() and rb_out > 0 else float("nan"),
            "moved": float(1 - np.abs(t - r).mean() / max(np.abs(b - r).mean(), 1e-9)),
            "ideal": ideal_ratio(b, r) if ideal is None else ideal}


def ground_truth_pairs(model: LoadedModel, prompt: str, seeds: list[int], sampling: SamplingParams, per_prompt: int):
    cands = sample(model, prompt, seeds, sampling)
    ok = [check(np.asarray(im), prompt).correct for im in cands.images]
    good = [s for s, c in zip(seeds, ok) if c]
    bad = [(s, tr, im) for s, c, tr, im in zip(seeds, ok, cands.trajectories, cands.images) if not c]
    pairs = [(bad[i][0], good[i % len(good)]) for i in range(min(per_prompt, len(bad)))] if good else []
    bases = {s: tr for s, tr, _ in bad}
    images = {s: im for s, _, im in bad}
    return pairs, bases, images, sum(ok) / len(ok)


def run(model: LoadedModel, n_prompts: int, n_candidates: int, per_prompt: int, seed: int = 0,
        forms: list[str] | None = None) -> dict:
    sampling, mask = apply_model_defaults(model.defaults, SamplingParams(), MaskParams())
    every = fusion_forms(model.defaults, mask)
    unknown = set(forms or ()) - set(every)
    if unknown:
        raise ValueError(f"unknown fusion form(s) {sorted(unknown)}; choose from {', '.join(every)}")
    forms = {k: v for k, v in every.items() if not forms or k in forms}
    rows = []
    for family in FAMILIES:
        for spec in prompt_list(family, "train", n=n_prompts, seed=seed):
            seeds = list(range(seed * 1000, seed * 1000 + n_candidates))
            pairs, bases, images, acc = ground_truth_pairs(model, spec.text, seeds, sampling, per_prompt)
            print(f"{family}: {spec.text!r}: accuracy {acc:.2f}, {len(pairs)} pairs", file=sys.stderr, flush=True)
            done: dict = {}  # a form equal to one already run (e.g. the default) reuses its metrics
            ideals: list = [None] * len(pairs)  # per pair, not per form: parsed once
            for name, fp in forms.items():
                if not pairs:
                    continue
                if fp not in done:
                    done[fp] = [pair_metrics(res, spec.text, ideal) for res, ideal in
                                zip(fuse_batch(model, spec.text, pairs, sampling, fp, bases=bases,
                                               base_images=images, exact_log_probs=False), ideals)]  # images only
                    ideals = [m["ideal"] for m in done[fp]]
                rows += [{"family": family, "form": name, "prompt": spec.text, **m} for m in done[fp]]
                print(f"  {name}: " + json.dumps(done[fp]), file=sys.stderr, flush=True)  # kept if the run stops
    return {"model": model.model_id, "candidates": n_candidates, "prompts_per_family": n_prompts,
            "forms": {k: asdict(v) for k, v in forms.items()}, "rows": rows, "table": summarise(rows)}


def _mean(values) -> float | None:
    """Mean of the defined values (None and nan left out); None when there are none."""
    vals = [v for v in values if v is not None and v == v]
    return float(np.mean(vals)) if vals else None


def _excess(row: dict) -> float | None:
    """(ratio - ideal) / (1 - ideal): the share of the difference off the objects (the background's) that the
    target copied from the reference: 0 for an ideal object-level fusion, 1 for a copy of the reference."""
    ideal, ratio = row.get("ideal"), row.get("ratio")
    if ideal is None or ratio is None or not (ideal == ideal and ratio == ratio) or ideal >= 1:
        return None
    return (ratio - ideal) / (1 - ideal)


def summarise(rows: list[dict]) -> dict:
    """{form: {family and "all": pairs, accept, ratio, coverage, keep (mean over pairs with an outside), moved,
    ideal, excess}}."""
    table: dict = {}
    for r in rows:
        for fam in (r["family"], "all"):
            table.setdefault(r["form"], {}).setdefault(fam, []).append(r)
    out = {}
    for form, fams in table.items():
        out[form] = {}
        for fam in sorted(fams, key=lambda f: (f == "all", f)):
            rs = fams[fam]
            out[form][fam] = {"pairs": len(rs), "accept": float(np.mean([x["accept"] for x in rs])),
                              "ratio": _mean(x.get("ratio") for x in rs),
                              "coverage": float(np.median([x["coverage"] for x in rs])) if "coverage" in rs[0] else None,
                              "keep": _mean(x["keep"] for x in rs),
                              "moved": float(np.mean([x["moved"] for x in rs])),
                              "ideal": _mean(x.get("ideal") for x in rs),
                              "excess": _mean(_excess(x) for x in rs)}
    return out


DEFAULT_KEYS = ("union_base", "dilate", "dilate_base", "combine", "resize", "start_step", "layers",
                "hold_outside")  # what dfusion.json keeps


def choose_form(table: dict, max_ratio: float = 0.4, max_coverage: float = 0.5,
                min_accept: float = 0.6, max_excess: float | None = None) -> str | None:
    """The form the model should fuse with, judged on all families at once: among masked forms whose mean
    whole-image ratio <= max_ratio and median coverage <= max_coverage (consistent with the base) and whose
    targets the checker accepts at least min_accept of the time (a consistent form that transfers nothing is
    a copy of the base, not a D-Fusion pair), the most accepted (ties: the lower ratio). None when no form is
    both. With max_excess, consistency is read as excess <= max_excess instead of the ratio: the share of the
    background's difference copied, which does not count the objects' own difference (in a world whose
    backgrounds barely differ between seeds, even an ideal target keeps most of |R-B|)."""
    def consistent(v: dict) -> bool:
        if max_excess is not None:
            return v.get("excess") is not None and v["excess"] <= max_excess
        return v.get("ratio") is not None and v["ratio"] <= max_ratio

    ok = [(v["all"]["accept"], -v["all"]["ratio"], name) for name, v in table.items()
          if name != "global_from_step1" and v["all"].get("coverage") is not None and consistent(v["all"])
          and v["all"]["coverage"] <= max_coverage and v["all"]["accept"] >= min_accept]
    return max(ok)[2] if ok else None


def form_defaults(fp: FusionParams) -> dict:
    """A form's dfusion.json keys (engine.config.fusion_defaults / apply_model_defaults read them back)."""
    flat = {**asdict(fp.mask), **{k: v for k, v in asdict(fp).items() if k != "mask"}}
    return {k: (list(flat[k]) if isinstance(flat[k], tuple) else flat[k]) for k in DEFAULT_KEYS}


def write_defaults(folder, form: str, fp: FusionParams) -> dict:
    """Merge the chosen form into FOLDER/dfusion.json (other keys kept) and return the file's content."""
    from dfusion_core.data.atomic import write_text_atomic

    path = Path(folder) / "dfusion.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({**form_defaults(fp), "fusion_form": form})
    write_text_atomic(path, json.dumps(data, indent=2))
    return data


def _rows_from(path: str) -> dict:
    """An earlier run's file with its table recomputed from its rows (new columns, new limits)."""
    with open(path) as f:
        res = json.load(f)
    if not isinstance(res, dict) or not isinstance(res.get("rows"), list):
        raise ValueError(f"{path}: not a fusion_transfer --out file (no rows)")
    return {**res, "table": summarise(res["rows"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--prompts", type=int, default=8, help="train prompts per family (8)")
    p.add_argument("--candidates", type=int, default=16, help="candidates sampled per prompt (16)")
    p.add_argument("--pairs-per-prompt", type=int, default=4, help="ground-truth pairs kept per prompt (4)")
    p.add_argument("--forms", default=None, help="comma-separated fusion forms to compare (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    p.add_argument("--rows-from", default=None, help="fuse nothing: re-summarise (and choose from) the rows of an "
                   "earlier --out file")
    p.add_argument("--write-defaults", action="store_true",
                   help="write the form choose_form picks into the model folder's dfusion.json")
    p.add_argument("--max-ratio", type=float, default=0.4, help="choose_form: whole-image ratio limit (0.4)")
    p.add_argument("--max-coverage", type=float, default=0.5, help="choose_form: median mask coverage limit (0.5)")
    p.add_argument("--max-excess", type=float, default=None,
                   help="choose_form: read consistency as excess <= this instead of the ratio (default: the ratio)")
    p.add_argument("--min-accept", type=float, default=0.6, help="choose_form: checker acceptance floor (0.6)")
    a = p.parse_args(argv)
    if min(a.prompts, a.candidates, a.pairs_per_prompt) < 1:
        p.error("--prompts, --candidates and --pairs-per-prompt must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    forms = [f.strip() for f in a.forms.split(",") if f.strip()] if a.forms else None
    if a.out:  # said now, not after a quarter of an hour of fusing (a missing folder is made)
        try:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--out {a.out}: {e}")
    try:
        if a.rows_from:
            res = _rows_from(a.rows_from)
        else:
            model = load_model(a.model, device="cpu")
            res = run(model, a.prompts, a.candidates, a.pairs_per_prompt, forms=forms)
    except (ValueError, OSError, KeyError) as e:
        p.error(str(e))
    res["chosen"] = choose_form(res["table"], a.max_ratio, a.max_coverage, a.min_accept, a.max_excess)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({"table": res["table"], "chosen": res["chosen"]}, indent=1))
    if a.write_defaults:
        if res["chosen"] is None:
            print("error: no form meets both limits; dfusion.json left as it was", file=sys.stderr)
            return 1
        from dfusion_core.engine.loading import DEFAULT_MODEL

        fp = FusionParams(**{**res["forms"][res["chosen"]], "mask": MaskParams(**res["forms"][res["chosen"]]["mask"])})
        write_defaults(a.model or DEFAULT_MODEL, res["chosen"], fp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
