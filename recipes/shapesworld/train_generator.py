"""Train ShapesWorld's text-to-image model from scratch: autoencoder, then text encoder + UNet.

    python -m recipes.shapesworld.train_generator --out runs/shapesworld

Stages run in order and each resumes from its last checkpoint, so the command can be re-run after an
interruption and loses at most `--ckpt-every` steps:
  vae     AutoencoderKL, 64x64x3 -> 16x16x4 (f4), L1 + MSE + tiny KL
  encode  a fixed set of rendered scenes encoded once to latents (the UNet stage then costs UNet time only)
  unet    causal CLIPTextModel + UNet2DConditionModel, v-prediction on a cosine schedule, EMA
  export  a StableDiffusionPipeline folder (fp16 weights) at every UNet checkpoint: <out>/pipeline
Logs go to <out>/log.jsonl. The recipe follows the feasibility runs recorded for this project.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfusion_core.data.atomic import replace_folder, write_atomic
from dfusion_core.worlds.shapesworld.render import render
from dfusion_core.worlds.shapesworld.world import IMAGE_SIZE, V1, SceneStyle, prompts


@dataclass
class GeneratorConfig:
    seed: int = 0
    # autoencoder
    vae_steps: int = 1200  # AdamW steps of the autoencoder (flat shapes reconstruct early)
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # keeps the posterior a KL autoencoder without blurring
    # fixed latent dataset
    n_latents: int = 48000  # rendered scenes encoded once
    family_weights: tuple = (("simple", 0.1), ("action", 0.3), ("attribute", 0.3), ("spatial", 0.3))
    # text encoder + UNet
    unet_steps: int = 10000  # about 2.2 h at 2 CPU cores (~1.25 steps/s); the whole retrain stays near 3 h
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance works
    ema_decay: float = 0.995
    ckpt_every: int = 500
    threads: int = 2
    init_from: str = ""  # a pipeline folder (e.g. assets/shapesworld-unet) to continue from when the run has no checkpoint


def log(out: Path, **row) -> None:
    row["time"] = time.time()
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=IMAGE_SIZE,
    )


def build_text_encoder(vocab_size: int = 49408):
    """Causal CLIP text encoder; training uses a compact vocabulary (the grammar's few tokens), and
    export scatters it back into the full 49,408-row table so the stock CLIPTokenizer drives it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = min(49407, vocab_size - 1)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=128,
        bos_token_id=min(49406, vocab_size - 2), eos_token_id=eos, pad_token_id=eos,
    ))


def expand_vocab(compact, used_ids: torch.Tensor):
    """Full-vocabulary copy of a compact-vocabulary text encoder (unused rows keep their random init)."""
    full = build_text_encoder()
    sd = {k: v for k, v in compact.state_dict().items() if "token_embedding" not in k}
    full.load_state_dict(sd, strict=False)
    with torch.no_grad():
        full.get_input_embeddings().weight[used_ids] = compact.get_input_embeddings().weight
    return full


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=[2, 4, 4], use_linear_projection=True,
    )


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1)


def _family_sampler(cfg: GeneratorConfig):
    pools = {fam: prompts(fam, "train") for fam, _ in cfg.family_weights}
    fams = [f for f, _ in cfg.family_weights]
    weights = [w for _, w in cfg.family_weights]

    def sample(rng: random.Random):
        fam = rng.choices(fams, weights)[0]
        return rng.choice(pools[fam])

    return sample


def _images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _save(path: Path, **state) -> None:
    write_atomic(path, lambda p: torch.save(state, p))  # a kill mid-save never leaves a half-written checkpoint


def _init_pipeline(cfg: GeneratorConfig):
    if not cfg.init_from:
        return None
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(cfg.init_from, dtype=torch.float32)


