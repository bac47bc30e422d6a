"""Fine-tune the denoiser on preference pairs: Diffusion-DPO, trajectory DPO, DDPO or DPOK (docs/METHOD.md).

    python -m dfusion_core train --algo dpo --data STORE_OR_PAIR_FOLDER --out runs/dpo
    accelerate launch --num_processes N -m dfusion_core train ...        # data-parallel, same results

The denoiser is a UNet (DDPM noising, DDIM steps) or an SD3-family MMDiT (rectified-flow noising, Flow-GRPO
SDE steps): everything that differs comes from `model.family` (train_noised, step, forward, lora_targets), and
the denoiser is called only through sampling.guided_output. LoRA through peft on the denoiser's attention (the
frozen reference = the same network with adapters disabled, no copy); rank 0 = full fine-tune (then a frozen
copy is the reference). Every step's batch, timesteps and
noise derive from (seed, step) alone, so a resumed run continues exactly, and N processes taking equal
slices of the same global batch compute what one process computes (gradients are averaged by accelerate).
The result is a LoRA folder that `pipe.load_lora_weights(DIR)` and `load_model(..., lora=DIR)` load.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.atomic import (move_files_into, replace_folder, temp_file_is_stale, temp_name_for, write_atomic,
                      write_text_atomic)
from ..engine.config import SamplingParams
from ..engine.families import Conditioning
from ..engine.loading import LoadedModel
from ..engine.masks import resize_mask
from ..engine.sampling import guided_output, recompute_log_probs, sampler_stds
from ..engine.steps import step_log_prob
from . import losses
from .data import PreferencePair, check_pairs
from .early_stopping import EarlyStopping

from .config import ALGOS, WEIGHTINGS, TrainConfig  # noqa: F401 - where they were defined



@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_timestep_indices(weighting: str, num_train_timesteps: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n indices into the training schedule: uniform, or logit-normal as diffusers' compute_density_for_timestep_
    sampling draws them (u = sigmoid(N(0, 1)), index = floor(u * T)), so the noise levels pre-training saw most."""
    if weighting == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=g)
    u = torch.sigmoid(torch.randn(n, generator=g))
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


MIN_PAIRS_TO_HOLD_OUT = 10


def split_validation(pairs: list[PreferencePair], fraction: float, seed: int):
    """(training pairs, held-out pairs): a seeded share of the set (at least 2) never trained on; none from a set
    of fewer than MIN_PAIRS_TO_HOLD_OUT pairs."""
    if not fraction or len(pairs) < MIN_PAIRS_TO_HOLD_OUT:
        return pairs, []
    n_val = max(2, round(len(pairs) * fraction))
    if len(pairs) - n_val < 2:
        raise ValueError(f"val_fraction {fraction} of {len(pairs)} pairs leaves fewer than 2 to train on: label "
                         "more pairs or set val_fraction 0")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 104729)).tolist()
    held = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def drop_rows_after(log: Path, step: int) -> None:
    """Keep a log's rows up to `step` (and rows without one): a run killed after its last checkpoint logged steps
    that the resumed run computes again, and each step should appear once."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines()
    kept = [ln for ln in lines if not ln.strip() or json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(log, "".join(ln + "\n" for ln in kept))


def logged_validations(log: Path, step: int) -> list[dict]:
    """The validated checkpoints a log holds up to `step` (one per step, the last logged), as Trainer.validations
    lists them: a resumed run reports the validations made before it too."""
    if not log.is_file():
        return []
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    by_step = {r["step"]: {k: v for k, v in r.items() if k not in ("stage", "best_step")}
               for r in rows if r.get("stage") == "validation" and r.get("step", 0) <= step}
    return [by_step[k] for k in sorted(by_step)]


def drawable_rows(rows: list[tuple[int, int]], drawable: torch.Tensor) -> tuple[list[tuple[int, int]], float]:
    """The (trajectory, step) rows of a batch whose step the policy could have drawn (losses.drawable_steps), and
    the loss scale: 1, or 0 with the batch's first row when none is left (a zero step keeps processes in step)."""
    kept = [(i, j) for i, j in rows if drawable[i, j]]
    return (kept, 1.0) if kept else (rows[:1], 0.0)


