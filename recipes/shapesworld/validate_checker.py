"""Validate the ground-truth checker on rendered scenes: true captions accepted, perturbed ones rejected.

    python -m recipes.shapesworld.validate_checker --n 2400 [--world 2] [--degrade noise]
    python -m recipes.shapesworld.validate_checker --floors --n 2000   # both worlds, clean and noisy

Prints one JSON object: accept rate on true captions and on each kind of perturbed caption, per family.
With --floors: one such object per world version and degradation, each with the floors it meets
(accepts >= 98% of true captions, <= 2% of perturbed ones), and a summary line per run on stderr.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict

import numpy as np

from dfusion_core.worlds.shapesworld.checker import check
from dfusion_core.worlds.shapesworld.render import render
from dfusion_core.worlds.shapesworld.world import FAMILIES, WORLD_VERSIONS, SceneStyle, perturbations, prompts, scene_style

FLOOR_TRUE, FLOOR_PERTURBED = 0.98, 0.02  # the checker's validation floors


def degrade_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur + noise, like a generator's soft edges and speckle."""
    from PIL import Image, ImageFilter

    im = Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8))
    x = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, image.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def validate(n: int, seed: int = 0, degrade: str | None = None, world: int | SceneStyle = 1) -> dict:
    """Render n scenes of world version `world` (families in turn), check the true caption and each
    perturbation of it."""
    style = scene_style(world)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    true_ok, wrong_ok = defaultdict(list), defaultdict(list)
    pools = {f: prompts(f, "train") + prompts(f, "test") for f in FAMILIES}
    for i in range(n):
        fam = FAMILIES[i % len(FAMILIES)]
        spec = rng.choice(pools[fam])
        img = render(spec, rng, style).image
        if degrade == "noise":
            img = degrade_noise(img, nrng)
        true_ok[fam].append(check(img, spec).correct)
        for kind, wrong in perturbations(spec, rng).items():
            wrong_ok[(fam, kind)].append(check(img, wrong).correct)
    all_true = [v for vs in true_ok.values() for v in vs]
    all_wrong = [v for vs in wrong_ok.values() for v in vs]
    return {
        "images": n, "world": style.version, "degrade": degrade or "none",
        "accept_true": round(float(np.mean(all_true)), 4),
        "accept_perturbed": round(float(np.mean(all_wrong)), 4),
        "accept_true_by_family": {f: round(float(np.mean(v)), 4) for f, v in true_ok.items()},
        "accept_perturbed_by_kind": {f"{f}/{k}": round(float(np.mean(v)), 4) for (f, k), v in wrong_ok.items()},
    }


def floors(n: int, seed: int = 0, worlds=WORLD_VERSIONS, degrades=(None, "noise")) -> dict:
    """validate() for every world version and degradation, each marked with the floors it meets."""
    out = {}
    for world in worlds:
        for degrade in degrades:
            r = validate(n, seed, degrade, world)
            r["floors_met"] = r["accept_true"] >= FLOOR_TRUE and r["accept_perturbed"] <= FLOOR_PERTURBED
            out[f"v{world}/{degrade or 'clean'}"] = r
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2400, help="rendered scenes per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--degrade", choices=["noise"], default=None)
    ap.add_argument("--world", type=int, choices=WORLD_VERSIONS, default=1, help="world version to render")
    ap.add_argument("--floors", action="store_true", help="every world version, clean and noisy")
    a = ap.parse_args(argv)
    if not a.floors:
        print(json.dumps(validate(a.n, a.seed, a.degrade, a.world), indent=2))
        return
    report = floors(a.n, a.seed)
    for name, r in report.items():
        print(f"{name:>10}: {r['images']} renders, accept true {r['accept_true']:.4f}, perturbed "
              f"{r['accept_perturbed']:.4f}, floors {'met' if r['floors_met'] else 'NOT met'}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
