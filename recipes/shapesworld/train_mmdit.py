"""Train ShapesWorld's default model: an SD3-shaped pipeline (MMDiT + rectified flow) on world-v2 scenes.

    python -m recipes.shapesworld.train_mmdit --out runs/sw2-mmdit --minutes 45 [--resume] [--export]

Only the transformer is trained. The autoencoder and the text encoder come from the shipped ShapesWorld UNet
model (assets/shapesworld-unet, `--base`), frozen: the VAE gets `shift_factor` 0.0 (SD3 pipelines read it) and keeps its
`scaling_factor`; the text encoder is loaded as `CLIPTextModelWithProjection` with an identity projection
(its pooled vector is the encoder's own) and serves as both `text_encoder` and `text_encoder_2`; no T5.
Captions are encoded once with `pipe.encode_prompt(..., max_sequence_length=0)`, exactly as the engine
encodes them for sampling (`LoadedModel.encode`, kind "sd3"), and scenes are encoded once to latents.

Objective (SD3): x_s = (1 - s) x0 + s noise, the transformer predicts the velocity noise - x0 at timestep
1000 s, s ~ logit-normal(0, 1); 10% empty captions for classifier-free guidance; AdamW; EMA weights are
exported. Stages and files under --out:
  latents/   rendered v2 scenes encoded by the frozen VAE, one file per chunk (resumes chunk by chunk)
  state.pt   the training state (weights, optimizer, EMA, RNG, step, training seconds), written atomically
             every --ckpt-minutes and at the end; --resume continues from it exactly
  pipeline/  the StableDiffusion3Pipeline folder (EMA weights, fp16) with dfusion.json, at every checkpoint
  log.jsonl  one JSON row per log line (also printed)
--minutes is the total training time across resumes (encoding not counted); --max-steps stops earlier.

Scheduler shift: 1.0. The latent is 16x16, so with patch 2 the transformer sees an 8x8 grid of 64 image
tokens. SD3's resolution rule shifts by sqrt(tokens / 256) against its 256-token base (shift 1 at 256 px,
3 at 1024 px); here that gives <= 1, i.e. no shift toward high noise, and flat shapes on smooth backgrounds
are far more redundant per token than photographs. Shift 1 also matches training (logit-normal centred at
s = 0.5). It only changes the sampling sigmas; it is stored in the scheduler config and can be overridden.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from dfusion_core.engine import offline  # noqa: F401  (no network before any HF import)
from dfusion_core.data.atomic import replace_folder, write_atomic, write_text_atomic
from dfusion_core.engine.flow import flow_noised
from dfusion_core.engine.schema import setting
from dfusion_core.engine.loading import ASSETS
from dfusion_core.worlds.shapesworld.render import render
from .train_generator import _family_sampler, _images_to_tensor, log
from dfusion_core.worlds.shapesworld.world import IMAGE_SIZE, scene_style

SHIPPED = ASSETS / "shapesworld-unet"  # the UNet model: the VAE (fine-tuned first), text encoder and tokenizer
LATENT = IMAGE_SIZE // 4  # the shipped VAE is f4: 64x64 images -> 16x16x4 latents


@dataclass
class MMDiTConfig:
    seed: int = 0
    world_version: int = setting(2, "scenes of this world version (2: backgrounds, tint, jitter; 3: v2 with smaller "
                                    "objects)")
    n_scenes: int = setting(16000, "rendered scenes encoded once (the prototype used 12,000 v1 scenes)")
    family_weights: tuple = (("simple", 0.1), ("action", 0.3), ("attribute", 0.3), ("spatial", 0.3))
    patch: int = setting(2, "transformer patch size over the 16x16 latent (2: an 8x8 token grid)")
    layers: int = setting(6, "joint transformer blocks")
    heads: int = setting(4, "attention heads")
    head_dim: int = setting(32, "width per head (inner width = heads * head_dim)")
    batch: int = 32
    lr: float = setting(1e-3, "AdamW")
    weight_decay: float = 1e-2
    warmup: int = setting(200, "linear learning-rate warmup, steps")
    caption_dropout: float = setting(0.1, "empty caption, so classifier-free guidance works")
    logit_mean: float = setting(0.0, "s = sigmoid(N(logit_mean, logit_std))")
    logit_std: float = 1.0
    ema_decay: float = 0.995
    bf16: bool = setting(True, "bf16 autocast for the transformer's forward/backward (weights and AdamW stay fp32)")
    minutes: float = setting(45.0, "total training minutes across resumes")
    max_steps: int = setting(0, "stop after this many steps (0 = only the time budget)")
    ckpt_minutes: float = setting(3.0, "checkpoint + export interval")
    log_every: int = setting(50, "steps")
    shift: float = setting(1.0, "the sampling scheduler's shift (see the module doc)")
    guidance_scale: float = setting(3.0, "the exported dfusion.json's CFG (the prototype sampled at 3)")
    threads: int = 1
    # the shipped autoencoder was trained on v1's flat grey: it paints every v2 background grey and shifts
    # object colours (mean error 23 grey levels on v2 scenes), so it is fine-tuned on the world version first
    vae_steps: int = setting(1500, "AdamW steps of that fine-tuning (0 = keep the shipped autoencoder)")
    vae_lr: float = 3e-4
    base: str = setting(str(SHIPPED), "pipeline folder whose autoencoder and text encoder (frozen) the model builds on")
    # an earlier SD3-shaped model folder to start from (assets/shapesworld-v2 for a new v3 model, assets/shapesworld
    # to continue the default): its transformer's blocks are copied (patch embedding and output layer converted to
    # this patch size) and its autoencoder, already tuned to v2-style scenes, is used frozen instead of tuning
    # --base's (a folder with transformer/ only takes assets/shapesworld's autoencoder; '' = train from scratch)
    init: str = ""


def _log(out: Path, **row) -> None:
    log(out, **row)


# ---------------------------------------------------------------- components
def load_frozen(shipped: Path = SHIPPED):
    """(vae, text encoder with identity projection, tokenizer), fp32, frozen, from the shipped model."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(shipped / "vae").float().eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    base = CLIPTextModel.from_pretrained(shipped / "text_encoder").float()
    c = base.config
    if c.projection_dim != c.hidden_size:
        raise ValueError(f"identity projection needs projection_dim == hidden_size, got {c.projection_dim}, {c.hidden_size}")
    c.architectures = ["CLIPTextModelWithProjection"]
    te = CLIPTextModelWithProjection(c)
    te.text_model.load_state_dict(base.state_dict())  # transformers 5: CLIPTextModel is the bare text model
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(c.hidden_size))
    tok = CLIPTokenizer.from_pretrained(shipped / "tokenizer")
    return vae, te.float().eval().requires_grad_(False), tok