def lora_config(cfg: TrainConfig, family):
    """The peft LoraConfig of a run's adapter: rank, lora_alpha (default: the rank), the family's targets."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(cfg.lora_targets or family.lora_targets))


def adapter_metadata(peft_config: dict, layers: dict) -> dict:
    """The adapter's peft config (rank, lora_alpha, targets) for each exported component, as diffusers' own
    training scripts save it: without it `load_lora_weights` assumes lora_alpha = rank, so an adapter trained at
    alpha != rank would come back at the wrong scale."""
    return {name.replace("_lora_layers", "_lora_adapter_metadata"): peft_config for name in layers}


class Trainer:
    def __init__(self, model: LoadedModel, pairs: list[PreferencePair], cfg: TrainConfig, out_dir: str | Path,
                 accelerator=None):
        self.cfg = cfg.validate()
        check_pairs(pairs, cfg.algo)  # before touching the model: refused data leaves it as it was
        self.pairs, self.val_pairs = split_validation(pairs, cfg.val_fraction if cfg.algo == "dpo" else 0.0,
                                                      cfg.seed)
        p0 = pairs[0]
        self._setup(model, SamplingParams(num_steps=p0.num_steps, eta=p0.eta, guidance_scale=p0.guidance_scale,
                                          negative_prompt=p0.negative_prompt, flow_sampler=p0.flow_sampler),
                    out_dir, accelerator)
        if cfg.algo in ("traj-dpo", "ddpo", "dpok"):
            self._prepare_trajectories()

    def _setup(self, model: LoadedModel, sampling: SamplingParams, out_dir: str | Path, accelerator) -> None:
        """The model, the LoRA, the optimizer and accelerate (self.cfg set): what every training mode shares."""
        from accelerate import Accelerator

        cfg = self.cfg
        if model.kind == "sdxl":
            raise ValueError("training SDXL pipelines is not supported yet (added conditioning)")
        self.model = model
        self.family = model.family
        self.out = Path(out_dir)
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=model.device.type == "cpu")
        if self.cfg.batch_size % self.acc.num_processes:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {self.acc.num_processes} processes")
        self.sampling = sampling
        self.num_steps, self.eta, self.cfg_scale = sampling.num_steps, sampling.eta, sampling.guidance_scale
        self.schedule = self.family.schedule(model.pipe.scheduler, self.num_steps)
        if cfg.kl_scale == "flow_grpo" and getattr(self.schedule, "sigmas", None) is None:
            raise ValueError("kl_scale flow_grpo needs a flow model (SD3 family): a UNet's DDIM steps have no sigma "
                             "decrement; use kl_scale exact")
        net = model.denoiser
        net.requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(model.pipe, name, None) is not None:
                getattr(model.pipe, name).requires_grad_(False)
        self.ref_net = None
        self._lora_layers = None
        params = self._make_trainable(net)
        for p in params:
            p.data = p.data.float()
        self.params = params
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        self.net, self.opt, self.sched = self.acc.prepare(net, opt, sched)
        self.net.train()
        self._embeds: dict[str, tuple] = {}
        self.history: list[dict] = []
        self.validations: list[dict] = []  # {"step", "score", ...} after each validated checkpoint
        self.step = 0

    def _make_trainable(self, net) -> list:
        """LoRA adapters on the family's attention projections (or the whole network at rank 0)."""
        cfg = self.cfg
        if cfg.lora_rank == 0:  # full fine-tune: the reference must be a frozen copy
            self.ref_net = copy.deepcopy(net).requires_grad_(False).eval()
            net.requires_grad_(True)
            return list(net.parameters())
        if "dfusion" in (getattr(net, "peft_config", None) or {}):
            net.delete_adapters("dfusion")
        with torch.random.fork_rng(devices=[]):  # the adapter's initial weights depend on the seed alone
            torch.manual_seed(cfg.seed)
            net.add_adapter(lora_config(cfg, self.family), adapter_name="dfusion")
        return [p for p in net.parameters() if p.requires_grad]

    # ---- conditioning and the frozen reference ----------------------------------------------------
    def _embed(self, prompts: list[str]) -> Conditioning:
        """Conditioning with one row per entry of `prompts` (encoded once per distinct prompt)."""
        need = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if need:
            h, w = self.model.default_size()
            c = self.model.encode(need, self.sampling.negative_prompt, self.cfg_scale > 1, h, w)
            for i, p in enumerate(need):
                row = lambda d: None if d is None else {k: v[i] for k, v in d.items()}
                self._embeds[p] = (c.cond[i], None if c.uncond is None else c.uncond[i], row(c.added_cond),
                                   row(c.added_uncond))
        rows = [self._embeds[p] for p in prompts]
        stack = lambda j: None if rows[0][j] is None else torch.stack([r[j] for r in rows])
        stack_d = lambda j: None if rows[0][j] is None else {k: torch.stack([r[j][k] for r in rows]) for k in rows[0][j]}
        return Conditioning(stack(0), stack(1), stack_d(2), stack_d(3))

    @contextmanager
    def reference(self):
        """The frozen pre-trained model: adapters disabled (LoRA) or the frozen copy (full fine-tune)."""
        inner = self.acc.unwrap_model(self.net)
        if self.ref_net is not None:
            yield self.ref_net
            return
        if self._lora_layers is None:  # found once: walking every module on each step costs ~17 ms here
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in inner.modules() if isinstance(m, BaseTunerLayer)]
        for m in self._lora_layers:
            m.enable_adapters(False)
        try:
            yield inner
        finally:
            for m in self._lora_layers:
                m.enable_adapters(True)

    def _forward(self, net, x, t, cond: Conditioning, cfg: bool) -> torch.Tensor:
        """One (guided) call of `net` on rows x with cond's rows, through the family's denoiser call."""
        ctx = self.acc.autocast() if self.cfg.mixed_precision != "no" else nullcontext()
        with ctx:
            return guided_output(self.model, cond, list(range(x.shape[0])), x, t, self.cfg_scale,
                                 cfg and cond.uncond is not None, denoiser=net)

    # ---- trajectory bookkeeping -------------------------------------------------------------------
    def _prepare_trajectories(self) -> None:
        """Per trajectory: log-probs under the plain pre-trained model (reference / behaviour policy)."""
        self.trajs, self.traj_prompts, self.rewards = [], [], []
        for p in self.pairs:
            for traj, score in ((p.winner, p.winner_score), (p.loser, p.loser_score)):
                self.trajs.append(traj)
                self.traj_prompts.append(p.prompt)
                self.rewards.append(score)
        with torch.no_grad(), self.reference() as ref:
            self.plain_logp = [recompute_log_probs(self.model, pr, tr, self.sampling, denoiser=ref)
                               for pr, tr in zip(self.traj_prompts, self.trajs)]
        if self.cfg.algo in ("ddpo", "dpok"):
            if any(r is None for r in self.rewards):
                raise ValueError(f"{self.cfg.algo} needs scored pairs: build them with a scorer")
            self.advantages = losses.normalise_rewards(torch.tensor(self.rewards, dtype=torch.float64),
                                                       self.traj_prompts, self.cfg.adv_clip)  # cast at use
            self.drawable = losses.drawable_steps(torch.stack(self.plain_logp), sampler_stds(self.model, self.sampling),
                                                  self.cfg.max_step_residual)

    def _policy_step(self, net, trajs, js, prompts):
        """Mean, std and log-prob of the next latent at step index js[i] of each trajectory under `net`
        (the family's sampler step: stochastic DDIM for a UNet, the Flow-GRPO SDE for an MMDiT)."""
        dev = self.model.device
        x = torch.stack([tr.latents[j] for tr, j in zip(trajs, js)]).to(dev)
        x_prev = torch.stack([tr.latents[j + 1] for tr, j in zip(trajs, js)]).to(dev)
        out = self._forward(net, x, self.family.model_timesteps(self.schedule, js), self._embed(prompts),
                            self.cfg_scale > 1)
        res = self.family.step(self.schedule, out, x, js, self.sampling, None)
        return res.mean, res.std, step_log_prob(x_prev, res.mean, res.std)

    # ---- one optimizer step per algorithm ---------------------------------------------------------
    def _local(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx) // self.acc.num_processes
        return idx[self.acc.process_index * n:(self.acc.process_index + 1) * n]

    def _noised_pairs(self, g, pool: list[PreferencePair] | None = None, local: bool = True,
                      winners_only: bool = False):
        """This step's pairs (from `pool`, default the training pairs), noised: rows [winners; losers] share each
        pair's timestep and noise (winners_only: the winners' rows alone, same draws). Returns (x_t, target,
        denoiser timesteps, conditioning, the pairs here)."""
        pool = self.pairs if pool is None else pool
        idx = torch.randint(0, len(pool), (self.cfg.batch_size,), generator=g)
        t_all = train_timestep_indices(self.cfg.weighting, self.schedule.num_train_timesteps, self.cfg.batch_size, g)
        noise_all = torch.randn((self.cfg.batch_size, *pool[0].winner.latents[-1].shape), generator=g)
        sel = self._local(torch.arange(self.cfg.batch_size)) if local else torch.arange(self.cfg.batch_size)
        pairs = [pool[int(i)] for i in idx[sel]]
        dev = self.model.device
        t, noise = t_all[sel], noise_all[sel].to(dev)
        sides = ("winner",) if winners_only else ("winner", "loser")
        x0 = torch.cat([torch.stack([getattr(p, side).latents[-1] for p in pairs]) for side in sides]).to(dev)
        k = len(sides)
        x_t, target, t_in = self.family.train_noised(self.schedule, x0, torch.cat([noise] * k), torch.cat([t] * k))
        prompts = [p.prompt for p in pairs]
        return x_t, target, t_in, self._embed(prompts * k), pairs

    def _error_weights(self, pairs, shape) -> torch.Tensor | None:
        """[2n, 1, h, w] per-position weights of the DPO errors (winners then losers, a pair's mask for both):
        mask + dpo_outside_weight * (1 - mask); None for the paper's plain mean."""
        w_out = self.cfg.dpo_outside_weight
        if w_out == 1.0:
            return None
        h, w = shape[-2:]
        ones = torch.ones(h, w)
        ms = torch.stack([ones if p.mask is None else resize_mask(p.mask, (h, w), "smooth") for p in pairs])
        weights = (ms + w_out * (1 - ms))[:, None].to(self.model.device)
        return torch.cat([weights, weights])

    def _loss_dpo(self, g, pool: list[PreferencePair] | None = None, local: bool = True):
        x_t, target, t_in, cond, pairs = self._noised_pairs(g, pool, local)
        n, weights = len(pairs), self._error_weights(pairs, x_t.shape)

        def error(net):
            sq = (self._forward(net, x_t, t_in, cond, False) - target) ** 2
            if weights is None:
                return sq.mean(dim=(1, 2, 3))
            return (sq * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * sq.shape[1]).clamp_min(1e-8)

        err = error(self.net)
        with torch.no_grad(), self.reference() as ref:
            ref_err = error(ref)
        return losses.diffusion_dpo_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], self.cfg.dpo_beta)

    @torch.no_grad()
    def held_out_metrics(self, draws: int = 32) -> dict:
        """DPO loss and implicit accuracy on the held-out pairs, over `draws` batches whose pairs, timesteps and
        noise are the same at every checkpoint (so checkpoints compare); score = implicit accuracy."""
        was_training = self.net.training
        self.net.eval()
        rows = [self._loss_dpo(_step_generator(self.cfg.seed + 7919, k), self.val_pairs, local=False)
                for k in range(draws)]
        self.net.train(was_training)
        acc = sum(st["implicit_acc"] for _, st in rows) / draws
        return {"score": acc, "val_implicit_acc": acc, "val_loss": sum(float(l) for l, _ in rows) / draws,
                "val_pairs": len(self.val_pairs)}

    def _loss_sft(self, g, both: bool = False):
        """algo sft: the plain denoising loss on the pairs' winners, i.e. fine-tuning on the preferred samples
        (rejection-sampling fine-tuning, the simplest positive control for a preference set); both=True: on the
        same two images a DPO step sees (the cost benchmark's baseline)."""
        x_t, target, t_in, cond, _ = self._noised_pairs(g, winners_only=not both)
        return F.mse_loss(self._forward(self.net, x_t, t_in, cond, False), target), {}

    def _draw_steps(self, g, count):
        k = self.cfg.steps_per_trajectory
        return torch.randint(0, self.num_steps, (count, k), generator=g)

    def _loss_traj_dpo(self, g):
        idx = torch.randint(0, len(self.pairs), (self.cfg.batch_size,), generator=g)
        js_all = self._draw_steps(g, self.cfg.batch_size)
        sel = self._local(torch.arange(self.cfg.batch_size))
        # one forward for every (pair, step) of winner and loser: DDP wants one forward per backward
        pi = [int(i) for i in idx[sel] for _ in range(js_all.shape[1])]
        js = [int(j) for row in js_all[sel] for j in row]
        trajs = [self.pairs[i].winner for i in pi] + [self.pairs[i].loser for i in pi]
        prompts = [self.pairs[i].prompt for i in pi] * 2
        _, _, logp = self._policy_step(self.net, trajs, js + js, prompts)
        n = len(pi)
        rw = torch.stack([self.plain_logp[2 * i][j] for i, j in zip(pi, js)]).to(logp)
        rl = torch.stack([self.plain_logp[2 * i + 1][j] for i, j in zip(pi, js)]).to(logp)
        return losses.trajectory_dpo_loss(logp[:n], logp[n:], rw, rl, self.cfg.traj_beta, self.cfg.clip_eps)

    def _pg_objective(self, trajs, js, prompts, old_logp, adv):
        """DDPO's PPO-clip (or DPOK's clipped PG + KL to the frozen model) at step js[i] of each trajectory,
        against the behaviour policy's log-probs `old_logp` and the advantages `adv` (one per row)."""
        mean, std, logp = self._policy_step(self.net, trajs, js, prompts)
        old, adv = old_logp.to(logp), adv.to(logp)
        if self.cfg.algo == "ddpo":
            return losses.ppo_clip_loss(logp, old, adv, self.cfg.clip_eps, self.cfg.dual_clip)
        with torch.no_grad(), self.reference() as ref:
            ref_mean, _, _ = self._policy_step(ref, trajs, js, prompts)
        kl = losses.gaussian_kl(mean, ref_mean, std)
        if self.cfg.kl_scale == "flow_grpo":  # Flow-GRPO's scale: the exact KL times the step's sigma decrement
            sig = self.schedule.sigmas
            kl = kl * torch.tensor([float(sig[j] - sig[j + 1]) for j in js]).to(kl)
        return losses.dpok_loss(logp, old, adv, kl, self.cfg.kl_coef, self.cfg.clip_eps, self.cfg.dual_clip)

    def _loss_pg(self, g):
        draw = self.step // self.cfg.inner_epochs  # the same batch for inner_epochs consecutive steps
        gb = _step_generator(self.cfg.seed + 7, draw)
        idx = torch.randint(0, len(self.trajs), (self.cfg.batch_size,), generator=gb)
        js_all = self._draw_steps(gb, self.cfg.batch_size)
        sel = self._local(torch.arange(self.cfg.batch_size))
        rows, scale = drawable_rows([(int(i), int(j)) for i, row in zip(idx[sel], js_all[sel]) for j in row],
                                    self.drawable)
        ti, js = [i for i, _ in rows], [j for _, j in rows]
        trajs, prompts = [self.trajs[i] for i in ti], [self.traj_prompts[i] for i in ti]
        old = torch.stack([self.plain_logp[i][j] for i, j in zip(ti, js)])
        loss, stats = self._pg_objective(trajs, js, prompts, old, self.advantages[ti])
        loss = loss * scale
        stats["reward_mean"] = math.fsum(self.rewards) / len(self.rewards)  # all scored (checked up front)
        return loss, stats

    def _loss_fn(self, g):
        return {"dpo": self._loss_dpo, "traj-dpo": self._loss_traj_dpo, "sft": self._loss_sft}.get(
            self.cfg.algo, self._loss_pg)(g)

    def train_step(self) -> dict:
        g = _step_generator(self.cfg.seed, self.step)
        t0 = time.perf_counter()
        loss, stats = self._loss_fn(g)
        self.acc.backward(loss)
        grad_norm = self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        loss_all = self.acc.reduce(loss.detach().reshape(1), reduction="mean").item()
        row = {"step": self.step, "loss": loss_all, "lr": self.sched.get_last_lr()[0],
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "seconds": time.perf_counter() - t0, **stats}
        self.history.append(row)
        return row

    # ---- checkpoints ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        inner = self.acc.unwrap_model(self.net)
        if self.cfg.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(inner, adapter_name="dfusion").items()}
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}

    def save(self, final: bool = False) -> None:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        ck = self.out / "checkpoints" / f"step-{self.step:06d}"
        ck.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "trainable": self.trainable_state(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "config": asdict(self.cfg), **self._extra_state()}
        write_atomic(ck / "state.pt", lambda p: torch.save(state, p))
        self.export(self.out)
        write_text_atomic(self.out / "latest_checkpoint", ck.name)

    def export(self, dest: Path) -> None:
        """LoRA in diffusers format (pipe.load_lora_weights(dest)); full fine-tune: the denoiser's folder."""
        inner = self.acc.unwrap_model(self.net)
        dest.mkdir(parents=True, exist_ok=True)
        # built beside and moved in file by file: the app may load dest while a checkpoint is being written
        built = temp_name_for(dest / "export")
        for left in [built, *(d for d in dest.glob("export.*.tmp") if temp_file_is_stale(d))]:  # killed exports
            shutil.rmtree(left, ignore_errors=True)
        if self.cfg.lora_rank > 0:
            layers = self.family.lora_export(self.trainable_state())  # unet_lora_layers / transformer_lora_layers
            type(self.model.pipe).save_lora_weights(built, **layers, **self._adapter_metadata(inner, layers),
                                                    safe_serialization=True)
            (built / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
            move_files_into(built, dest)
        else:
            inner.save_pretrained(built)
            replace_folder(built, dest / self.family.denoiser_attr)
            write_text_atomic(dest / "train_config.json", json.dumps(asdict(self.cfg), indent=2))

    @staticmethod
    def _adapter_metadata(inner, layers: dict) -> dict:
        return adapter_metadata(inner.peft_config["dfusion"].to_dict(), layers)

    def resume(self) -> bool:
        marker = self.out / "latest_checkpoint"
        if not marker.is_file():
            return False
        st = torch.load(self.out / "checkpoints" / marker.read_text().strip() / "state.pt", weights_only=False)
        self._load_trainable(st["trainable"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step = int(st["step"])
        self._load_extra_state(st)
        if self.acc.is_main_process:
            drop_rows_after(self.out / "log.jsonl", self.step)
        self.validations = logged_validations(self.out / "log.jsonl", self.step)
        return True

    def _extra_state(self) -> dict:
        """What a training mode adds to a checkpoint (on-policy rounds: the round)."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def run(self, resume: bool = True, progress: bool = True, on_step=None, should_stop=None,
            validate=None) -> TrainResult:
        """Train to cfg.steps (or until `should_stop()`), checkpointing every cfg.ckpt_every steps. `validate(self)`
        -> {"score": higher is better, ...} is read before the first step and after each checkpoint (default:
        held-out pairs when cfg.val_fraction > 0); the best checkpoint's adapter lands in OUT/best (step 0: no
        checkpoint beat the plain model) and the run stops after cfg.patience checkpoints without a better score."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        validate = validate or (type(self).held_out_metrics if self.val_pairs else None)
        self.stopper = EarlyStopping.load(self.out / "validation.json", self.cfg.patience) if validate else None
        if self.stopper is not None and self.step == 0 and self.stopper.best_step is None:
            self._validate(validate)  # the untrained adapter (the plain model) is a candidate: a run must beat it
        bar = None
        if progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"{self.cfg.algo}")
        while self.step < self.cfg.steps and not (self.stopper and self.stopper.should_stop):
            if should_stop is not None and should_stop():
                break
            row = self.train_step()
            self._log_row(row)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if on_step is not None:
                on_step(row)
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps:
                self.save()
                if validate:
                    self._validate(validate)
        if bar:
            bar.close()
        if self.step % self.cfg.ckpt_every and self.step < self.cfg.steps:
            self.save()  # stopped early: keep what was done
        if self.stopper is not None:
            self._keep_best()
        checksum = sum(float(v.double().sum() + v.double().abs().sum()) for v in self.trainable_state().values())
        with open(self.out / "rank_checksums.jsonl", "a") as f:  # lets a multi-process run show its ranks agree
            f.write(json.dumps({"rank": self.acc.process_index, "step": self.step, "checksum": checksum}) + "\n")
        return TrainResult(self.out, self.step, self.history)

    def _log_row(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _validate(self, validate) -> None:
        """Read the validation score of this checkpoint; a new best is exported to OUT/best (adapter + state)."""
        was_training = self.net.training
        self.net.eval()
        try:
            metrics = validate(self)
        finally:
            self.net.train(was_training)
        improved = self.stopper.update(self.step, float(metrics["score"]))
        self._log_row({"stage": "validation", "step": self.step, **metrics, "best_step": self.stopper.best_step})
        self.validations.append({"step": self.step, **metrics})
        if improved and self.acc.is_main_process:
            best = self.out / "best"
            self.export(best)
            state = {"step": self.step, "trainable": self.trainable_state()}
            write_atomic(best / "state.pt", lambda p: torch.save(state, p))
        if self.acc.is_main_process:
            self.stopper.save(self.out / "validation.json")

    def _keep_best(self) -> None:
        """The run's result is its best validated checkpoint: its weights in the network and its adapter in OUT
        (the last checkpoint's state stays in OUT/checkpoints for a resume)."""
        self.acc.wait_for_everyone()
        best = self.restore_best()
        if best is not None and self.acc.is_main_process:
            self.export(self.out)
            self._log_row({"stage": "early_stopping", "best_step": best, "last_step": self.step,
                           "stopped_early": self.stopper.should_stop, "best_score": self.stopper.best_score})

    def restore_best(self) -> int | None:
        """Load the best validated checkpoint's weights into the network (for evaluation); its step, or None."""
        path = self.out / "best" / "state.pt"
        if not path.is_file():
            return None
        st = torch.load(path, weights_only=False)
        self._load_trainable(st["trainable"])
        return int(st["step"])

    def _load_trainable(self, trainable: dict) -> None:
        inner = self.acc.unwrap_model(self.net)
        if self.cfg.lora_rank > 0:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(inner, trainable, adapter_name="dfusion")
        else:
            inner.load_state_dict(trainable)

    def unload(self) -> None:
        """Remove the adapter so the model is the plain pre-trained one again."""
        inner = self.acc.unwrap_model(self.net)
        if self.cfg.lora_rank > 0 and "dfusion" in (getattr(inner, "peft_config", None) or {}):
            inner.delete_adapters("dfusion")
        inner.requires_grad_(False)
