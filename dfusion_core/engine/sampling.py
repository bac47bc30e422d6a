"""Seeded stochastic DDIM sampling that records trajectories, for many images in one batch.

Every image owns one CPU torch.Generator seeded with its seed; it draws the starting latent and then every
step's noise, in that order, so an image replays bit-identically from its seed whatever else shares its
batch, and a fusion target drawn from the base's seed gets the base's x_T and per-step noise.

The loop runs "streams" (one image each) that may start at different UNet calls: D-Fusion runs its
reference one step ahead of the target, so one batched call per step computes the reference's step s+1 and
the target's step s, and the target reads the reference's step-s keys/values recorded one call earlier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import ROLE_PLAIN, RowInfo
from ..data.trajectory import Trajectory
from .config import SamplingParams
from .inputs import MAX_PROMPT_CHARS, MAX_SEED, check_pair_seeds, check_seed, validate_prompt  # noqa: F401
from .steps import step_log_prob
from .families import Conditioning
from .loading import LoadedModel


@dataclass
class Stream:
    """One image being denoised: its seed, prompt row, role and the UNet call of its first step."""

    seed: int
    cond_row: int = 0  # row of the Conditioning it uses
    role: str = ROLE_PLAIN
    ref: int = -1
    base: int = -1
    offset: int = 0  # the UNet call at which this stream computes its first step
    initial_latent: torch.Tensor | None = None  # else drawn from the seed
    prefix: "Trajectory | None" = None  # known trajectory whose first `first_step` steps this stream shares
    first_step: int = 0  # steps taken from `prefix` instead of computed (its generator skips their noise)
    # also run the plain model at this stream's latent in the same call, and after on_call (which may move the
    # latent, e.g. a target held on its base outside the mask) record the log-prob of the latent as it stands
    # under that plain step: a held target's exact log-probs without a second denoising loop
    plain_shadow: bool = False
    # filled while running
    generator: torch.Generator | None = field(default=None, repr=False)
    latent: torch.Tensor | None = field(default=None, repr=False)
    latents: list = field(default_factory=list, repr=False)
    log_probs: list = field(default_factory=list, repr=False)
    x0s: list = field(default_factory=list, repr=False)

    def trajectory(self, timesteps) -> Trajectory:
        return Trajectory(self.seed, torch.stack(self.latents), _timestep_tensor(timesteps),
                          torch.stack(self.log_probs), torch.stack(self.x0s))


def _timestep_tensor(timesteps) -> torch.Tensor:
    """DDIM timesteps are integers (long), flow timesteps are sigma * 1000 (float)."""
    ints = all(isinstance(t, int) for t in timesteps)
    return torch.tensor(timesteps, dtype=torch.long if ints else torch.float32)


def guided_output(model: LoadedModel, cond: Conditioning, rows: list[int], x: torch.Tensor, t: torch.Tensor,
                  guidance_scale: float, cfg: bool, denoiser=None) -> torch.Tensor:
    """One denoiser call for a batch of latents with their prompt rows, classifier-free guided (float32).

    The one place a denoiser is called for sampling, log-prob recomputation, fusion and training: with CFG the
    batch is [unconditional rows, conditional rows], which the attention processors rely on. `denoiser`: the
    network to call instead of the model's own (the trainer's wrapped policy or its frozen reference).
    """
    emb = cond.cond[rows]
    added = {k: v[rows] for k, v in cond.added_cond.items()} if cond.added_cond else None
    x_in, t_in = x, t
    if cfg:
        emb = torch.cat([cond.uncond[rows], emb])
        if added:
            added = {k: torch.cat([cond.added_uncond[k][rows], added[k]]) for k in added}
        x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
    dev, dt = model.device, model.dtype
    added = {k: v.to(dt) for k, v in added.items()} if added else None
    net = model.denoiser if denoiser is None else denoiser
    out = model.family.forward(net, x_in.to(dt), t_in.to(dev), emb.to(dt), added).float()
    if not cfg:
        return out
    uncond_out, cond_out = out.chunk(2)
    return uncond_out + guidance_scale * (cond_out - uncond_out)


def denoise(model: LoadedModel, cond: Conditioning, streams: list[Stream], sampling: SamplingParams,
            schedule=None,
            on_call: Callable[[int, list[Stream], list[int]], None] | None = None,
            row_info: Callable[[Stream, int], RowInfo] | None = None) -> list[Trajectory]:
    """Run all streams to x_0; one UNet call per loop iteration covers every stream active at that call.

    on_call(call_index, active, steps) runs after each call: `active` are the streams that call advanced and
    `steps[i]` is the 0-based step `active[i]` just took (the fusion code uses it to drop K/V that are no
    longer needed). row_info maps (stream, step) to the controller's RowInfo; without it the D-Fusion
    processors stay inactive (plain sampling).
    """
    sampling.validate()
    fam = model.family
    schedule = schedule or fam.schedule(model.pipe.scheduler, sampling.num_steps)
    n = len(schedule.timesteps)
    c, h, w = model.latent_shape(sampling.height, sampling.width)
    dev = model.device
    for s in streams:
        check_seed(s.seed)
        s.generator = torch.Generator("cpu").manual_seed(s.seed)
        x_T = torch.randn((c, h, w), generator=s.generator)  # always drawn, so the noise sequence is fixed
        s.latent = (s.initial_latent if s.initial_latent is not None else x_T).float().to(dev)
        s.latents, s.log_probs, s.x0s = [s.latent.cpu()], [], []
        if s.first_step:
            k = s.first_step
            for _ in range(k):  # the shared steps' noise: drawn and dropped so later draws line up
                torch.randn((c, h, w), generator=s.generator)
            s.latent = s.prefix.latents[k].float().to(dev)
            s.latents = list(s.prefix.latents[:k + 1])
            s.log_probs, s.x0s = list(s.prefix.log_probs[:k]), list(s.prefix.x0_preds[:k])
    cfg = sampling.uses_cfg and cond.uncond is not None
    total = max(s.offset + n - s.first_step for s in streams)
    ctl = model.controller
    for call in range(total):
        active = [s for s in streams if s.offset <= call < s.offset + n - s.first_step]
        steps = [s.first_step + call - s.offset for s in active]
        if not active:
            continue
        shadows = [(s, k) for s, k in zip(active, steps) if s.plain_shadow]
        rows, row_steps = active + [s for s, _ in shadows], steps + [k for _, k in shadows]
        x = torch.stack([s.latent for s in rows])
        if row_info is not None:
            ctl.begin_call([row_info(s, k) for s, k in zip(active, steps)]
                           + [RowInfo(ROLE_PLAIN, k) for _, k in shadows], cfg)
        try:
            with torch.no_grad():
                out = guided_output(model, cond, [s.cond_row for s in rows], x,
                                    fam.model_timesteps(schedule, row_steps), sampling.guidance_scale, cfg)
        finally:
            ctl.end()
        n_act = len(active)
        noise = torch.stack([torch.randn((c, h, w), generator=s.generator) for s in active]).to(dev)
        res = fam.step(schedule, out[:n_act], x[:n_act], steps, sampling, noise)
        lp = step_log_prob(res.prev_sample, res.mean, res.std)
        for i, s in enumerate(active):
            s.latent = res.prev_sample[i]
            s.latents.append(s.latent.cpu())
            s.log_probs.append(lp[i].cpu())
            s.x0s.append(res.x0_pred[i].cpu())
        if on_call is not None:
            on_call(call, active, steps)
        if shadows:
            _shadow_log_probs(fam, schedule, sampling, out[n_act:], x[n_act:], shadows)
    return [s.trajectory(schedule.timesteps) for s in streams]


def _shadow_log_probs(fam, schedule, sampling: SamplingParams, out, x, shadows) -> None:
    """Each shadowed stream's last log-prob: of its latent as it now stands, under the plain model's step."""
    plain = fam.step(schedule, out, x, [k for _, k in shadows], sampling, torch.zeros_like(x))
    now = torch.stack([s.latents[-1] for s, _ in shadows]).to(x.device, x.dtype)
    lp = step_log_prob(now, plain.mean, plain.std)
    for j, (s, _) in enumerate(shadows):
        s.log_probs[-1] = lp[j].cpu()


@dataclass
class SampleResult:
    prompts: list[str]
    seeds: list[int]
    images: list  # PIL images
    trajectories: list[Trajectory]
    sampling: SamplingParams


def sample(model: LoadedModel, prompts: str | list[str], seeds: list[int], sampling: SamplingParams | None = None,
           batch_size: int = 16) -> SampleResult:
    """Sample one image per seed (a single prompt is repeated for every seed)."""
    sampling = (sampling or model.default_sampling()).validate()
    prompts = [prompts] * len(seeds) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    if not seeds:
        raise ValueError("no seeds given")
    for p in prompts:
        validate_prompt(p)
    h, w = _size(model, sampling)
    images, trajs = [], []
    for i in range(0, len(seeds), batch_size):
        chunk_p, chunk_s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        uniq = list(dict.fromkeys(chunk_p))
        cond = model.encode(uniq, sampling.negative_prompt, sampling.uses_cfg, h, w)
        streams = [Stream(seed=s, cond_row=uniq.index(p)) for p, s in zip(chunk_p, chunk_s)]
        tr = denoise(model, cond, streams, sampling)
        trajs += tr
        images += model.decode(torch.stack([t.final for t in tr]))
    return SampleResult(prompts, list(seeds), images, trajs, sampling)


def _size(model: LoadedModel, sampling: SamplingParams) -> tuple[int, int]:
    dh, dw = model.default_size()
    return sampling.height or dh, sampling.width or dw


@torch.no_grad()
def recompute_log_probs(model: LoadedModel, prompt: str, trajectory: Trajectory, sampling: SamplingParams,
                        batch_size: int = 32, denoiser=None) -> torch.Tensor:
    """Per-step log-probs of a recorded trajectory under the plain (unfused) model, in batched passes.

    A fused target was drawn by the fused sampler; trajectory methods train the plain model, so its
    likelihood ratios must use these values instead (docs/METHOD.md, training methods). `denoiser`: see guided_output.
    """
    sampling = sampling.validate()
    fam = model.family
    schedule = fam.schedule(model.pipe.scheduler, sampling.num_steps)
    n = len(schedule.timesteps)
    if trajectory.latents.shape[0] != n + 1:
        raise ValueError(f"trajectory has {trajectory.latents.shape[0] - 1} steps, sampling params say {n}")
    h, w = _size(model, sampling)
    cond = model.encode([prompt], sampling.negative_prompt, sampling.uses_cfg, h, w)
    dev = model.device
    out_lp = []
    for i in range(0, n, batch_size):
        ks = list(range(i, min(n, i + batch_size)))
        x = trajectory.latents[ks].to(dev).float()
        x_next = trajectory.latents[[k + 1 for k in ks]].to(dev).float()
        out = guided_output(model, cond, [0] * len(ks), x, fam.model_timesteps(schedule, ks),
                            sampling.guidance_scale, sampling.uses_cfg, denoiser)
        res = fam.step(schedule, out, x, ks, sampling, None)
        out_lp.append(step_log_prob(x_next, res.mean, res.std).cpu())
    return torch.cat(out_lp)


def sampler_stds(model: LoadedModel, sampling: SamplingParams) -> torch.Tensor:
    """Per-step std of the sampler's Gaussian transitions ([steps], on the CPU). It depends on the schedule and
    eta (and the flow sampler) only, not on the model's output, so one step on zeros gives every step's."""
    sampling = sampling.validate()
    fam = model.family
    schedule = fam.schedule(model.pipe.scheduler, sampling.num_steps)
    n = len(schedule.timesteps)
    zeros = torch.zeros(n, 1, 1, 1)
    res = fam.step(schedule, zeros, zeros, list(range(n)), sampling, None)
    return res.std.flatten(1)[:, 0].float().cpu()