def build_transformer(cfg: MMDiTConfig, text_hidden: int, text_proj: int):
    """The MMDiT; the SD3 pipeline concatenates both CLIP encoders' features, so the text widths double."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT, patch_size=cfg.patch, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=2 * text_hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * text_proj,
        pos_embed_max_size=LATENT // cfg.patch)


def convert_patch(state: dict, old_patch: int, new_patch: int, channels: int = 4) -> dict:
    """A transformer state dict re-cut to another patch size, so an earlier model's blocks can start a new one.

    The patch embedding (a conv of kernel = stride = patch) is summed over (old) / spread over (new) kernel cells so a
    uniform region gives the same token as before; the output layer (p*p*C values per token, laid out (p, p, C)) is
    averaged over the old sub-pixels and repeated over the new ones. Positional tables are rebuilt by the model."""
    out = {k: v for k, v in state.items() if not k.startswith("pos_embed.pos_embed")}
    w = state["pos_embed.proj.weight"]  # [D, C, p, p]
    summed = w.sum(dim=(2, 3), keepdim=True)
    out["pos_embed.proj.weight"] = summed.expand(-1, -1, new_patch, new_patch) / new_patch ** 2
    for name in ("proj_out.weight", "proj_out.bias"):
        t = state[name]
        per_cell = t.reshape(old_patch * old_patch, channels, *t.shape[1:]).mean(0)
        out[name] = per_cell.repeat(new_patch * new_patch, *([1] * (t.dim() - 1)))
    return out


def init_from(transformer, folder: Path, patch: int) -> None:
    """Load an earlier SD3-shaped model's transformer weights into `transformer` (patch size converted)."""
    from diffusers import SD3Transformer2DModel

    old = SD3Transformer2DModel.from_pretrained(folder / "transformer").float()
    state = convert_patch(old.state_dict(), old.config.patch_size, patch, old.config.out_channels)
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    bad = [k for k in missing + unexpected if not k.startswith("pos_embed.pos_embed")]
    if bad:
        raise ValueError(f"{folder} does not match this transformer's shape: {bad[:5]}")


