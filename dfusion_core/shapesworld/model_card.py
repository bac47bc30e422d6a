"""Write assets/MODEL_CARD.md from measured files: an eval report, checker validations, training logs.

    python -m dfusion_core.shapesworld.model_card --eval eval.json --checker checker.json \
        --checker-noisy checker-noise.json --gen-log runs/shapesworld/log.jsonl --clip-log runs/shapesworld-clip/log.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..engine.loading import ASSETS


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix == ".safetensors") / 1e6


def _last(log: Path, stage: str) -> dict:
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    rows = [r for r in rows if r.get("stage") == stage]
    return rows[-1] if rows else {}


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(ev: dict, checker: dict, checker_noisy: dict | None, gen_log: Path, clip_log: Path,
           prior_unet_steps: int = 0, vae_steps: int | None = None, clip_steps: int | None = None) -> str:
    """`prior_unet_steps`: UNet steps the run in `gen_log` started from (`train_generator --init-from`);
    `vae_steps` / `clip_steps`: the autoencoder's / scorer's steps when no log of their training is at hand."""
    fam = ev["families"]
    allf = fam["all"]
    weights = _size_mb(ASSETS / "shapesworld") + _size_mb(ASSETS / "shapesworld-clip")
    unet, vae, clip = _last(gen_log, "unet"), _last(gen_log, "vae"), _last(clip_log, "clip")
    vae_trained = vae.get("step", vae_steps if vae_steps is not None else "?")
    unet_trained = "?" if "step" not in unet else (
        f"{prior_unet_steps + unet['step']:,} ({prior_unet_steps:,} + {unet['step']:,} continued)" if prior_unet_steps
        else f"{unet['step']:,}")
    lines = [
        "# ShapesWorld models: model card",
        "",
        "Trained from scratch by this project's scripts on its own rendered world (see README, ShapesWorld).",
        "Every number below was measured by the commands at the end; nothing is copied from elsewhere.",
        "",
        "## Models",
        f"- `shapesworld/`: StableDiffusionPipeline - AutoencoderKL (64x64x3 -> 16x16x4) trained {vae_trained} "
        f"steps; causal CLIPTextModel (3 layers, width 128) with the CLIP BPE tokenizer; UNet2DConditionModel "
        f"(64/128/128 channels, cross-attention at 16x16 and 8x8, mid block 4x4), v-prediction, cosine schedule, "
        f"EMA 0.995, trained {unet_trained} steps of batch 16 (last logged loss {unet.get('loss', float('nan')):.3f}); DDIM.",
        f"- `shapesworld-clip/`: OpenCLIP custom model (ViT 4 layers width 128 on 8x8 patches, text 3 layers width "
        f"128, context 32), contrastive with hard-negative captions, trained {clip.get('step', clip_steps or '?')} steps of batch 64; "
        "independent of the generator (no shared weights).",
        f"- All shipped weights (fp16 safetensors): {weights:.1f} MB (budget 50 MB).",
        "",
        f"## Evaluation ({ev['samples']} samples, {ev['split']} prompts, {ev['seeds_per_prompt']} seeds each, "
        f"{ev['sampling']['num_steps']} DDIM steps, CFG {ev['sampling']['guidance_scale']}, eta {ev['sampling']['eta']})",
        "",
        "| family | n | checker accuracy [95% CI] | objects found | colours | shapes | textures | relation | mask IoU | peak inside | CLIP AUROC | true caption wins |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for name, d in fam.items():
        ci = d["accuracy_ci95"]
        lines.append(f"| {name} | {d['n']} | {d['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {d['objects_found']:.2f} | "
                     f"{d['colours_right']:.2f} | {d['shapes_right']:.2f} | {d['textures_right']:.2f} | "
                     f"{fmt(d.get('relation_right'))} | {fmt(d['mask_iou'])} | {fmt(d['mask_peak_inside'])} | "
                     f"{fmt(d.get('clip_auroc_correct_vs_wrong'))} | {fmt(d.get('clip_true_caption_wins'))} |")
    accs = {k: v["accuracy"] for k, v in fam.items() if k != "all"}
    floors = [
        ("checker finds the expected objects >= 90%", allf["objects_found"] >= 0.9, f"{allf['objects_found']:.2f}"),
        ("checker accuracy per family in [25%, 80%]", all(0.25 <= a <= 0.8 for a in accs.values()),
         ", ".join(f"{k} {v:.2f}" for k, v in accs.items())),
        ("mask IoU >= 0.4", (allf["mask_iou"] or 0) >= 0.4, fmt(allf["mask_iou"])),
        ("mask peak inside the object >= 75%", (allf["mask_peak_inside"] or 0) >= 0.75, fmt(allf["mask_peak_inside"])),
        ("CLIP AUROC (checker-correct vs wrong) >= 0.75", (allf.get("clip_auroc_correct_vs_wrong") or 0) >= 0.75,
         fmt(allf.get("clip_auroc_correct_vs_wrong"))),
        ("CLIP picks the true caption among its perturbations >= 70%", (allf.get("clip_true_caption_wins") or 0) >= 0.7,
         fmt(allf.get("clip_true_caption_wins"))),
        (f"checker on {checker['images']} rendered images: accepts true captions >= 98%", checker["accept_true"] >= 0.98,
         f"{checker['accept_true']:.4f}"),
        ("checker accepts perturbed captions <= 2%", checker["accept_perturbed"] <= 0.02, f"{checker['accept_perturbed']:.4f}"),
        ("shipped weights <= 50 MB", weights <= 50, f"{weights:.1f} MB"),
    ]
    lines += ["", "## Floors", "", "| floor | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {name} | {val} | {_mark(ok)} |" for name, ok, val in floors]
    if checker_noisy:
        lines += ["", f"Checker on {checker_noisy['images']} blurred + noisy renders (robustness, not a floor): accepts "
                  f"{checker_noisy['accept_true']:.4f} of true and {checker_noisy['accept_perturbed']:.4f} of perturbed captions."]
    lines += ["", "Mask IoU by object: first object of a caption "
              f"{fmt(allf.get('mask_iou_first_object'))}, second {fmt(allf.get('mask_iou_second_object'))}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--checker", required=True)
    ap.add_argument("--checker-noisy", default=None)
    ap.add_argument("--gen-log", default="runs/shapesworld/log.jsonl")
    ap.add_argument("--clip-log", default="runs/shapesworld-clip/log.jsonl")
    ap.add_argument("--extra", default=None, help="a markdown file appended verbatim (limits, commands)")
    ap.add_argument("--out", default=str(ASSETS / "MODEL_CARD.md"))
    ap.add_argument("--prior-unet-steps", type=int, default=0,
                    help="UNet steps of the weights the logged run continued from (--init-from)")
    ap.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps, when the log has none")
    ap.add_argument("--clip-steps", type=int, default=None, help="scorer steps, when its log is not at hand")
    a = ap.parse_args(argv)
    ev = json.loads(Path(a.eval).read_text())
    ck = json.loads(Path(a.checker).read_text())
    ckn = json.loads(Path(a.checker_noisy).read_text()) if a.checker_noisy else None
    text = render(ev, ck, ckn, Path(a.gen_log), Path(a.clip_log), a.prior_unet_steps, a.vae_steps,
                  a.clip_steps)
    if a.extra:
        text += "\n" + Path(a.extra).read_text()
    Path(a.out).write_text(text)
    print(a.out)


if __name__ == "__main__":
    main()
