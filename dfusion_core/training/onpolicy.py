"""DDPO and DPOK as their papers run them: on-policy rounds (docs/METHOD.md, training methods).

    python -m dfusion_core train-on-policy --algo ddpo --prompt-set shapesworld:attribute:train --rounds 10 \
        --arm dfusion --out runs/ddpo-onpolicy

Each round r:
1. samples fresh candidates per prompt from the CURRENT policy (the LoRA being trained; candidate seeds derive
   from (pairing seed, round, prompt)) and builds the round's pairs: the D-Fusion arm fuses them
   (pairs/build.build_pairs: fused targets vs bases), the random arm pairs plain samples
   (pairs/build.build_random_pairs); both are scored by the scorer;
2. takes the round's samples = the distinct trajectories of its pairs (targets and bases; for random pairs every
   candidate) with their scores as rewards, and normalises the rewards per prompt over all its samples of one
   kind (`advantage_groups`: the plain draws among themselves, the fused targets among themselves; or per
   prompt over all, "prompt"), so an advantage reflects the reward gap, not +/-1 per pair;
3. fixes the old log-probs: the policy's at the start of the round. A plain sample's are those it was sampled
   with; a fused target was drawn by the fused sampler, so its are recomputed under the plain current policy;
4. trains `inner_epochs` passes over the samples (shuffled), `batch_size` trajectories per optimizer step, on
   every denoising step of each trajectory (or `steps_per_trajectory` random ones), with PPO-clip (ddpo) or
   clipped PG + KL to the pre-trained model (dpok); optionally without a fused target's steps that the plain
   policy would not draw (`max_step_residual`, losses.drawable_steps: on the shipped model its last step, held
   to the base outside the mask, lies ~7 stds from the plain model's mean). Rows of one optimizer step are accumulated in chunks of
   `micro_batch` (ddpo-pytorch accumulates over timesteps the same way).
A checkpoint is written after every round; a resumed run restarts at the next round and continues exactly
(round r's samples depend only on the LoRA after round r - 1 and the seeds).

Under `accelerate launch --num_processes N` the rounds run data-parallel. Process i collects round r for its
share of the prompts (pairs/build.shard_prompts: every N-th prompt); a prompt's candidate seeds derive from
(pairing seed, round, prompt) alone, and rewards are normalised per prompt, so with disjoint shards every sample
and its advantage are the ones a single process computes. Each process trains on its own samples (nothing of
a trajectory crosses processes: an SD 1.5 trajectory at 512 px is megabytes, a round's gigabytes):
`batch_size` stays the GLOBAL batch, batch_size / N trajectories per process per optimizer step, and the
DDP-wrapped net averages the gradients. Every process must take the same number of optimizer steps or DDP
waits forever, yet shards may hold different numbers of samples (uneven prompt counts, dropped ties), so the
processes agree on the count: each inner epoch takes max_i ceil(n_i / (batch_size / N)) steps; a process first
passes over its own samples once (in its shuffled order, its last batch possibly short, exactly as one process
does), then, while others still have batches, starts over from the top of its order in full batches
(`local_batch`); only the last micro-batch of a step synchronises the gradients. Only the main process writes checkpoints, the LoRA and the logs; a round's line carries the
counts and the reward statistics over all processes (gathered), and `samples.jsonl` every sample of the round
(prompt, seeds, reward, advantage, the process that drew it).
Offline training on a fixed pair set or the hand-labelled store is `Trainer` (trainer.py), unchanged.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..engine.config import FusionParams, SamplingParams
from ..engine.loading import LoadedModel
from ..pairs.build import PairingParams, build_pairs, build_random_pairs, shard_prompts
from ..engine.sampling import recompute_log_probs, sampler_stds, validate_prompt
from . import losses
from .trainer import Trainer, TrainResult, _step_generator, drawable_rows

from .config import ADVANTAGE_GROUPS, ARMS, ON_POLICY_ALGOS, OnPolicyConfig  # noqa: F401 - where they were defined



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
    seeds: list = field(default_factory=list)  # per sample (seed, None), a fused target's (base seed, ref seed)
    drawable: torch.Tensor | None = None  # [n, steps] bool: trained steps (losses.drawable_steps); None = all


def round_seed(seed: int, r: int) -> int:
    """Round r's pairing seed (candidate seeds are a hash of it and the prompt): fresh samples every round."""
    return seed * 1_000_003 + r


