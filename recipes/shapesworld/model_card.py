"""Write a ShapesWorld model card from measured files: an eval report, checker validations, training logs and
(for the default model) the fusion-transfer table.

    python -m recipes.shapesworld.model_card --model assets/shapesworld --eval eval.json \
        --checker checker.json --checker-noisy checker-noise.json --fusion fusion.json \
        --gen-log runs/shapesworld/log.jsonl --clip-log runs/shapesworld-clip/log.jsonl

The generator's line is read from the model folder itself: an SD3-shaped folder (transformer/) is described
from its transformer and scheduler configs and train_mmdit's log; a UNet folder from train_generator's log.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfusion_core.engine.loading import ASSETS

WEIGHTS_BUDGET_MB = 60  # every shipped model together (issue floor)
SHIPPED_DIRS = ("shapesworld", "shapesworld-v2", "shapesworld-unet", "shapesworld-clip")
# consistency is judged on the whole image with the mask's size beside it ("keep" outside a 90% mask said little)
FUSION_FLOORS = {"accept": 0.6, "global_moved": 0.5, "pairs": 60, "coverage": 0.5, "ratio": 0.4}


def _size_mb(*paths: Path) -> float:
    """Weights under `paths`, each file counted once (a folder linked into another model is not counted twice)."""
    files = {f.resolve() for path in paths if path.is_dir() for f in path.rglob("*.safetensors") if f.is_file()}
    return sum(f.stat().st_size for f in files) / 1e6


def shipped_weights_mb(assets: Path = ASSETS) -> float:
    return _size_mb(*(assets / d for d in SHIPPED_DIRS))


def _rows(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def _last(log: Path, stage: str) -> dict:
    rows = [r for r in _rows(log) if r.get("stage") == stage]
    return rows[-1] if rows else {}


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def unet_line(gen_log: Path, prior_unet_steps: int = 0, vae_steps: int | None = None) -> str:
    unet, vae = _last(gen_log, "unet"), _last(gen_log, "vae")
    vae_trained = vae.get("step", vae_steps if vae_steps is not None else "?")
    unet_trained = "?" if "step" not in unet else (
        f"{prior_unet_steps + unet['step']:,} ({prior_unet_steps:,} + {unet['step']:,} continued)" if prior_unet_steps
        else f"{unet['step']:,}")
    return (f"StableDiffusionPipeline - AutoencoderKL (64x64x3 -> 16x16x4) trained {vae_trained} steps; causal "
            "CLIPTextModel (3 layers, width 128) with the CLIP BPE tokenizer; UNet2DConditionModel (64/128/128 "
            "channels, cross-attention at 16x16 and 8x8, mid block 4x4), v-prediction, cosine schedule, EMA 0.995, "
            f"trained {unet_trained} steps of batch 16 (last logged loss {unet.get('loss', float('nan')):.3f}); DDIM.")


def _over_runs(counts) -> float | None:
    """A counter summed over the runs of a log: a resumed run's counter goes on, a restarted one starts again
    (a value below the one before it begins a new run). None for no values."""
    total, last, seen = 0, 0, False
    for c in counts:
        if c < last:
            total += last
        last, seen = c, True
    return total + last if seen else None


def _training_minutes(gen_log: Path) -> float | None:
    """Training minutes over every run of a generator's log."""
    minutes = _over_runs(r["minutes"] for r in _rows(gen_log)
                         if r.get("stage") in ("train", "checkpoint") and "minutes" in r)
    return None if minutes is None else round(minutes, 1)


def _clip_steps(clip_log: Path) -> int | None:
    """Scorer steps over every run of its log (a run started from an earlier scorer counts from 0 again)."""
    return _over_runs(r["step"] for r in _rows(clip_log) if r.get("stage") == "clip")


