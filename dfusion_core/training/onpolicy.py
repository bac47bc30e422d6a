"""DDPO and DPOK as their papers run them: on-policy rounds (METHOD.md, training methods).

    python -m dfusion_core train-on-policy --algo ddpo --prompt-set shapesworld:attribute:train --rounds 10 \
        --arm dfusion --out runs/ddpo-onpolicy

Each round r:
1. samples fresh candidates per prompt from the CURRENT policy (the LoRA being trained; candidate seeds derive
   from (pairing seed, round, prompt)) and builds the round's pairs: the D-Fusion arm fuses them
   (engine/pairs.build_pairs: fused targets vs bases), the random arm pairs plain samples
   (engine/pairs.build_random_pairs); both are scored by the scorer;
2. takes the round's samples = the distinct trajectories of its pairs (targets and bases; for random pairs every
   candidate) with their scores as rewards, and normalises the rewards per prompt over ALL its samples of the
   round (losses.normalise_rewards), so an advantage reflects the reward gap, not +/-1 per pair;
3. fixes the old log-probs: the policy's at the start of the round. A plain sample's are those it was sampled
   with; a fused target was drawn by the fused sampler, so its are recomputed under the plain current policy;
4. trains `inner_epochs` passes over the samples (shuffled), `batch_size` trajectories per optimizer step, on
   every denoising step of each trajectory (or `steps_per_trajectory` random ones), with PPO-clip (ddpo) or
   clipped PG + KL to the pre-trained model (dpok). Rows of one optimizer step are accumulated in chunks of
   `micro_batch` (ddpo-pytorch accumulates over timesteps the same way).
A checkpoint is written after every round; a resumed run restarts at the next round and continues exactly
(round r's samples depend only on the LoRA after round r - 1 and the seeds). One process (no data parallelism).
Offline training on a fixed pair set or the hand-labelled store is `Trainer` (trainer.py), unchanged.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..engine.config import FusionParams, SamplingParams
from ..engine.loading import LoadedModel
from ..engine.pairs import PairingParams, build_pairs, build_random_pairs
from ..engine.sampling import recompute_log_probs, validate_prompt
from . import losses
from .trainer import TrainConfig, Trainer, TrainResult, _step_generator

ARMS = ("dfusion", "random")
ON_POLICY_ALGOS = ("ddpo", "dpok")


@dataclass
class OnPolicyConfig(TrainConfig):
    """TrainConfig's fields (steps unused: rounds x inner_epochs x batches decide them) plus the rounds'."""

    algo: str = "ddpo"  # ddpo (PPO-clip) | dpok (clipped PG + KL to the pre-trained model)
    rounds: int = 10  # sample -> pair -> score -> train rounds
    arm: str = "dfusion"  # dfusion (fused targets vs bases) | random (plain samples paired at random)
    steps_per_trajectory: int = 0  # denoising steps trained per trajectory per inner epoch; 0 = all (the papers)
    micro_batch: int = 0  # (trajectory, step) rows per forward pass inside one optimizer step; 0 = all at once
    sample_batch: int = 16  # images per batched sampling / fusion call while collecting a round

    def validate(self) -> "OnPolicyConfig":
        if self.algo not in ON_POLICY_ALGOS:
            raise ValueError(f"on-policy rounds train {' or '.join(ON_POLICY_ALGOS)}, got {self.algo!r} "
                             "(dpo and traj-dpo train offline on a pair set: use train --data)")
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {self.arm!r}")
        for name in ("rounds", "sample_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("steps_per_trajectory", "micro_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        TrainConfig.validate(replace(self, steps=max(1, self.steps), steps_per_trajectory=1))
        return self


@dataclass
class RoundData:
    """One round's samples: trajectories, rewards, advantages and the old (behaviour) log-probs."""

    round: int
    prompts: list[str]  # one per sample
    trajectories: list  # Trajectory per sample
    rewards: torch.Tensor  # [n] float64 scores
    fused: list[bool]  # drawn by the fused sampler (a D-Fusion target)
    advantages: torch.Tensor  # [n] per-prompt normalised rewards, clipped at adv_clip
    old_log_probs: torch.Tensor  # [n, steps] the policy's at the start of the round
    n_pairs: int = 0
    info: dict = field(default_factory=dict)


def round_seed(seed: int, r: int) -> int:
    """Round r's pairing seed (candidate seeds are a hash of it and the prompt): fresh samples every round."""
    return seed * 1_000_003 + r