def distinct_samples(records) -> list[tuple]:
    """(prompt, trajectory, reward, fused, seeds) per distinct trajectory of a round's pair records: a D-Fusion
    record gives its fused target (seeds (base, reference)) and its base, a random one its two candidates (seeds
    (seed, None)); a candidate in several pairs counts once."""
    seen, out = set(), []
    for r in records:
        is_fused = r.extra.get("kind") != "random"
        for role, seed in (("target", r.ref_seed), ("base", r.base_seed)):
            seeds = (r.base_seed, r.ref_seed) if (role == "target" and is_fused) else (seed, None)
            if (r.prompt, seeds) in seen:
                continue
            seen.add((r.prompt, seeds))
            out.append((r.prompt, r.target if role == "target" else r.base, float(r.scores[role]),
                        role == "target" and is_fused, seeds))
    return out


def held_targets(records) -> set[tuple]:
    """(prompt, (base, reference) seeds) of the fused targets held outside their mask: fuse recomputed their
    log-probs under the plain model (the policy of the round), so the round takes them as they are."""
    return {(r.prompt, (r.base_seed, r.ref_seed)) for r in records
            if r.extra.get("kind") != "random" and (r.fusion or {}).get("hold_outside")
            and (r.fusion or {}).get("use_mask", True)}


def round_samples(records) -> tuple[list[str], list, list[float], list[bool]]:
    """The distinct trajectories of a round's pair records with their scores (distinct_samples, without seeds)."""
    rows = distinct_samples(records)
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