def mmdit_line(model_dir: Path, gen_log: Path) -> str:
    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    sched = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    defaults = model_dir / "dfusion.json"
    world = json.loads(defaults.read_text()).get("world_version", 2) if defaults.is_file() else 2
    train_cfg = gen_log.parent / "train_config.json"
    bf16 = json.loads(train_cfg.read_text()).get("bf16", True) if train_cfg.is_file() else True
    params = _size_mb(model_dir / "transformer") / 2  # fp16: two bytes per parameter
    done = _last(gen_log, "checkpoint")
    vae = _last(gen_log, "vae")
    run = _last(gen_log, "train") if not done else done
    step = run.get("total_step", run.get("step"))  # total_step: counted over resumed and restarted runs
    steps = f"{step:,}" if step is not None else "?"
    loss = f"{run['loss']:.3f}" if run.get("loss") is not None else "?"
    start = ("blocks started from the v2 model's (patch embedding and output layer converted), "
             if world >= 3 else "")
    autoencoder = ("the v2 model's AutoencoderKL (the UNet model's, fine-tuned on v2 scenes), unchanged"
                   if world >= 3 else f"AutoencoderKL of the UNet model fine-tuned {vae.get('step', '?')} steps on "
                   "v2 scenes")
    return (f"StableDiffusion3Pipeline - SD3Transformer2DModel ({cfg['num_layers']} joint blocks, "
            f"{cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, patch {cfg['patch_size']} over the "
            f"16x16x4 latent = {(cfg['sample_size'] // cfg['patch_size']) ** 2} image tokens, {params:.1f}M parameters), "
            f"rectified flow (FlowMatchEulerDiscreteScheduler, shift {sched.get('shift', 1.0)}), logit-normal "
            f"timesteps, EMA 0.995, {'bf16 autocast' if bf16 else 'fp32'}, {start}trained {steps} steps of batch 32 "
            f"({_training_minutes(gen_log) or '?'} training minutes; last logged loss {loss}) on "
            f"world-v{world} scenes; {autoencoder}; the UNet model's text encoder, frozen, as text_encoder and "
            "text_encoder_2 (identity projection; one folder, linked); no T5.")


