"""Validate the ground-truth checker on rendered scenes: true captions accepted, perturbed ones rejected.

    python -m dfusion_core.shapesworld.validate_checker --n 2400 [--degrade vae-folder]

Prints one JSON object: accept rate on true captions and on each kind of perturbed caption, per family.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import numpy as np

from .checker import check
from .render import render
from .world import FAMILIES, perturbations, prompts


def degrade_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur + noise, like a generator's soft edges and speckle."""
    from PIL import Image, ImageFilter

    im = Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8))
    x = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, image.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def validate(n: int, seed: int = 0, degrade: str | None = None) -> dict:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    true_ok, wrong_ok = defaultdict(list), defaultdict(list)
    pools = {f: prompts(f, "train") + prompts(f, "test") for f in FAMILIES}
    for i in range(n):
        fam = FAMILIES[i % len(FAMILIES)]
        spec = rng.choice(pools[fam])
        img = render(spec, rng).image
        if degrade == "noise":
            img = degrade_noise(img, nrng)
        true_ok[fam].append(check(img, spec).correct)
        for kind, wrong in perturbations(spec, rng).items():
            wrong_ok[(fam, kind)].append(check(img, wrong).correct)
    all_true = [v for vs in true_ok.values() for v in vs]
    all_wrong = [v for vs in wrong_ok.values() for v in vs]
    return {
        "images": n, "degrade": degrade or "none",
        "accept_true": round(float(np.mean(all_true)), 4),
        "accept_perturbed": round(float(np.mean(all_wrong)), 4),
        "accept_true_by_family": {f: round(float(np.mean(v)), 4) for f, v in true_ok.items()},
        "accept_perturbed_by_kind": {f"{f}/{k}": round(float(np.mean(v)), 4) for (f, k), v in wrong_ok.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--degrade", choices=["noise"], default=None)
    a = ap.parse_args(argv)
    print(json.dumps(validate(a.n, a.seed, a.degrade), indent=2))


if __name__ == "__main__":
    main()