def train_vae(cfg: GeneratorConfig, out: Path, style: SceneStyle = V1, start=None):
    """Train (or, from `start`, fine-tune) the autoencoder on scenes of `style`; resumable from out/vae.pt."""
    init = _init_pipeline(cfg)
    if init is not None and not (out / "vae.pt").exists():  # continue: keep the shipped autoencoder as it is
        vae = build_vae()
        vae.load_state_dict({k: v.float() for k, v in init.vae.state_dict().items()})
        _save(out / "vae.pt", model=vae.state_dict(), opt=None, step=cfg.vae_steps, rng=random.Random(cfg.seed).getstate())
        return vae.eval().requires_grad_(False)
    vae = build_vae()
    if start is not None:
        vae.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ckpt = out / "vae.pt"
    step, rng = 0, random.Random(cfg.seed)
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"]); step = st["step"]
        if st["opt"] is not None:
            opt.load_state_dict(st["opt"])
        rng.setstate(st["rng"])
    sample_prompt = _family_sampler(cfg)
    t0 = time.time()
    while step < cfg.vae_steps:
        x = _images_to_tensor([render(sample_prompt(rng), rng, style).image for _ in range(cfg.vae_batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(out, stage="vae", step=step, loss=loss.item(), rec=rec_loss.item(),
                img_s=50 * cfg.vae_batch / (time.time() - t0))
            t0 = time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
            _save(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step, rng=rng.getstate())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        r2 = random.Random(12345)
        x = _images_to_tensor([render(sample_prompt(r2), r2, style).image for _ in range(64)])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err = ((rec - x) * 127.5).abs()
        log(out, stage="vae-eval", mean_abs_err=err.mean().item(), frac_pixels_off_20=(err.max(1).values > 20).float().mean().item())
        from PIL import Image

        grid = torch.cat([x[:16], rec[:16]], 2).permute(2, 0, 3, 1).reshape(128, -1, 3)
        Image.fromarray(((grid + 1) * 127.5).round().byte().numpy()).save(out / "vae_recon.png")
    return vae


@torch.no_grad()
def encode_dataset(cfg: GeneratorConfig, out: Path, vae) -> tuple[torch.Tensor, list[str]]:
    """Render and encode n_latents scenes in chunks (each chunk a file, so the stage resumes)."""
    chunk, dest = min(4000, cfg.n_latents), out / "latents"
    dest.mkdir(exist_ok=True)
    sample_prompt = _family_sampler(cfg)
    for c in range(math.ceil(cfg.n_latents / chunk)):
        f = dest / f"{c:04d}.pt"
        if f.exists():
            continue
        rng = random.Random(f"{cfg.seed}:latents:{c}")
        specs = [sample_prompt(rng) for _ in range(chunk)]
        lat, caps = [], [p.text for p in specs]
        for i in range(0, chunk, 250):
            x = _images_to_tensor([render(p, rng).image for p in specs[i:i + 250]])
            lat.append(vae.encode(x).latent_dist.mean.half())
        _save(f, latents=torch.cat(lat), captions=caps)
        log(out, stage="encode", chunk=c)
    lats, caps = [], []
    for c in range(math.ceil(cfg.n_latents / chunk)):
        st = torch.load(dest / f"{c:04d}.pt")
        lats.append(st["latents"]); caps += st["captions"]
    return torch.cat(lats).float(), caps


def export_pipeline(out: Path, vae, text_encoder, unet, scaling_factor: float, dest: Path) -> None:
    """Write a StableDiffusionPipeline folder; fp16 weights keep the shipped size small."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from dfusion_core.engine.tokenizer_build import write_clip_tokenizer

    tok_dir = write_clip_tokenizer(out / "tokenizer")
    vae16 = copy.deepcopy(vae).half().requires_grad_(True)
    vae16.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=vae16, text_encoder=copy.deepcopy(text_encoder).half(), tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=copy.deepcopy(unet).half(), scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = dest.with_name(dest.name + ".tmp")
    pipe.save_pretrained(tmp)
    (tmp / "dfusion.json").write_text(json.dumps(DFUSION_DEFAULTS, indent=2))
    replace_folder(tmp, dest)


# Per-model defaults the engine reads from a pipeline folder (see dfusion_core.engine.config.model_defaults).
DFUSION_DEFAULTS = {
    "guidance_scale": 2.0,  # small models want low CFG (4 halves accuracy in the feasibility runs)
    "layer_factors": [1, 2],  # read masks from cross-attention at 16x16 and 8x8 (the latent is 16x16)
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    "world": "shapesworld",
}


def train_unet(cfg: GeneratorConfig, out: Path, vae, latents: torch.Tensor, captions: list[str]):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    from dfusion_core.engine.tokenizer_build import write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "tokenizer"))
    vocab = sorted(set(captions))
    ids = tok(vocab + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption_index = {c: i for i, c in enumerate(vocab)}
    cap_idx = torch.tensor([caption_index[c] for c in captions])
    empty = len(vocab)
    used_ids = torch.unique(ids)
    lut = torch.zeros(49408, dtype=torch.long)
    lut[used_ids] = torch.arange(len(used_ids))
    ids = lut[ids]  # compact ids; expand_vocab maps the embedding back at export
    init = _init_pipeline(cfg) if not (out / "unet.pt").exists() else None
    # continuing keeps the shipped latent scale; a fresh run sets it so latents have unit variance
    scaling = float(init.vae.config.scaling_factor) if init is not None else float(1.0 / latents.std())
    latents = latents * scaling

    torch.manual_seed(cfg.seed)
    text_encoder, unet = build_text_encoder(len(used_ids)), build_unet()
    if init is not None:  # continue from shipped (EMA) weights, fresh optimizer
        unet.load_state_dict({k: v.float() for k, v in init.unet.state_dict().items()})
        sd = {k: v.float() for k, v in init.text_encoder.state_dict().items()}
        emb_key = next(k for k in sd if k.endswith("token_embedding.weight"))
        sd[emb_key] = sd[emb_key][used_ids]
        text_encoder.load_state_dict(sd)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_decay)
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    ckpt, step = out / "unet.pt", 0
    g = torch.Generator().manual_seed(cfg.seed)
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"]); text_encoder.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        ema_unet.load_state_dict(st["ema_unet"]); ema_text.load_state_dict(st["ema_text"])
        step = st["step"]; g.set_state(st["gen"])
    t0, n = time.time(), latents.shape[0]
    while step < cfg.unet_steps:
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        x0 = latents[idx]
        cap = cap_idx[idx].clone()
        cap[torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        emb = text_encoder(ids[cap])[0]
        pred = unet(xt, t, emb).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()
        ema_unet.step(unet.parameters()); ema_text.step(text_encoder.parameters())
        step += 1
        if step % 50 == 0:
            log(out, stage="unet", step=step, loss=loss.item(), lr=sched.get_last_lr()[0],
                img_s=50 * cfg.unet_batch / (time.time() - t0))
            t0 = time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.unet_steps:
            _save(ckpt, unet=unet.state_dict(), text=text_encoder.state_dict(), opt=opt.state_dict(),
                  sched=sched.state_dict(), ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(),
                  step=step, gen=g.get_state())
            import copy

            eu, et = copy.deepcopy(unet), copy.deepcopy(text_encoder)
            ema_unet.copy_to(eu.parameters()); ema_text.copy_to(et.parameters())
            export_pipeline(out, vae, expand_vocab(et, used_ids), eu, scaling, out / "pipeline")
            log(out, stage="export", step=step)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/shapesworld", help="run folder (checkpoints, logs, pipeline)")
    for k, v in asdict(GeneratorConfig()).items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = ap.parse_args(argv)
    cfg = GeneratorConfig(**{k: getattr(a, k) for k in asdict(GeneratorConfig()) if hasattr(a, k)})
    torch.set_num_threads(cfg.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    vae = train_vae(cfg, out)
    latents, captions = encode_dataset(cfg, out, vae)
    train_unet(cfg, out, vae, latents, captions)


if __name__ == "__main__":
    main()