def fusion_section(fusion: dict) -> tuple[list[str], list[tuple[str, bool, str]]]:
    """The fusion-transfer table (forms x families) and its floors."""
    table = fusion["table"]
    lines = ["", f"## Fusion transfer (ground-truth pairs on TRAIN prompts, {fusion.get('candidates', 16)} candidates "
             "per prompt: reference checker-correct, base checker-wrong)", "",
             "accept: the checker passes the target. ratio: whole-image |target - base| / |reference - base| (lower "
             "= more consistent with the base; a copy of the reference is ~1). coverage: median share of the image "
             "inside the fusion mask. keep: |target - base| outside the mask / |reference - base| there. moved: how "
             "far the whole target went from the base toward the reference. ideal: the ratio of an ideal object-level "
             "fusion on the same pair (the reference inside both images' objects, the base elsewhere); excess = "
             "(ratio - ideal) / (1 - ideal), the share of the background's difference the target copied.", "",
             "| form | family | pairs | accept | ratio | ideal | excess | coverage | keep | moved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for form, fams in table.items():
        for fam, d in fams.items():
            lines.append(f"| {form} | {fam} | {d['pairs']} | {d['accept']:.2f} | {_fmt(d.get('ratio'))} | "
                         f"{_fmt(d.get('ideal'))} | {_fmt(d.get('excess'))} | {_fmt(d.get('coverage'))} | "
                         f"{_fmt(d['keep'])} | {d['moved']:.2f} |")
    d, g = table["default"]["all"], table["global_from_step1"]["all"]
    whole = [("default fusion: median mask coverage <= 0.5", (d.get("coverage") or 1) <= FUSION_FLOORS["coverage"],
              _fmt(d.get("coverage"))),
             ("default fusion: whole-image |target - base| / |reference - base| <= 0.4",
              (d.get("ratio") or 1) <= FUSION_FLOORS["ratio"], _fmt(d.get("ratio")))]
    floors = [(f"default fusion: checker accepts >= 60% of targets on >= {FUSION_FLOORS['pairs']} pairs",
               d["accept"] >= FUSION_FLOORS["accept"] and d["pairs"] >= FUSION_FLOORS["pairs"],
               f"{d['accept']:.2f} on {d['pairs']} pairs"),
              ("global swap from step 1 moves the target >= 50% of the way", g["moved"] >= FUSION_FLOORS["global_moved"],
               f"{g['moved']:.2f}")] + whole
    return lines, floors


def eval_section(ev: dict) -> tuple[list[str], list[tuple[str, bool, str]]]:
    fam, allf = ev["families"], ev["families"]["all"]
    s = ev["sampling"]
    lines = ["", f"## Evaluation ({ev['samples']} samples, {ev['split']} prompts, {ev['seeds_per_prompt']} seeds "
             f"each, {s['num_steps']} steps, CFG {s['guidance_scale']}, eta {s['eta']})", "",
             "| family | n | checker accuracy [95% CI] | objects found | colours | shapes | textures | relation | mask IoU | peak inside | CLIP AUROC | CLIP AUROC within prompt | true caption wins |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, d in fam.items():
        ci = d["accuracy_ci95"]
        lines.append(f"| {name} | {d['n']} | {d['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {d['objects_found']:.2f} | "
                     f"{d['colours_right']:.2f} | {d['shapes_right']:.2f} | {d['textures_right']:.2f} | "
                     f"{_fmt(d.get('relation_right'))} | {_fmt(d['mask_iou'])} | {_fmt(d['mask_peak_inside'])} | "
                     f"{_fmt(d.get('clip_auroc_correct_vs_wrong'))} | {_fmt(d.get('clip_auroc_within_prompt'))} | "
                     f"{_fmt(d.get('clip_true_caption_wins'))} |")
    accs = {k: v["accuracy"] for k, v in fam.items() if k != "all"}
    floors = [
        ("checker finds the expected objects >= 90%", allf["objects_found"] >= 0.9, f"{allf['objects_found']:.2f}"),
        ("checker accuracy per family in [25%, 80%]", all(0.25 <= a <= 0.8 for a in accs.values()),
         ", ".join(f"{k} {v:.2f}" for k, v in accs.items())),
        ("mask IoU >= 0.4", (allf["mask_iou"] or 0) >= 0.4, _fmt(allf["mask_iou"])),
        ("mask peak inside the object >= 75%", (allf["mask_peak_inside"] or 0) >= 0.75, _fmt(allf["mask_peak_inside"])),
        ("CLIP AUROC (checker-correct vs wrong) >= 0.75", (allf.get("clip_auroc_correct_vs_wrong") or 0) >= 0.75,
         _fmt(allf.get("clip_auroc_correct_vs_wrong"))),
        ("CLIP AUROC within a prompt (correct vs wrong candidates of one prompt) >= 0.75 in every family",
         all((d.get("clip_auroc_within_prompt") or 0) >= 0.75 for k, d in fam.items() if k != "all"),
         ", ".join(f"{k} {_fmt(d.get('clip_auroc_within_prompt'))}" for k, d in fam.items() if k != "all")),
        ("CLIP picks the true caption among its perturbations >= 70%", (allf.get("clip_true_caption_wins") or 0) >= 0.7,
         _fmt(allf.get("clip_true_caption_wins")))]
    return lines, floors


def render(ev: dict, checker: dict, checker_noisy: dict | None, gen_log: Path, clip_log: Path,
           prior_unet_steps: int = 0, vae_steps: int | None = None, clip_steps: int | None = None,
           model_dir: Path | None = None, fusion: dict | None = None) -> str:
    """`model_dir`: the generator folder described (default: the shipped default model); `fusion`: the JSON of
    `python -m recipes.shapesworld.fusion_transfer --out`. `prior_unet_steps`, `vae_steps`, `clip_steps`:
    for a UNet generator, steps its log does not hold (a run continued from earlier weights)."""
    model_dir = Path(model_dir) if model_dir else ASSETS / "shapesworld"
    weights = shipped_weights_mb()
    clip = _last(clip_log, "clip")
    gen = mmdit_line(model_dir, gen_log) if (model_dir / "transformer").is_dir() else unet_line(
        gen_log, prior_unet_steps, vae_steps)
    lines = [
        "# ShapesWorld models: model card", "",
        "Trained from scratch by this project's scripts on its own rendered world (see README, ShapesWorld).",
        "Every number below was measured by the commands at the end; nothing is copied from elsewhere.", "",
        "## Models",
        f"- `{model_dir.name}/`: {gen}",
        f"- `shapesworld-clip/`: OpenCLIP custom model (ViT 4 layers width 128 on 8x8 patches, text 3 layers width "
        f"128, context 32), contrastive with hard-negative captions and rendered near misses, trained "
        f"{_clip_steps(clip_log) or clip_steps or '?'} steps of batch 64 over its runs"
        + (", the last with a within-prompt ranking loss on the generator's own checker-labelled samples of TRAIN "
           "prompts (sample_bank.py)" if clip.get("bank_rank_acc") is not None else "")
        + "; independent of the generator (no shared weights).",
        f"- All shipped weights (fp16 safetensors, {', '.join(d for d in SHIPPED_DIRS if (ASSETS / d).is_dir())}, "
        f"a linked folder counted once): {weights:.1f} MB (budget {WEIGHTS_BUDGET_MB} MB).",
    ]
    ev_lines, floors = eval_section(ev)
    lines += ev_lines
    if fusion is not None:
        f_lines, f_floors = fusion_section(fusion)
        lines += f_lines
        floors += f_floors
    floors += [
        (f"checker on {checker['images']} rendered images: accepts true captions >= 98%", checker["accept_true"] >= 0.98,
         f"{checker['accept_true']:.4f}"),
        ("checker accepts perturbed captions <= 2%", checker["accept_perturbed"] <= 0.02, f"{checker['accept_perturbed']:.4f}"),
        (f"shipped weights <= {WEIGHTS_BUDGET_MB} MB", weights <= WEIGHTS_BUDGET_MB, f"{weights:.1f} MB")]
    lines += ["", "## Floors", "", "| floor | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {name} | {val} | {_mark(ok)} |" for name, ok, val in floors]
    if checker_noisy:
        lines += ["", f"Checker on {checker_noisy['images']} blurred + noisy renders (robustness, not a floor): accepts "
                  f"{checker_noisy['accept_true']:.4f} of true and {checker_noisy['accept_perturbed']:.4f} of perturbed captions."]
    allf = ev["families"]["all"]
    lines += ["", "Mask IoU by object: first object of a caption "
              f"{_fmt(allf.get('mask_iou_first_object'))}, second {_fmt(allf.get('mask_iou_second_object'))}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "shapesworld"), help="the generator folder the card describes")
    ap.add_argument("--eval", required=True, help="JSON of `python -m dfusion_core eval --out`")
    ap.add_argument("--checker", required=True, help="JSON of validate_checker on clean renders")
    ap.add_argument("--checker-noisy", default=None, help="JSON of validate_checker --degrade noise")
    ap.add_argument("--fusion", default=None, help="JSON of fusion_transfer --out (the fusion floors)")
    ap.add_argument("--gen-log", default="runs/shapesworld/log.jsonl", help="the generator's training log")
    ap.add_argument("--clip-log", default="runs/shapesworld-clip/log.jsonl", help="the scorer's training log")
    ap.add_argument("--extra", default=None, help="a markdown file appended verbatim (limits, commands)")
    ap.add_argument("--out", default=str(ASSETS / "MODEL_CARD.md"), help="where the card is written")
    ap.add_argument("--prior-unet-steps", type=int, default=0,
                    help="UNet steps of the weights the logged run continued from (--init-from)")
    ap.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps, when the log has none")
    ap.add_argument("--clip-steps", type=int, default=None, help="scorer steps, when its log is not at hand")
    a = ap.parse_args(argv)
    read = lambda p: json.loads(Path(p).read_text()) if p else None
    text = render(read(a.eval), read(a.checker), read(a.checker_noisy), Path(a.gen_log), Path(a.clip_log),
                  a.prior_unet_steps, a.vae_steps, a.clip_steps, Path(a.model), read(a.fusion))
    if a.extra:
        text += "\n" + Path(a.extra).read_text()
    Path(a.out).write_text(text)
    print(a.out)


if __name__ == "__main__":
    main()
