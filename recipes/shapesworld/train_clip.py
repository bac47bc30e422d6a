"""Train ShapesWorld's CLIP scorer: a small OpenCLIP model (custom config) learned contrastively.

    python -m recipes.shapesworld.train_clip --out runs/shapesworld-clip [--vae runs/shapesworld/vae.pt]

Independent of the generator: its own text tower and tokenizer path (open_clip's), no shared weights.
Each image is contrasted with the batch's captions AND with perturbed versions of its own caption
(attribute swapped, relation flipped, object replaced), so the score reflects binding and relations, not
only which colours are present. Each caption is also contrasted with the batch's images AND with a render of a
near miss of itself (a perturbed caption, or one of its two objects alone): pairs are chosen among one prompt's
candidates, so what counts is that the true image outranks wrong images of the same prompt (within-prompt
ranking), not only that an image picks its caption. Images are clean renders, blurred/noisy renders, and - with --vae - the
generator's autoencoder round trip, so scores transfer to generated images. The evaluator sees captions of
every combination (train and test): it is the measuring instrument, not the model being aligned.
Writes an open_clip folder (open_clip_config.json + open_clip_model.safetensors) loaded by the scorer.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfusion_core.data.atomic import replace_folder, write_atomic
from dfusion_core.worlds.shapesworld.render import render
from .sample_bank import Bank
from .validate_checker import degrade_noise
from dfusion_core.worlds.shapesworld.world import FAMILIES, IMAGE_SIZE, ObjectSpec, PromptSpec, perturbations, prompts, scene_style

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}


def _log(out: Path, **row):
    row["time"] = time.time()
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _vae_roundtrip(vae_ckpt: str | None):
    """The generator's autoencoder round trip: a train_generator vae.pt, or a diffusers AutoencoderKL folder (a
    pipeline's vae/, e.g. assets/shapesworld/vae)."""
    if not vae_ckpt:
        return None
    if Path(vae_ckpt).is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_ckpt).float()
    else:
        from .train_generator import build_vae

        vae = build_vae()
        vae.load_state_dict(torch.load(vae_ckpt, weights_only=False)["model"])
    vae.eval().requires_grad_(False)

    @torch.no_grad()
    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1)

    return roundtrip


def export(model, out: Path) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG},
                                                          indent=2))
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "open_clip_model.safetensors"))
    replace_folder(tmp, out)


