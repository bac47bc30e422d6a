"""A look at a ShapesWorld model: TEST prompts (three per family) x seeds, each sample framed green when the
ground-truth checker accepts it and red when it rejects it, with the per-family acceptance printed.

    python -m recipes.shapesworld.sample_grid --model runs/sw3-mmdit/pipeline --out docs/grid.png [--seeds 6]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image, ImageDraw

from dfusion_core.engine.loading import load_model
from dfusion_core.engine.sampling import sample
from dfusion_core.worlds.shapesworld.checker import check
from dfusion_core.worlds.shapesworld.world import prompt_list

FAMILIES = ("action", "attribute", "spatial")


def grid_prompts(per_family: int = 3, stride: int = 7) -> list:
    """(family, PromptSpec): TEST prompts spread through each family's list (neighbours share their first words)."""
    out = []
    for fam in FAMILIES:
        specs = prompt_list(fam, "test")
        out += [(fam, specs[(k * stride) % len(specs)]) for k in range(per_family)]
    return out


def framed(im: Image.Image, ok: bool, scale: int = 2) -> Image.Image:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (im.width + 6, im.height + 6), (40, 170, 60) if ok else (200, 40, 40))
    canvas.paste(im, (3, 3))
    return canvas


def make_grid(model, prompts, seeds) -> tuple[Image.Image, dict]:
    rows, accepted = [], {f: [] for f in FAMILIES}
    for fam, spec in prompts:
        res = sample(model, spec.text, list(seeds), model.default_sampling())
        oks = [check(np.asarray(im), spec).correct for im in res.images]
        accepted[fam] += oks
        rows.append((spec.text, [framed(im, ok) for im, ok in zip(res.images, oks)]))
    cell = rows[0][1][0].size
    label_w = 330
    sheet = Image.new("RGB", (label_w + cell[0] * len(seeds), cell[1] * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, cells) in enumerate(rows):
        draw.text((6, r * cell[1] + cell[1] // 2 - 6), prompt, fill="black")
        for c, im in enumerate(cells):
            sheet.paste(im, (label_w + c * cell[0], r * cell[1]))
    return sheet, {f: round(float(np.mean(v)), 3) for f, v in accepted.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--seeds", type=int, default=6, help="samples per prompt (6)")
    ap.add_argument("--per-family", type=int, default=3, help="TEST prompts per family (3)")
    a = ap.parse_args(argv)
    model = load_model(a.model, device="cpu")
    sheet, acc = make_grid(model, grid_prompts(a.per_family), range(a.seeds))
    sheet.save(a.out)
    print(json.dumps({"out": a.out, "accepted": acc}))


if __name__ == "__main__":
    main()