def build_pipeline(cfg: MMDiTConfig, transformer, vae, text_encoder, tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder,
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


# ---------------------------------------------------------------- data, encoded once
@torch.no_grad()
def encode_scenes(cfg: MMDiTConfig, out: Path, vae) -> tuple[torch.Tensor, list[str]]:
    """Render and encode n_scenes v2 scenes in chunks (a file each, so the stage resumes); returns the
    scaled latents ((z - shift) * scaling, what the pipeline denoises) and their captions."""
    chunk, dest = min(4000, cfg.n_scenes), out / "latents"
    dest.mkdir(parents=True, exist_ok=True)
    sample_prompt, style = _family_sampler(cfg), scene_style(cfg.world_version)
    n_chunks = math.ceil(cfg.n_scenes / chunk)
    for c in range(n_chunks):
        f = dest / f"v{cfg.world_version}-{chunk}-{c:04d}.pt"
        if f.exists():
            continue
        t0, rng = time.time(), random.Random(f"{cfg.seed}:mmdit-latents:v{cfg.world_version}:{c}")
        specs = [sample_prompt(rng) for _ in range(chunk)]
        lat = []
        for i in range(0, chunk, 250):
            x = _images_to_tensor([render(p, rng, style=style).image for p in specs[i:i + 250]])
            lat.append(vae.encode(x).latent_dist.mean)
        write_atomic(f, lambda p: torch.save({"latents": torch.cat(lat), "captions": [p_.text for p_ in specs]}, p))
        _log(out, stage="encode", chunk=c, of=n_chunks, img_s=round(chunk / (time.time() - t0), 1))
    lats, caps = [], []
    for c in range(n_chunks):
        st = torch.load(dest / f"v{cfg.world_version}-{chunk}-{c:04d}.pt")
        lats.append(st["latents"]); caps += st["captions"]
    vc = vae.config
    z = (torch.cat(lats)[: cfg.n_scenes] - (vc.shift_factor or 0.0)) * vc.scaling_factor
    return z.float(), caps[: cfg.n_scenes]


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [U, 77, D], pooled [U, P]) for unique captions, as LoadedModel.encode computes them."""
    pe, pooled = [], []
    for i in range(0, len(captions), 64):
        e, _, p, _ = pipe.encode_prompt(captions[i:i + 64], None, None, device=torch.device("cpu"),
                                        num_images_per_prompt=1, do_classifier_free_guidance=False,
                                        max_sequence_length=0)
        pe.append(e.float()); pooled.append(p.float())
    return torch.cat(pe), torch.cat(pooled)


# ---------------------------------------------------------------- training
class Trainer:
    """The transformer, its optimizer, EMA and RNG: everything --resume restores."""

    def __init__(self, cfg: MMDiTConfig, transformer):
        from diffusers.training_utils import EMAModel

        self.cfg, self.model = cfg, transformer.train()
        self.opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
        self.ema = EMAModel(transformer.parameters(), decay=cfg.ema_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.seconds = 0, 0.0

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "ema": self.ema.state_dict(), "gen": self.gen.get_state(), "step": self.step,
                "seconds": self.seconds, "config": asdict(self.cfg)}

    def load(self, st: dict) -> None:
        self.model.load_state_dict(st["model"]); self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"]); self.ema.load_state_dict(st["ema"])
        self.gen.set_state(st["gen"]); self.step, self.seconds = st["step"], st["seconds"]

    def train_step(self, latents, cap_idx, embeds, pooled, empty: int) -> float:
        cfg, g = self.cfg, self.gen
        idx = torch.randint(0, latents.shape[0], (cfg.batch,), generator=g)
        cap = cap_idx[idx].clone()
        cap[torch.rand(cfg.batch, generator=g) < cfg.caption_dropout] = empty
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g) * cfg.logit_std + cfg.logit_mean)
        xt, target = flow_noised(x0, noise, s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = self.model(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=embeds[cap],
                              pooled_projections=pooled[cap]).sample
        loss = F.mse_loss(pred.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step(); self.sched.step(); self.ema.step(self.model.parameters())
        self.step += 1
        return loss.item()

    def ema_model(self):
        m = copy.deepcopy(self.model).eval()
        self.ema.copy_to(m.parameters())
        return m


def export_pipeline(cfg: MMDiTConfig, transformer, vae, text_encoder, tokenizer, dest: Path) -> None:
    """Write the StableDiffusion3Pipeline folder (fp16 weights, no T5) with its dfusion.json, swapped in whole."""
    te16 = copy.deepcopy(text_encoder).half()
    pipe = build_pipeline(cfg, copy.deepcopy(transformer).half(), copy.deepcopy(vae).half(), te16, tokenizer)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    index = json.loads((tmp / "model_index.json").read_text())
    index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})  # SD3 folders name absent T5
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "dfusion.json").write_text(json.dumps(dfusion_defaults(cfg), indent=2))
    link_twin_folders(tmp)
    replace_folder(tmp, dest)


TWINS = (("text_encoder_2", "text_encoder"), ("tokenizer_2", "tokenizer"))  # the same encoder serves both slots


def link_twin_folders(folder: Path) -> None:
    """Replace each second-slot folder whose files equal the first slot's by a relative link to it: the text
    encoder is stored once (14 MB) and stock diffusers still loads the folder."""
    import filecmp

    for twin, first in TWINS:
        a, b = folder / twin, folder / first
        if a.is_symlink() or not (a.is_dir() and b.is_dir()):
            continue
        names = sorted(p.name for p in a.iterdir())
        same = names == sorted(p.name for p in b.iterdir()) and all(
            filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())
        if same:
            shutil.rmtree(a)
            a.symlink_to(first, target_is_directory=True)


# The fusion form the engine uses on this model unless told otherwise, chosen from the fusion-transfer table
# (python -m recipes.shapesworld.fusion_transfer; assets/MODEL_CARD.md): the mask covers the base's keyword
# objects as well as the reference's, grown two cells; every joint block is fused from the first step; the latents
# outside the mask are held on the base's trajectory, so the base's background is what the target keeps.
FUSION_DEFAULTS = {"union_base": True, "dilate": 2, "start_step": 1, "layers": "all", "hold_outside": True}
# On a 16x16 token grid (patch 1, world v3) one cell of growth: at step 3139 it is accepted as often as two cells
# (0.51 of 63 ground-truth pairs) with the mask over 38% of the image instead of 55% (docs/shapesworld-v3.md).
DILATE_BY_PATCH = {1: 1, 2: 2}


def dfusion_defaults(cfg: MMDiTConfig) -> dict:
    """Per-model defaults the engine reads from the folder (dfusion_core.engine.config.model_defaults)."""
    return {"guidance_scale": cfg.guidance_scale, "eta": 0.7, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
            "world": "shapesworld", "world_version": cfg.world_version,
            "max_sequence_length": 0,  # trained on CLIP's 77 tokens alone (encode_captions), no zero T5 rows
            **FUSION_DEFAULTS, "dilate": DILATE_BY_PATCH.get(cfg.patch, FUSION_DEFAULTS["dilate"])}


def _checkpoint(out: Path, tr: Trainer, parts, loss: float | None) -> None:
    write_atomic(out / "state.pt", lambda p: torch.save(tr.state(), p))
    export_pipeline(tr.cfg, tr.ema_model(), *parts, out / "pipeline")
    _log(out, stage="checkpoint", step=tr.step, minutes=round(tr.seconds / 60, 2), loss=loss)


def train(cfg: MMDiTConfig, out: Path, resume: bool = False, export_only: bool = False) -> Trainer:
    """Encode the data (once), then train until the time or step budget is spent; checkpoint and export."""
    torch.manual_seed(cfg.seed)
    vae, te, tok = load_frozen(Path(cfg.base))
    transformer = build_transformer(cfg, te.config.hidden_size, te.config.projection_dim)
    if cfg.init:
        from diffusers import AutoencoderKL

        init_from(transformer, Path(cfg.init), cfg.patch)
        vae_dir = Path(cfg.init) / "vae" if (Path(cfg.init) / "vae").is_dir() else ASSETS / "shapesworld" / "vae"
        vae = AutoencoderKL.from_pretrained(vae_dir).float().eval().requires_grad_(False)
    else:
        vae = tune_vae(cfg, out, vae)
    tr = Trainer(cfg, transformer)
    ckpt = out / "state.pt"
    if ckpt.exists() and not (resume or export_only):
        raise SystemExit(f"error: {ckpt} exists; pass --resume to continue it or choose another --out")
    if ckpt.exists():
        tr.load(torch.load(ckpt, weights_only=False))
        _log(out, stage="resume", step=tr.step, minutes=round(tr.seconds / 60, 2))
    parts = (vae, te, tok)
    if export_only:
        export_pipeline(cfg, tr.ema_model(), *parts, out / "pipeline")
        _log(out, stage="export", step=tr.step)
        return tr
    latents, captions = encode_scenes(cfg, out, vae)
    vocab = sorted(set(captions)) + [""]
    embeds, pooled = encode_captions(build_pipeline(cfg, tr.model, vae, te, tok), vocab)
    lookup = {c: i for i, c in enumerate(vocab)}
    cap_idx = torch.tensor([lookup[c] for c in captions])
    _run_loop(out, tr, parts, latents, cap_idx, embeds, pooled, len(vocab) - 1)
    return tr


def tune_vae(cfg: MMDiTConfig, out: Path, shipped):
    """The shipped autoencoder fine-tuned on scenes of cfg.world_version (resumable: out/vae.pt), frozen after."""
    if cfg.vae_steps <= 0:
        return shipped
    from .train_generator import GeneratorConfig, train_vae

    gcfg = GeneratorConfig(seed=cfg.seed, vae_steps=cfg.vae_steps, vae_lr=cfg.vae_lr, ckpt_every=250,
                           family_weights=cfg.family_weights, threads=cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    vae = train_vae(gcfg, out, scene_style(cfg.world_version), start=shipped)
    vae.register_to_config(shift_factor=0.0, scaling_factor=shipped.config.scaling_factor)
    return vae.float().eval().requires_grad_(False)


def _done(tr: Trainer) -> bool:
    cfg = tr.cfg
    return tr.seconds >= cfg.minutes * 60 or (cfg.max_steps > 0 and tr.step >= cfg.max_steps)


def _run_loop(out, tr: Trainer, parts, latents, cap_idx, embeds, pooled, empty: int) -> None:
    cfg, losses, loss = tr.cfg, [], None
    last_ckpt, t_log, n_log = tr.seconds, time.time(), 0
    _log(out, stage="train", scenes=latents.shape[0], captions=empty, params=sum(p.numel() for p in tr.model.parameters()),
         bf16=cfg.bf16, threads=torch.get_num_threads())
    while not _done(tr):
        t0 = time.time()
        loss = tr.train_step(latents, cap_idx, embeds, pooled, empty)
        tr.seconds += time.time() - t0
        losses.append(loss); n_log += 1
        if tr.step % cfg.log_every == 0:
            _log(out, stage="train", step=tr.step, loss=round(sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]), 5),
                 lr=tr.sched.get_last_lr()[0], img_s=round(n_log * cfg.batch / (time.time() - t_log), 1),
                 minutes=round(tr.seconds / 60, 2))
            t_log, n_log = time.time(), 0
        if tr.seconds - last_ckpt >= cfg.ckpt_minutes * 60:
            _checkpoint(out, tr, parts, loss)
            last_ckpt = tr.seconds
    _checkpoint(out, tr, parts, loss)
    _log(out, stage="done", step=tr.step, minutes=round(tr.seconds / 60, 2), last_loss=loss)


# ---------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    from dfusion_core.engine.schema import help_of as field_comments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sw2-mmdit", help="run folder (latents, state.pt, pipeline/, log.jsonl)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    ap.add_argument("--export", action="store_true", help="only write <out>/pipeline from <out>/state.pt (or fresh weights)")
    helps = field_comments(MMDiTConfig)
    for f in fields(MMDiTConfig):
        v = f.default
        if isinstance(v, bool):
            ap.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=v,
                            help=helps.get(f.name))
        elif isinstance(v, (int, float, str)):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(v), default=v, help=helps.get(f.name))
    return ap


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    cfg = MMDiTConfig(**{f.name: getattr(a, f.name) for f in fields(MMDiTConfig) if hasattr(a, f.name)})
    torch.set_num_threads(cfg.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2))
    _log(out, stage="start", argv=sys.argv[1:] if argv is None else argv)
    train(cfg, out, resume=a.resume, export_only=a.export)


if __name__ == "__main__":
    main()