def near_miss(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    """A caption close to `spec` that an image of `spec` must not satisfy: one of its perturbations (attribute or
    texture swapped, relation flipped, object replaced) or, for two objects, one of them alone (a generator's
    commonest failure is a missing object)."""
    if len(spec.objects) == 2 and rng.random() < 0.25:
        kept = spec.objects[rng.randrange(2)]
        return PromptSpec("simple", (ObjectSpec(kept.colour, kept.shape),))
    return rng.choice(list(perturbations(spec, rng).values()))


def bank_ranking_loss(model, tok, bank, rng: random.Random, n_pairs: int) -> tuple[torch.Tensor, float]:
    """Bradley-Terry loss on `n_pairs` (correct, wrong) sample pairs of one prompt each, drawn from a bank of the
    generator's own checker-labelled samples (sample_bank.py): the scorer learns to rank a prompt's candidates as
    the checker does. Returns the loss and the share of pairs already ranked right."""
    ranked = bank.ranked_prompts()
    picks = [ranked[rng.randrange(len(ranked))] for _ in range(n_pairs)]
    idx = [(int(pos[rng.randrange(len(pos))]), int(neg[rng.randrange(len(neg))])) for _, pos, neg in picks]
    ims = np.stack([bank.images[i] for pair in idx for i in pair])
    x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 127.5 - 1
    img_f = F.normalize(model.encode_image(x), dim=-1).view(n_pairs, 2, -1)
    txt_f = F.normalize(model.encode_text(tok([p for p, _, _ in picks])), dim=-1)
    s = model.logit_scale.exp() * (img_f * txt_f[:, None]).sum(-1)  # [pairs, (correct, wrong)]
    margin = s[:, 0] - s[:, 1]
    return F.softplus(-margin).mean(), (margin > 0).float().mean().item()


def train(out: Path, steps: int, batch: int, lr: float, vae_ckpt: str | None, seed: int = 0, threads: int = 2,
          world_version: int = 1, init: str | None = None, bank: str | None = None, bank_pairs: int = 32,
          bank_weight: float = 1.0):
    """Scenes of `world_version` (2: backgrounds and lighting the captions never mention, so the scorer learns
    to look past them); `vae_ckpt` should be the autoencoder of the generator it will score; `bank` adds the
    within-prompt ranking loss on the generator's own labelled samples (`bank_pairs` pairs a step)."""
    import open_clip

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dir = out / "config"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{cfg_dir}", pretrained=None, load_weights=False)
    tok = open_clip.get_tokenizer(f"local-dir:{cfg_dir}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))
    ckpt, step = out / "clip.pt", 0
    rng = random.Random(seed)
    if init and not ckpt.exists():  # an exported scorer's weights as the start (a fresh optimizer and schedule)
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(Path(init) / "open_clip_model.safetensors")).items()})
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        step = st["step"]; rng.setstate(st["rng"])
    roundtrip = _vae_roundtrip(vae_ckpt)
    nrng = np.random.default_rng(seed)
    style = scene_style(world_version)
    pool = [p for f in FAMILIES for split in ("train", "test") for p in prompts(f, split)] + prompts("simple", "train")
    samples = Bank.load(bank) if bank else None
    t0 = time.time()
    while step < steps:
        specs = [rng.choice(pool) for _ in range(batch)]
        near = [near_miss(s, rng) for s in specs]  # one wrong image per caption, rendered like the true one
        imgs = []
        for s in specs + near:
            im = render(s, rng, style).image
            imgs.append(degrade_noise(im, nrng) if rng.random() < 0.4 else im)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if roundtrip is not None:
            k = len(imgs) // 3
            pick = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(step))[:k]
            x[pick] = roundtrip(x[pick])
        negs = [list(perturbations(s, rng).values()) for s in specs]
        texts = [s.text for s in specs] + [n.text for ns in negs for n in ns]
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(tok(texts)), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T  # [2B images, B + negative captions]
        labels = torch.arange(batch)
        # image -> text over the batch's captions and all hard negative captions; text -> image over the batch's
        # images and the near-miss images (a caption must outrank the wrong images of its own prompt)
        loss = (F.cross_entropy(logits[:batch], labels) + F.cross_entropy(logits[:, :batch].T, labels)) / 2
        rank_acc = None
        if samples is not None:
            rank_loss, rank_acc = bank_ranking_loss(model, tok, samples, rng, bank_pairs)
            loss = loss + bank_weight * rank_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        step += 1
        if step % 25 == 0:
            acc = (logits[:batch].argmax(1) == labels).float().mean().item()
            _log(out, stage="clip", step=step, loss=loss.item(), acc=acc, lr=sched.get_last_lr()[0],
                 img_s=25 * batch / (time.time() - t0), **({"bank_rank_acc": rank_acc} if rank_acc is not None else {}))
            t0 = time.time()
        if step % 250 == 0 or step == steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                     "rng": rng.getstate()}
            write_atomic(ckpt, lambda p: torch.save(state, p))
            export(model, out / "model")
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/shapesworld-clip", help="run folder; the model lands in OUT/model")
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps, total across resumes (1500)")
    ap.add_argument("--batch", type=int, default=64, help="images per step (64)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (1e-3)")
    ap.add_argument("--vae", default=None, help="generator's autoencoder (vae.pt or a diffusers vae/ folder) for "
                    "round-trip augmentation")
    ap.add_argument("--world-version", type=int, default=1, choices=(1, 2, 3),
                    help="ShapesWorld version of the training scenes (1; 2 or 3 for the SD3-shaped models)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    ap.add_argument("--init", default=None, help="an exported scorer folder (open_clip_model.safetensors) to start from, "
                    "e.g. assets/shapesworld-clip; ignored when OUT has a checkpoint")
    ap.add_argument("--bank", default=None, help="a bank of the generator's own checker-labelled samples "
                    "(sample_bank.py build) for a within-prompt ranking loss")
    ap.add_argument("--bank-pairs", type=int, default=32, help="(correct, wrong) pairs from the bank a step (32)")
    ap.add_argument("--bank-weight", type=float, default=1.0, help="weight of the ranking loss (1.0)")
    a = ap.parse_args(argv)
    train(Path(a.out), a.steps, a.batch, a.lr, a.vae, threads=a.threads, world_version=a.world_version, init=a.init,
          bank=a.bank, bank_pairs=a.bank_pairs, bank_weight=a.bank_weight)


if __name__ == "__main__":
    main()