def round_samples(records) -> tuple[list[str], list, list[float], list[bool]]:
    """The distinct trajectories of a round's pair records with their scores: a D-Fusion record gives its fused
    target and its base, a random one its two candidates (a candidate in several pairs counts once)."""
    seen, prompts, trajs, rewards, fused = set(), [], [], [], []
    for r in records:
        is_fused = r.extra.get("kind") != "random"
        for role, seed in (("target", r.ref_seed), ("base", r.base_seed)):
            key = (r.prompt, "fused", r.base_seed, r.ref_seed) if (role == "target" and is_fused) \
                else (r.prompt, "plain", seed)
            if key in seen:
                continue
            seen.add(key)
            prompts.append(r.prompt)
            trajs.append(r.target if role == "target" else r.base)
            rewards.append(float(r.scores[role]))
            fused.append(role == "target" and is_fused)
    return prompts, trajs, rewards, fused


class OnPolicyTrainer(Trainer):
    """DDPO / DPOK in on-policy rounds on `prompts`, rewards from `scorer` ((images, prompts) -> scores)."""

    def __init__(self, model: LoadedModel, prompts: list[str], scorer, cfg: OnPolicyConfig, out_dir: str | Path,
                 sampling: SamplingParams | None = None, fusion: FusionParams | None = None,
                 pairing: PairingParams | None = None, accelerator=None):
        self.cfg = cfg.validate()
        self.prompts = [validate_prompt(p) for p in dict.fromkeys(prompts)]
        if not self.prompts:
            raise ValueError("on-policy rounds need prompts")
        if scorer is None:
            raise ValueError("on-policy rounds need a scorer: the rewards are its scores")
        sampling = (sampling or SamplingParams()).validate()
        if sampling.eta == 0 or (model.kind == "sd3" and sampling.flow_sampler == "ode"):
            raise ValueError(f"{cfg.algo} learns from the sampling steps' log-probabilities: sample with eta > 0 "
                             "(and, on a flow model, flow_sampler sde or ddim)")
        self.scorer, self.pairing = scorer, (pairing or PairingParams()).validate()
        self.fusion = None if cfg.arm == "random" else (fusion or FusionParams()).validate(sampling.num_steps)
        self.pairs = []
        self.round = 0
        self.rounds: list[dict] = []
        self._setup(model, sampling, out_dir, accelerator)
        if self.acc.num_processes > 1:
            raise ValueError("on-policy rounds run in one process (sampling is not split over processes)")

    # ---- collecting a round ----------------------------------------------------------------------
    def _round_records(self, r: int) -> list:
        """Round r's pair records, sampled (and fused) from the current policy."""
        pairing = replace(self.pairing, seed=round_seed(self.pairing.seed, r))
        inner = self.acc.unwrap_model(self.net)
        inner.eval()
        try:
            with torch.no_grad():
                if self.fusion is None:
                    return build_random_pairs(self.model, self.prompts, self.scorer, self.sampling, pairing,
                                              self.cfg.sample_batch)
                return build_pairs(self.model, self.prompts, self.scorer, self.sampling, self.fusion, pairing,
                                   self.cfg.sample_batch)
        finally:
            inner.train()

    def collect_round(self, r: int) -> RoundData:
        """Sample, pair and score round r; advantages per prompt over all its samples; old log-probs fixed."""
        t0 = time.perf_counter()
        records = self._round_records(r)
        prompts, trajs, rewards, fused = round_samples(records)
        if len(trajs) < 2:
            raise ValueError(f"round {r} gave {len(trajs)} samples: use more candidates or prompts")
        rw = torch.tensor(rewards, dtype=torch.float64)
        adv = losses.normalise_rewards(rw, prompts, self.cfg.adv_clip)
        inner = self.acc.unwrap_model(self.net)
        old = [recompute_log_probs(self.model, p, t, self.sampling, denoiser=inner) if f else t.log_probs.float()
               for p, t, f in zip(prompts, trajs, fused)]
        info = {"sample_s": time.perf_counter() - t0, "n_fused": sum(fused)}
        return RoundData(r, prompts, trajs, rw, fused, adv, torch.stack([o.cpu() for o in old]), len(records), info)

    # ---- training on a round ---------------------------------------------------------------------
    def _round_steps(self, n: int, r: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner epoch `epoch` of round r: the order of the n samples and the steps trained of each ([n, k])."""
        g = _step_generator(self.cfg.seed + 11, r * 10_007 + epoch)
        order = torch.randperm(n, generator=g)
        k = self.cfg.steps_per_trajectory
        if k == 0 or k >= self.num_steps:
            return order, torch.arange(self.num_steps).repeat(n, 1)
        return order, torch.stack([torch.randperm(self.num_steps, generator=g)[:k] for _ in range(n)])

    def _update(self, data: RoundData, idx: torch.Tensor, js: torch.Tensor) -> dict:
        """One optimizer step on the samples `idx` at their steps `js`, accumulated over micro-batches."""
        rows = [(int(i), int(j)) for i, row in zip(idx, js) for j in row]
        chunk = self.cfg.micro_batch or len(rows)
        t0 = time.perf_counter()
        total, sums = 0.0, {}
        for c in range(0, len(rows), chunk):
            part = rows[c:c + chunk]
            ti, tj = [i for i, _ in part], [j for _, j in part]
            loss, stats = self._pg_objective([data.trajectories[i] for i in ti], tj, [data.prompts[i] for i in ti],
                                             data.old_log_probs[ti, tj], data.advantages[ti])
            w = len(part) / len(rows)
            self.acc.backward(loss * w)
            total += loss.item() * w
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * w
        grad_norm = self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "round": data.round, "loss": total, "lr": self.sched.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "rows": len(rows),
                "seconds": time.perf_counter() - t0, **sums}

    def train_round(self, data: RoundData, on_step=None, should_stop=None) -> bool:
        """inner_epochs passes over the round's samples; False when stopped before the round's end."""
        n, bs = len(data.trajectories), self.cfg.batch_size
        for epoch in range(self.cfg.inner_epochs):
            order, js = self._round_steps(n, data.round, epoch)
            for b in range(0, n, bs):
                if should_stop is not None and should_stop():
                    return False
                idx = order[b:b + bs]
                row = {**self._update(data, idx, js[idx]), "epoch": epoch}
                self.history.append(row)
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if on_step is not None:
                    on_step(row)
        return True

    # ---- the run ---------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"round": self.round, "rounds": self.rounds}

    def _load_extra_state(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        self.rounds = list(state.get("rounds", []))

    def run(self, resume: bool = True, progress: bool = True, on_step=None, should_stop=None,
            on_round=None) -> TrainResult:
        """Rounds until cfg.rounds; a checkpoint (and the LoRA) after each. A stop inside a round keeps the
        last round's checkpoint: a resumed run redoes that round from its start, exactly."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        while self.round < self.cfg.rounds:
            if should_stop is not None and should_stop():
                break
            data = self.collect_round(self.round)
            t0 = time.perf_counter()
            if not self.train_round(data, on_step, should_stop):
                break
            row = round_summary(data, self.history, time.perf_counter() - t0)
            self.rounds.append(row)
            self.round += 1
            self.save()
            with open(self.out / "rounds.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print(f"round {row['round']}: reward {row['reward_mean']:.4f} +/- {row['reward_std']:.4f} "
                      f"({row['samples']} samples, {row['pairs']} pairs), approx_kl {row['approx_kl']:.2e}, "
                      f"clipfrac {row['clipfrac']:.3f}", file=sys.stderr, flush=True)
            if on_round is not None:
                on_round(row)
        return TrainResult(self.out, self.step, self.history)


def round_summary(data: RoundData, history: list[dict], train_s: float) -> dict:
    """A round's line in rounds.jsonl: its reward (sampled from the policy at the round's start) and how far
    its updates moved the policy (the last inner epoch's ratio statistics)."""
    rows = [h for h in history if h.get("round") == data.round]
    last = [h for h in rows if h["epoch"] == max(x["epoch"] for x in rows)]
    mean = lambda k: math.fsum(h.get(k, 0.0) for h in last) / len(last)
    rw = data.rewards
    return {"round": data.round, "samples": len(rw), "pairs": data.n_pairs, "fused": data.info.get("n_fused", 0),
            "reward_mean": float(rw.mean()), "reward_std": float(rw.std(unbiased=False)),
            "optimizer_steps": len(rows), "loss": math.fsum(h["loss"] for h in rows) / len(rows),
            "ratio": mean("ratio"), "approx_kl": mean("approx_kl"), "clipfrac": mean("clipfrac"),
            **({"kl": mean("kl")} if "kl" in last[0] else {}),
            "sample_s": round(data.info.get("sample_s", 0.0), 3), "train_s": round(train_s, 3)}


def train_on_policy(model: LoadedModel, prompts: list[str], scorer, cfg: OnPolicyConfig, out_dir: str | Path,
                    sampling: SamplingParams | None = None, fusion: FusionParams | None = None,
                    pairing: PairingParams | None = None, resume: bool = True, progress: bool = True) -> dict:
    """Run on-policy rounds; returns a summary (out, rounds done, optimizer steps, per-round rows)."""
    trainer = OnPolicyTrainer(model, prompts, scorer, cfg, out_dir, sampling, fusion, pairing)
    res = trainer.run(resume=resume, progress=progress)
    return {"out": str(res.out_dir), "rounds": trainer.round, "steps": res.steps, "per_round": trainer.rounds}