def local_batch(order: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """This process's samples at optimizer step s of an inner epoch, `size` per step, from its shuffled `order`.
    The first ceil(n / size) steps pass over every sample once (the last batch may be short); later steps (while
    other processes, holding more samples, still have batches) start over from the top of `order`, full batches
    wrapping around it."""
    n, own = len(order), math.ceil(len(order) / size)
    if s < own:
        return order[s * size:(s + 1) * size]
    return order[torch.arange((s - own) * size, (s - own + 1) * size) % n]


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
        sampling = (sampling or model.default_sampling()).validate()  # the model's defaults, as sample() uses
        if sampling.eta == 0 or (model.kind == "sd3" and sampling.flow_sampler == "ode"):
            raise ValueError(f"{cfg.algo} learns from the sampling steps' log-probabilities: sample with eta > 0 "
                             "(and, on a flow model, flow_sampler sde or ddim)")
        self.scorer, self.pairing = scorer, (pairing or PairingParams()).validate()
        self.fusion = None if cfg.arm == "random" else (fusion or model.default_fusion()).validate(sampling.num_steps)
        self.pairs = []
        self.round = 0
        self.rounds: list[dict] = []
        self._setup(model, sampling, out_dir, accelerator)
        self.stds = sampler_stds(model, self.sampling)
        if len(self.prompts) < self.acc.num_processes:
            raise ValueError(f"{len(self.prompts)} prompts for {self.acc.num_processes} processes: every process "
                             "needs a prompt of its own")
        self.shard = shard_prompts(self.prompts, self.acc.process_index, self.acc.num_processes)

    def _gather(self, obj) -> list:
        """Every process's `obj`, in process order (one process: [obj])."""
        if self.acc.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    # ---- collecting a round ----------------------------------------------------------------------
    def _round_records(self, r: int, progress: bool = False) -> list:
        """Round r's pair records for this process's prompts, sampled (and fused) from the current policy, prompt
        by prompt (the builders treat each prompt on its own, so this equals one call on the whole shard)."""
        pairing = replace(self.pairing, seed=round_seed(self.pairing.seed, r))
        inner = self.acc.unwrap_model(self.net)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            i, n = self.acc.process_index, self.acc.num_processes
            bar = tqdm(total=len(self.shard), position=i, file=sys.stderr, unit="prompt", leave=False,
                       desc=f"round {r} rank {i}/{n}")
        inner.eval()
        records = []
        try:
            with torch.no_grad():
                for p in self.shard:
                    if self.fusion is None:
                        records += build_random_pairs(self.model, [p], self.scorer, self.sampling, pairing,
                                                      self.cfg.sample_batch)
                    else:
                        records += build_pairs(self.model, [p], self.scorer, self.sampling, self.fusion, pairing,
                                               self.cfg.sample_batch)
                    if bar is not None:
                        bar.update(1)
        finally:
            inner.train()
            if bar is not None:
                bar.close()
        return records

    def collect_round(self, r: int, progress: bool = False) -> RoundData:
        """Sample, pair and score round r on this process's prompts; advantages per prompt (and kind) over its
        samples (a prompt's samples are all on one process); old log-probs fixed."""
        t0 = time.perf_counter()
        records = self._round_records(r, progress)
        rows = distinct_samples(records)
        prompts, trajs, rewards, fused, seeds = (list(c) for c in zip(*rows)) if rows else ([], [], [], [], [])
        counts = self._gather(len(trajs))
        if min(counts) < 1 or sum(counts) < 2:
            raise ValueError(f"round {r} gave {' + '.join(map(str, counts))} samples over the processes: every "
                             "process needs one and the round two; use more candidates or prompts")
        rw = torch.tensor(rewards, dtype=torch.float64)
        groups = prompts if self.cfg.advantage_groups == "prompt" else list(zip(prompts, fused))
        adv = losses.normalise_rewards(rw, groups, self.cfg.adv_clip)
        inner = self.acc.unwrap_model(self.net)
        plain = held_targets(records)  # their log-probs were recomputed under this policy when they were fused
        old = [recompute_log_probs(self.model, p, t, self.sampling, denoiser=inner) if f and (p, s) not in plain
               else t.log_probs.float() for p, t, f, s in zip(prompts, trajs, fused, seeds)]
        old = torch.stack([o.cpu() for o in old])
        drawable = losses.drawable_steps(old, self.stds, self.cfg.max_step_residual)
        info = {"sample_s": time.perf_counter() - t0, "n_fused": sum(fused),
                "fused_steps": sum(fused) * old.shape[1], "fused_steps_dropped": int((~drawable[fused]).sum()),
                "plain_steps_dropped": int((~drawable[[not f for f in fused]]).sum())}
        return RoundData(r, prompts, trajs, rw, fused, adv, old, len(records), info, seeds, drawable)

    def merge_round(self, data: RoundData) -> dict:
        """A round over all processes: pairs and fused targets summed, every sample's row (prompt, seeds, reward,
        advantage, process) in process order, the slowest process's sampling time."""
        counts = ("fused_steps", "fused_steps_dropped", "plain_steps_dropped")
        mine = {"pairs": data.n_pairs, "fused": data.info.get("n_fused", 0), "sample_s": data.info.get("sample_s", 0.0),
                **{k: data.info.get(k, 0) for k in counts},
                "samples": [{"round": data.round, "prompt": p, "seed": s[0], "ref_seed": s[1], "fused": f,
                             "reward": float(rw), "advantage": float(a), "rank": self.acc.process_index}
                            for p, s, f, rw, a in zip(data.prompts, data.seeds, data.fused, data.rewards.tolist(),
                                                      data.advantages.tolist())]}
        parts = self._gather(mine)
        return {"round": data.round, "pairs": sum(m["pairs"] for m in parts), "fused": sum(m["fused"] for m in parts),
                "sample_s": max(m["sample_s"] for m in parts), "samples": [s for m in parts for s in m["samples"]],
                "processes": len(parts), **{k: sum(m[k] for m in parts) for k in counts}}

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
        """One optimizer step on the samples `idx` at their steps `js`, accumulated over micro-batches. Only the
        last micro-batch's backward synchronises the gradients (DDP averages them over the processes there), so
        processes whose batches split into different numbers of micro-batches still meet once per step."""
        rows = [(int(i), int(j)) for i, row in zip(idx, js) for j in row]
        if data.drawable is not None:
            rows, scale = drawable_rows(rows, data.drawable)
        else:
            scale = 1.0
        chunk = self.cfg.micro_batch or len(rows)
        t0 = time.perf_counter()
        total, sums = 0.0, {}
        for c in range(0, len(rows), chunk):
            part = rows[c:c + chunk]
            ti, tj = [i for i, _ in part], [j for _, j in part]
            with nullcontext() if c + chunk >= len(rows) else self.acc.no_sync(self.net):
                loss, stats = self._pg_objective([data.trajectories[i] for i in ti], tj,
                                                 [data.prompts[i] for i in ti], data.old_log_probs[ti, tj],
                                                 data.advantages[ti])
                w = len(part) / len(rows) * scale
                self.acc.backward(loss * w)
            total += loss.item() * w
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * w
        grad_norm = self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "round": data.round, "lr": self.sched.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                **self._merged_stats({"loss": total, **sums}, len(rows)), "seconds": time.perf_counter() - t0}

    def _merged_stats(self, stats: dict, rows: int) -> dict:
        """A step's loss and ratio statistics averaged over the processes (the objective DDP's averaged gradient
        descends) and its (trajectory, step) rows summed."""
        keys = sorted(stats)
        vec = torch.tensor([[stats[k] for k in keys] + [float(rows)]], dtype=torch.float64, device=self.acc.device)
        if self.acc.num_processes > 1:
            vec = self.acc.gather(vec)
        mean = vec.mean(0).tolist()
        return {**dict(zip(keys, mean)), "rows": int(round(float(vec[:, -1].sum())))}

    def train_round(self, data: RoundData, on_step=None, should_stop=None) -> bool:
        """inner_epochs passes over the round's samples; False when stopped before the round's end. Each process
        trains on its own samples, batch_size / processes per step, and all take the same number of steps
        (module docstring: local_batch)."""
        size = self.cfg.batch_size // self.acc.num_processes
        n = len(data.trajectories)
        steps = max(math.ceil(c / size) for c in self._gather(n))
        for epoch in range(self.cfg.inner_epochs):
            order, js = self._round_steps(n, data.round, epoch)
            for s in range(steps):
                if should_stop is not None and should_stop():
                    return False
                idx = local_batch(order, s, size)
                row = {**self._update(data, idx, js[idx]), "epoch": epoch}
                self.history.append(row)
                if self.acc.is_main_process:
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
        last round's checkpoint: a resumed run redoes that round from its start, exactly. `should_stop` is for
        one process (the app): processes stopping at different steps would leave the others waiting."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        while self.round < self.cfg.rounds:
            if should_stop is not None and should_stop():
                break
            data = self.collect_round(self.round, progress)
            merged = self.merge_round(data)
            t0 = time.perf_counter()
            if not self.train_round(data, on_step, should_stop):
                break
            row = round_summary(merged, self.history, time.perf_counter() - t0)
            self.rounds.append(row)
            self.round += 1
            self.save()
            self._write_round(row, merged["samples"], progress)
            if on_round is not None:
                on_round(row)
        self._write_checksums()
        return TrainResult(self.out, self.step, self.history)

    def _write_round(self, row: dict, samples: list[dict], progress: bool) -> None:
        """The main process appends the round's line to rounds.jsonl and its samples to samples.jsonl."""
        if not self.acc.is_main_process:
            return
        with open(self.out / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        if progress:
            print(f"round {row['round']}: reward {row['reward_mean']:.4f} +/- {row['reward_std']:.4f} "
                  f"({row['samples']} samples, {row['pairs']} pairs, {row['processes']} processes), approx_kl "
                  f"{row['approx_kl']:.2e}, clipfrac {row['clipfrac']:.3f}", file=sys.stderr, flush=True)

    def _write_checksums(self) -> None:
        """rank_checksums.jsonl (main process): each process's LoRA checksum at the end, equal when the processes'
        gradients were averaged (without it each would drift off on its own samples)."""
        checksum = sum(float(v.double().sum() + v.double().abs().sum()) for v in self.trainable_state().values())
        rows = self._gather({"rank": self.acc.process_index, "round": self.round, "step": self.step,
                             "checksum": checksum})
        if self.acc.is_main_process:
            with open(self.out / "rank_checksums.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


def round_summary(merged: dict, history: list[dict], train_s: float) -> dict:
    """A round's line in rounds.jsonl, over all processes (merge_round): its reward (sampled from the policy at
    the round's start) and how far its updates moved the policy (the last inner epoch's ratio statistics)."""
    rows = [h for h in history if h.get("round") == merged["round"]]
    last = [h for h in rows if h["epoch"] == max(x["epoch"] for x in rows)]
    mean = lambda k: math.fsum(h.get(k, 0.0) for h in last) / len(last)
    rw = torch.tensor([s["reward"] for s in merged["samples"]], dtype=torch.float64)
    return {"round": merged["round"], "samples": len(rw), "pairs": merged["pairs"], "fused": merged["fused"],
            "processes": merged["processes"], "reward_mean": float(rw.mean()),
            **{k: merged.get(k, 0) for k in ("fused_steps", "fused_steps_dropped", "plain_steps_dropped")},
            "reward_std": float(rw.std(unbiased=False)),
            "optimizer_steps": len(rows), "loss": math.fsum(h["loss"] for h in rows) / len(rows),
            "ratio": mean("ratio"), "approx_kl": mean("approx_kl"), "clipfrac": mean("clipfrac"),
            **({"kl": mean("kl")} if "kl" in last[0] else {}),
            "sample_s": round(merged["sample_s"], 3), "train_s": round(train_s, 3)}


def train_on_policy(model: LoadedModel, prompts: list[str], scorer, cfg: OnPolicyConfig, out_dir: str | Path,
                    sampling: SamplingParams | None = None, fusion: FusionParams | None = None,
                    pairing: PairingParams | None = None, resume: bool = True, progress: bool = True) -> dict:
    """Run on-policy rounds (data-parallel under `accelerate launch`); returns the same summary on every process
    (out, rounds done, optimizer steps, processes, per-round rows over all processes)."""
    trainer = OnPolicyTrainer(model, prompts, scorer, cfg, out_dir, sampling, fusion, pairing)
    res = trainer.run(resume=resume, progress=progress)
    return {"out": str(res.out_dir), "rounds": trainer.round, "steps": res.steps,
            "processes": trainer.acc.num_processes, "per_round": trainer.rounds}
