"""A harness check beside the calibration's positive controls: SFT on the world's own renders of the TRAIN prompts
(or on the model's own checker-correct samples drawn at another CFG).

`--part calibrate` trains SFT on the model's checker-correct samples (drawn at CFG 3) and DPO on oracle pairs; on
the v3 model both left validation accuracy where it was or lowered it. Renders are correct by construction and
are what the model was pre-trained on, so this arm asks whether the harness itself (the trainer's sft loss on a
LoRA, early stopping, the validation read-out) can show a fine-tune raising accuracy. If it can, the controls'
failure lies in the samples they learn from (e.g. CFG compounding), not in the machinery.

    python -m experiments.shapesworld.render_sft --model runs/v3m/pipeline --out runs/render-sft --lr 3e-4 --steps 200
    python -m experiments.shapesworld.render_sft ... --source samples --guidance 1   # unguided own samples

The same TRAIN / validation prompts, checkpoint cadence and validation seeds as the calibrate part (ExperimentConfig);
writes OUT/result.json (validation accuracy at each checkpoint, per family) and the trainer's run folder.
`--probe --adapters DIR...` instead measures the pre-training loss on fresh renders under each LoRA (does a
fine-tune pull the model away from the world it draws?).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .experiment import Experiment, ExperimentConfig


def render_latents(model, prompts: list[str], per_prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """{prompt: [per_prompt, C, h, w]} the model's latents of fresh renders of each prompt (its VAE, scaled and
    shifted as the pipeline denoises them)."""
    from dfusion_core.worlds.shapesworld.render import render
    from dfusion_core.worlds.shapesworld.world import parse_prompt, scene_style

    style = scene_style(int(model.defaults.get("world_version", 2)))
    vae = model.pipe.vae
    cfg = vae.config
    out = {}
    for i, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)
        if spec is None:
            raise ValueError(f"not a ShapesWorld prompt: {prompt}")
        rng = random.Random(seed * 100_003 + i)
        images = np.stack([render(spec, rng, style=style).image for _ in range(per_prompt)])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with torch.no_grad():
            z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
        out[prompt] = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    return out


def sample_latents(model, prompts: list[str], per_prompt: int, seed: int, sampling) -> dict[str, torch.Tensor]:
    """{prompt: [k, C, h, w]} the final latents of the model's own checker-correct samples of each prompt
    (per_prompt drawn with `sampling`; a prompt with none correct is left out)."""
    from dfusion_core.engine.sampling import sample
    from dfusion_core.worlds.shapesworld import check_images

    out = {}
    for i, prompt in enumerate(prompts):
        res = sample(model, prompt, [seed * 100_003 + i * per_prompt + k for k in range(per_prompt)], sampling)
        keep = [tr.latents[-1] for tr, ok in zip(res.trajectories, check_images(res.images, prompt)) if ok]
        if keep:
            out[prompt] = torch.stack(keep)
    return out


def render_pairs(model, latents: dict[str, torch.Tensor], sampling):
    """One training pair per render: the render as the winner (SFT reads the winner's final latent alone)."""
    from dfusion_core.data.trajectory import Trajectory
    from dfusion_core.training.data import PreferencePair

    pairs = []
    for prompt, zs in latents.items():
        for k, z in enumerate(zs):
            tr = Trajectory(k, z[None], torch.zeros(0, dtype=torch.long), torch.zeros(0), z[None][:0])
            pairs.append(PreferencePair(prompt, tr, tr, None, None, sampling.num_steps, sampling.eta,
                                        sampling.guidance_scale, sampling.negative_prompt,
                                        flow_sampler=sampling.flow_sampler))
    return pairs


@torch.no_grad()
def render_loss(model, latents: dict[str, torch.Tensor], sampling, draws: int = 8, seed: int = 0) -> dict:
    """The velocity error (the pre-training loss) of the model's current weights on renders: per render `draws`
    fixed (timestep, noise) pairs, the same for every set of weights, so adapters compare on identical inputs.
    {"all": mean, "low" / "high": over sigma < 0.5 / >= 0.5}."""
    from dfusion_core.engine.sampling import guided_output

    family = model.family
    schedule = family.schedule(model.pipe.scheduler, sampling.num_steps)
    g = torch.Generator().manual_seed(seed)
    h, w = model.default_size()
    errors, sigmas = [], []
    for prompt, zs in latents.items():
        cond = model.encode([prompt] * len(zs), sampling.negative_prompt, False, h, w)
        for _ in range(draws):
            idx = torch.randint(0, schedule.num_train_timesteps, (len(zs),), generator=g)
            noise = torch.randn(zs.shape, generator=g)
            x_t, target, t_in = family.train_noised(schedule, zs.to(model.device), noise.to(model.device), idx)
            out = guided_output(model, cond, list(range(len(zs))), x_t, t_in, 1.0, False)
            errors.append(((out.float() - target) ** 2).mean(dim=(1, 2, 3)).cpu())
            sigmas.append(t_in.float().cpu() / schedule.num_train_timesteps)
    e, sg = torch.cat(errors), torch.cat(sigmas)
    return {"all": float(e.mean()), "low": float(e[sg < 0.5].mean()), "high": float(e[sg >= 0.5].mean())}


def checkpoint_lora(model, state_path: Path, dest: Path) -> Path:
    """A trainer checkpoint's adapter (OUT/checkpoints/step-N/state.pt) as a LoRA folder load_lora reads, written
    as Trainer.export writes one (the run's top-level adapter is its best checkpoint's, which may be step 0)."""
    from dfusion_core.training.config import TrainConfig
    from dfusion_core.training.trainer import adapter_metadata, lora_config

    st = torch.load(state_path, weights_only=False)
    c = st["config"]
    cfg = TrainConfig(lora_rank=c["lora_rank"], lora_alpha=c["lora_alpha"], lora_targets=c["lora_targets"])
    layers = model.family.lora_export(st["trainable"])
    meta = adapter_metadata(lora_config(cfg, model.family).to_dict(), layers)
    type(model.pipe).save_lora_weights(dest, **layers, **meta, safe_serialization=True)
    return dest


def loss_probe(a) -> None:
    """--probe: render_loss of the plain model and of each --adapters folder, on fresh renders (seed 1, never
    trained on) of the TRAIN and of the validation prompts."""
    from dfusion_core.engine.loading import load_model

    model = load_model(a.model, device="cpu")
    exp = Experiment(model, None, ExperimentConfig(), a.out)
    val = [p.text for f in exp.prompt_lists["validation"].values() for p in f]
    sets = {"train": render_latents(model, exp.train_prompts, 4, 1), "validation": render_latents(model, val, 4, 1)}
    rows = {}
    for name, folder in [("base", None)] + [(str(f), f) for f in a.adapters]:
        model.use_lora(None)
        if folder is not None and str(folder).endswith(".pt"):
            folder = checkpoint_lora(model, Path(folder), Path(a.out) / "adapters" / str(len(rows)))
        if folder is not None:
            model.load_lora(folder, "probe")  # and computes with it
        rows[name] = {k: render_loss(model, lat, exp.sampling) for k, lat in sets.items()}
        if folder is not None:
            model.use_lora(None)
            model.unload_lora("probe")
        print(name, json.dumps(rows[name]), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "render_loss.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the ShapesWorld pipeline folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--renders", type=int, default=8, help="renders (or samples) per TRAIN prompt")
    ap.add_argument("--source", choices=("renders", "samples"), default="renders", help="what SFT fits: the world's "
                    "renders, or the model's own checker-correct samples drawn at --guidance")
    ap.add_argument("--guidance", type=float, default=None, help="--source samples: their CFG (default: the model's)")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--val-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="only the velocity error on fresh renders of the base and "
                    "of each --adapters LoRA folder (OUT/render_loss.json); trains nothing")
    ap.add_argument("--adapters", nargs="*", default=[], help="LoRA folders or trainer checkpoints (state.pt) for --probe")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.probe:
        return loss_probe(a)
    from dfusion_core.engine.loading import load_model
    from dfusion_core.training.trainer import TrainConfig, Trainer

    model = load_model(a.model, device="cpu")
    c = ExperimentConfig(val_every=a.val_every, val_seeds=a.val_seeds)
    out = Path(a.out)
    exp = Experiment(model, None, c, out)
    t0 = time.time()
    if a.source == "renders":
        latents = render_latents(model, exp.train_prompts, a.renders, c.pair_seed)
    else:
        drawn = replace(exp.sampling, guidance_scale=a.guidance) if a.guidance is not None else exp.sampling
        latents = sample_latents(model, exp.train_prompts, a.renders, c.pair_seed, drawn)
    pairs = render_pairs(model, latents, exp.sampling)
    tc = TrainConfig(algo="sft", steps=a.steps, batch_size=c.dpo_batch, lr=a.lr, lora_rank=c.dpo_rank, seed=0,
                     ckpt_every=a.val_every, patience=10 ** 6, val_fraction=0.0)
    tr = Trainer(model, pairs, tc, out / "train")
    try:
        tr.run(resume=True, progress=False, validate=exp.validation_accuracy)
    finally:
        tr.unload()
    result = {"source": a.source, "guidance": a.guidance, "lr": a.lr, "steps": tr.step, "examples": len(pairs),
              "prompts": len(latents), "per_prompt": a.renders,
              "validations": tr.validations, "seconds": round(time.time() - t0)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    for v in tr.validations:
        print(f"step {v['step']}: validation {v['score']:.3f} " +
              " ".join(f"{k[4:]} {x:.3f}" for k, x in v.items() if k.startswith("val_")))


if __name__ == "__main__":
    main()
