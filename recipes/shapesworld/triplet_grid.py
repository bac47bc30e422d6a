"""The model card's picture of D-Fusion on a ShapesWorld model: for prompts of each family, a (base | reference |
target) triplet made with the model's own fusion form (its dfusion.json), the reference a candidate the checker
accepts and the base one it rejects; each image framed green / red by the checker, the fusion mask's coverage
and the whole-image ratio |target - base| / |reference - base| printed beside it.

    python -m recipes.shapesworld.triplet_grid --model runs/sw3-mmdit/pipeline --out docs/triplets.png
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image, ImageDraw

from dfusion_core.engine.fusion import fuse
from dfusion_core.engine.loading import load_model
from dfusion_core.engine.sampling import sample
from dfusion_core.worlds.shapesworld.checker import check
from dfusion_core.worlds.shapesworld.world import prompt_list

from .sample_grid import FAMILIES, framed


def pick_pair(model, spec, candidates: int, seed0: int):
    """(base seed, reference seed): a rejected and an accepted candidate of the prompt, or None."""
    seeds = list(range(seed0, seed0 + candidates))
    res = sample(model, spec.text, seeds, model.default_sampling())
    oks = [check(np.asarray(im), spec).correct for im in res.images]
    good = [s for s, ok in zip(seeds, oks) if ok]
    bad = [s for s, ok in zip(seeds, oks) if not ok]
    return (bad[0], good[0]) if good and bad else None


def triplet_row(model, spec, pair) -> tuple[list[Image.Image], dict]:
    r = fuse(model, spec.text, base_seed=pair[0], ref_seed=pair[1])
    ims = [r.base_image, r.reference_image, r.target_image]
    arr = [np.asarray(im).astype(np.float32) for im in ims]
    ratio = float(np.abs(arr[2] - arr[0]).mean() / max(np.abs(arr[1] - arr[0]).mean(), 1e-6))
    oks = [check(a.astype(np.uint8), spec).correct for a in arr]
    coverage = r.mask_coverage  # the mask's share of the image, mean over the fused steps
    return [framed(im, ok) for im, ok in zip(ims, oks)], {"prompt": spec.text, "ratio": round(ratio, 3),
                                                           "coverage": round(coverage, 3), "target_ok": oks[2]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--out", required=True, help="PNG to write (and the rows as JSON beside it)")
    ap.add_argument("--per-family", type=int, default=4, help="triplets per family (4: twelve in all)")
    ap.add_argument("--split", default="test", choices=("train", "test"), help="prompt split (test)")
    ap.add_argument("--candidates", type=int, default=8, help="candidates per prompt to find the pair in (8)")
    a = ap.parse_args(argv)
    model = load_model(a.model, device="cpu")
    rows, info = [], []
    for fam in FAMILIES:
        specs, k = prompt_list(fam, a.split), 0
        for i in range(len(specs)):
            if k == a.per_family:
                break
            spec = specs[(i * 7) % len(specs)]  # spread through the list: neighbours share their first words
            pair = pick_pair(model, spec, a.candidates, seed0=100 * i)
            if pair is None:
                continue
            cells, row = triplet_row(model, spec, pair)
            rows.append(cells)
            info.append({"family": fam, "base_seed": pair[0], "ref_seed": pair[1], **row})
            k += 1
    cell, label_w = rows[0][0].size, 360
    sheet = Image.new("RGB", (label_w + 3 * cell[0], cell[1] * len(rows) + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(("base", "reference", "target")):
        draw.text((label_w + c * cell[0] + 4, 2), name, fill="black")
    for r, (cells, row) in enumerate(zip(rows, info)):
        y = 16 + r * cell[1]
        draw.text((6, y + cell[1] // 2 - 12), row["prompt"], fill="black")
        draw.text((6, y + cell[1] // 2 + 2), f"mask {row['coverage']:.0%} · |T-B|/|R-B| {row['ratio']:.2f}",
                  fill="gray")
        for c, im in enumerate(cells):
            sheet.paste(im, (label_w + c * cell[0], y))
    sheet.save(a.out)
    with open(a.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({"rows": len(info), "target_ok": float(np.mean([r["target_ok"] for r in info])),
                      "median_ratio": float(np.median([r["ratio"] for r in info])),
                      "median_coverage": float(np.median([r["coverage"] for r in info]))}))


if __name__ == "__main__":
    main()
