"""How well fusion masks cover the objects, per way of combining keywords, on ShapesWorld TRAIN prompts.

    python benchmarks/mask_quality.py [--prompts 5] [--seeds 2] [--split train]

For each prompt and seed: sample while recording cross-attention (steps 3..20 averaged, the fused range), find
the objects the image really has with the ground-truth checker, and compare the mask of the prompt's default
keywords with the union of the object silhouettes: coverage (fraction of the image in the mask) and IoU.
Settings are chosen from this on TRAIN prompts only; the experiment evaluates on test prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dfusion_core.engine.config import MaskParams, SamplingParams, apply_model_defaults
from dfusion_core.engine.fusion import record_attention
from dfusion_core.engine.loading import load_model
from dfusion_core.engine.masks import keyword_mask, keyword_maps
from dfusion_core.worlds.shapesworld.checker import check
from dfusion_core.worlds.shapesworld.world import FAMILIES, prompt_list
from dfusion_core.engine.tokens import default_keywords, keyword_token_indices

SETTINGS = [("mean", "auto", 0.5), ("union", "auto", 0.5), ("mean", "relative", 0.5), ("union", "relative", 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5, help="prompts per family")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--map-softmax", default="joint", choices=["joint", "text"],
                    help="MMDiT models: softmax over the joint sequence or over the text keys (default: joint)")
    a = ap.parse_args()
    model = load_model(a.model)
    sampling, _ = apply_model_defaults(model.defaults, SamplingParams(), MaskParams())
    factors = tuple(model.defaults.get("layer_factors", (4,)))
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for fam in FAMILIES:
        for spec in prompt_list(fam, a.split, a.prompts):
            groups = keyword_token_indices(model.tokenizer, spec.text, default_keywords(model.tokenizer, spec.text))
            seeds = list(range(1000, 1000 + a.seeds))
            rec = record_attention(model, spec.text, seeds, sampling, layer_factors=factors,
                                   steps=(min(3, sampling.num_steps), sampling.num_steps), map_softmax=a.map_softmax)
            for k, image in enumerate(rec.images):
                found = check(np.asarray(image), spec).objects
                objects = np.zeros(image.size[::-1], dtype=bool)
                for o in found:
                    objects |= o.silhouette.astype(bool)
                kmaps = keyword_maps(rec.token_maps[k], groups)
                for combine, mode, t in SETTINGS:
                    m = keyword_mask(kmaps, mode, t, combine)
                    up = F.interpolate(m[None, None].float(), size=objects.shape, mode="nearest")[0, 0].numpy() > 0.5
                    iou = float((up & objects).sum() / max(1, (up | objects).sum()))
                    rows.setdefault((fam, f"{combine} {mode} {t}"), []).append((float(up.mean()), iou,
                                                                                 float(objects.mean())))
    out = {f"{fam} | {name}": {"coverage": round(float(np.mean([r[0] for r in v])), 3),
                               "iou": round(float(np.mean([r[1] for r in v])), 3),
                               "object_area": round(float(np.mean([r[2] for r in v])), 3), "samples": len(v)}
           for (fam, name), v in sorted(rows.items())}
    print("| family | combine, threshold | mask coverage | IoU with objects | object area |")
    print("| --- | --- | --- | --- | --- |")
    for key, v in out.items():
        fam, name = key.split(" | ")
        print(f"| {fam} | {name} | {v['coverage']:.2f} | {v['iou']:.2f} | {v['object_area']:.2f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
