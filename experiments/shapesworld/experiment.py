"""The paper's claim, checked with ground truth: do D-Fusion pairs align a model better than random pairs?

    python -m experiments.shapesworld.experiment --out runs/experiment --part calibrate     # the budget, train prompts
    python -m experiments.shapesworld.experiment --out runs/experiment --report docs/RESULTS.md   # the headline
    python -m experiments.shapesworld.experiment --out runs/experiment --part ablations --report docs/RESULTS.md
    python -m experiments.shapesworld.experiment --out /tmp/smoke --smoke                         # minutes, same code

Every arm trains on the same TRAIN prompts with the same budget. DPO trains offline on a fixed pair set: random
pairs (candidates paired at random, the better one wins; the paper's baseline), D-Fusion pairs (fused targets over
bases) or the paper's control (the same references over the same bases, unfused: it differs from D-Fusion in
visual consistency alone), all built from the very same candidates and cut to one size. `label_by` says who picks
and labels: the world's checker (default: an oracle reward, so the question is consistency, not reward quality)
or the CLIP scorer (as the paper ran it). The primary endpoint, stated before any run: TEST prompts, all families,
DPO on D-Fusion pairs minus DPO on the control pairs, checker accuracy (experiment_report.PRIMARY), with a
two-stage bootstrap over training seeds and prompts and Holm over the family cells. DDPO and DPOK run as their papers do,
in on-policy rounds (training/onpolicy.py): each round samples fresh candidates from the current policy, pairs them
(random arm: plain samples; D-Fusion arm: fused targets and their bases), scores them and trains PPO-clip /
clipped PG + KL on them. The headline repeats every trained arm over several training seeds (LoRA start, batch
order, noise and, on-policy, the rounds' samples).

Evaluation, the same seeds for every arm: TRAIN prompts with held-out seeds (the seeds the model was trained on
are hashes of the prompt; these are not) and TEST prompts (combinations never trained on), per family: checker
accuracy, CLIP score and diversity with 95% bootstrap intervals over prompts; each arm's movement from the base
model and D-Fusion minus random as paired differences on the same prompts and seeds (pooled over training seeds,
and per seed). Before any training, the pair signal of every pair set (training/pair_signal.py). The budget is
chosen on TRAIN prompts only (`--part calibrate`: the random arms of the first seed, which the headline reuses).

Resumable: pair sets and per-arm results are written as they finish and are reused on a re-run. `--workers N`
runs arms in N processes (one torch thread each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dfusion_core.engine.config import FusionParams, MaskParams, SamplingParams, apply_model_defaults, fusion_defaults
from dfusion_core.engine.loading import LoadedModel
from dfusion_core.pairs.build import (PairingParams, PairRecord, build_control_pairs, build_pairs, build_random_pairs,
                                     load_pairs, save_pairs)
from dfusion_core.worlds.shapesworld import check_images
from dfusion_core.worlds.shapesworld.evaluate import evaluate
from dfusion_core.worlds.shapesworld.world import FAMILIES, stratified_prompt_list


PARTS = ("calibrate", "headline", "ablations")
LABEL_RULES = ("scorer", "checker")
OFFLINE_ALGOS = ("dpo", "sft")  # arms trained on a fixed pair set (sft: on its winners)
RL_LOSS_ABLATIONS = ("drawable-steps", "per-prompt-advantages")  # on-policy ablations that change the training, not the fusion


@dataclass(frozen=True)
class ExperimentConfig:
    """One budget for every arm, sized for the SD3-shaped default on 2 CPU cores (the headline <= 90 minutes)."""

    # ---- prompts and pair sets: every algorithm trains on the same TRAIN prompts
    train_prompts: int = 16  # TRAIN prompts per family (dealt in turn from each relation / texture: spans them all)
    val_prompts: int = 6  # validation prompts per family: TRAIN-split prompts never trained on (0: none)
    num_candidates: int = 16  # candidates per prompt for the offline pair sets (paper: 16 -> 8 pairs a prompt)
    num_steps: int = 20  # sampling steps everywhere (paper: 20)
    pair_seed: int = 0  # candidate seeds of the offline pair sets
    # who picks references and bases and labels the offline pairs: "checker" (the world's ground truth, an oracle
    # reward: the question is consistency, not reward quality) or "scorer" (the CLIP scorer, as the paper ran it)
    label_by: str = "checker"
    # the offline DPO arms: random pairs, D-Fusion pairs (fused target over base) and the paper's control, the same
    # (reference, base) pairs left unfused (reference over base): D-Fusion minus control isolates consistency
    dpo_kinds: tuple[str, ...] = ("random", "dfusion", "control")
    # ---- DPO, offline on a fixed pair set, at the references' budget (Diffusion-DPO / D-Fusion: beta 5000, lr
    # 1e-4). The first round's lr 1e-3 at beta 500 over 50 epochs made every arm worse (docs/results_extra.md).
    # `--part calibrate` trains the positive control (random pairs labelled by the checker: oracle pairs) at each
    # of dpo_lrs and keeps the lr whose best checkpoint scores highest on the validation prompts (budget.json);
    # every DPO arm then trains at that lr, validated every val_every steps, and is evaluated at its best checkpoint
    dpo_steps: int = 600  # at most this many optimizer steps ...
    dpo_epochs: float = 10.0  # ... and at most this many passes over the pair set
    dpo_batch: int = 8  # pairs per step
    dpo_lr: float = 1e-4  # AdamW; the headline's lr until --part calibrate has written budget.json
    dpo_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # the learning rates --part calibrate compares
    # the positive control's second form (--part calibrate): SFT, the denoising loss on the oracle set's winners
    # (the model's own checker-correct samples), at each of these lrs; () = none. It passes where DPO's preference
    # signal is too weak to move a model, and shows whether the evaluation can see a move. Its own, larger budget
    # (a step costs a third of a DPO step, and a control is there to find any budget that moves the model), with
    # the same validation and early stopping
    sft_lrs: tuple[float, ...] = (3e-4, 1e-3)
    sft_steps: int = 1000
    sft_epochs: float = 50.0
    dpo_rank: int = 16  # LoRA rank on attention
    dpo_beta: float = 5000.0  # Diffusion-DPO beta, beta/2 convention (the paper's, for SD 1.5)
    val_every: int = 50  # DPO: checkpoint and validation accuracy every N steps (0: no early stopping)
    val_seeds: int = 6  # seeds per validation prompt at each checkpoint (the final report uses eval_train_seeds)
    patience: int = 3  # checkpoints without a better validation accuracy before an arm stops
    # ---- DDPO and DPOK, on-policy rounds, at the references' settings (Flow-GRPO / ddpo-pytorch): lr 3e-4, PPO
    # clip 1e-4, one pass over a round's samples, a dual clip (the first round's lr 5e-3 and clip 0.1 moved the
    # model by noise, and one run's ratio reached 5e5), DPOK's KL 0.04 on Flow-GRPO's scale (flow models; the
    # exact per-step KL on a UNet)
    rounds: int = 3  # sample -> pair -> score -> train rounds
    round_candidates: int = 8  # fresh candidates per prompt per round
    rl_batch: int = 8  # trajectories per optimizer step
    rl_lr: float = 3e-4
    rl_clip: float = 1e-4  # PPO clip range
    rl_dual_clip: float = 3.0  # a negative advantage's loss capped at 3 x |A| (0: off)
    rl_kl: float = 0.04  # DPOK's KL coefficient
    rl_kl_scale: str = "flow_grpo"  # flow_grpo (x the step's sigma decrement; flow models) | exact
    inner_epochs: int = 1  # passes over a round's samples
    steps_per_trajectory: int = 5  # denoising steps trained per trajectory and pass (random ones; 0 = all)
    max_step_residual: float = 0.0  # TrainConfig's: 0 = every step of a fused target trained (the paper)
    advantage_groups: str = "prompt-kind"  # OnPolicyConfig's: plain draws and fused targets normalised apart
    rl_rank: int = 4  # LoRA rank on attention (paper)
    # ---- evaluation: the same seeds for every arm
    # (intervals resample prompts, so prompts buy more than seeds: 16 TRAIN and 6 validation prompts a family)
    eval_train_seeds: int = 4  # held-out seeds per TRAIN and per validation prompt (16 + 6 prompts a family)
    eval_prompts: int = 24  # TEST prompts per family (dealt in turn from each relation / texture)
    eval_seeds: int = 4  # seeds per TEST prompt (more prompts, fewer seeds: the interval resamples prompts)
    eval_seed: int = 1  # evaluation seeds derive from it (never a candidate seed: those are prompt hashes)
    algos: tuple[str, ...] = ("dpo", "ddpo", "dpok")
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds: every trained arm of the headline runs once per seed
    # ---- ablations (--part ablations): DPO on D-Fusion pairs built with one setting changed, or trained with the
    # mask-weighted loss
    ablations: tuple[str, ...] = ("no-mask", "early", "late", "union", "reference-only", "masked-loss")
    ablation_seeds: tuple[int, ...] = (0,)  # training seeds of the ablation arms and the arms they are read against
    # DDPO on-policy rounds whose D-Fusion targets are fused with one setting changed (no-hold: the target's
    # latents outside the mask not held on the base's trajectory, so its steps are the fused sampler's own), or
    # trained without the steps the plain policy would not draw (drawable-steps: max_step_residual 2), or with
    # advantages normalised per prompt over targets and bases together (per-prompt-advantages)
    rl_ablations: tuple[str, ...] = ("no-hold",)

    @classmethod
    def smoke(cls) -> "ExperimentConfig":
        return cls(label_by="scorer", dpo_kinds=("random", "dfusion"), train_prompts=1, val_prompts=0,
                   num_candidates=4, num_steps=4, dpo_steps=2, dpo_batch=2, dpo_lr=1e-3, dpo_lrs=(1e-3,), sft_lrs=(),
                   sft_steps=2, algos=("dpo", "ddpo"), rl_kl_scale="exact", rounds=1,
                   round_candidates=4, rl_batch=2, steps_per_trajectory=1, eval_train_seeds=2, eval_prompts=1,
                   eval_seeds=2, seeds=(0,), ablations=("no-mask", "masked-loss"), rl_ablations=("no-hold",))


@dataclass(frozen=True)
class Arm:
    """One trained (or the base) model of the experiment."""

    algo: str | None  # dpo | ddpo | dpok | sft (the calibration's second positive control); None = the base model
    kind: str | None = None  # random | dfusion | control (DPO only: the D-Fusion pairs' references unfused)
    seed: int | None = None  # training seed
    ablation: str | None = None  # DPO on D-Fusion pairs with this setting changed (fusion_variants / masked-loss)
    lr: float | None = None  # DPO at this learning rate (--part calibrate); None = the experiment's budget

    @property
    def name(self) -> str:
        if self.algo is None:
            return "base"
        lr = f"@lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.algo}/{self.kind}{'-' + self.ablation if self.ablation else ''}{lr}/s{self.seed}"

    @property
    def group(self) -> str:
        """The name without the seed: the runs of one arm over training seeds."""
        return self.name.rsplit("/s", 1)[0]

    @property
    def pair_set(self) -> str | None:
        """The offline pair set it trains on (DPO and SFT only)."""
        if self.algo not in OFFLINE_ALGOS:
            return None
        if self.ablation and self.ablation != "masked-loss":
            return f"dfusion-{self.ablation}"
        return self.kind


def fusion_variants(base: FusionParams, num_steps: int, names) -> dict[str, FusionParams]:
    """The D-Fusion pair sets by name: 'dfusion' = the model's fusion form (its dfusion.json over the paper's
    defaults) and one 'dfusion-<ablation>' per fusion ablation ('masked-loss' changes the loss, not the pairs)."""
    half = max(base.start_step, num_steps // 2)
    table = {
        "no-mask": replace(base, use_mask=False),  # global fusion
        "early": replace(base, end_step=half),  # the first half of the fused steps only
        "late": replace(base, start_step=min(half + 1, num_steps), end_step=num_steps),
        "relative": replace(base, mask=replace(base.mask, threshold_mode="relative", threshold=0.5)),
        "area": replace(base, mask=replace(base.mask, threshold_mode="area", threshold=0.25)),
        "union-base": replace(base, mask=replace(base.mask, union_base=True)),
        "reference-only": replace(base, mask=replace(base.mask, union_base=False)),  # for a union-base default
        "no-hold": replace(base, hold_outside=False),  # the target's latents outside the mask not held
        "union": replace(base, mask=replace(base.mask, combine="union")),  # the paper's: OR of per-keyword masks
    }
    unknown = [n for n in names if n not in table and n != "masked-loss"]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {sorted([*table, 'masked-loss'])}")
    return {"dfusion": base} | {f"dfusion-{n}": table[n] for n in names if n in table}


class Experiment:
    def __init__(self, model: LoadedModel, scorer, cfg: ExperimentConfig, out: str | Path,
                 sampling: SamplingParams | None = None, log=print):
        self.model, self.scorer, self.cfg, self.out, self.log = model, scorer, cfg, Path(out), log
        s, mask = apply_model_defaults(model.defaults, SamplingParams(num_steps=cfg.num_steps), MaskParams())
        self.sampling = (sampling or s).validate()
        self.fusion = fusion_defaults(model.defaults, mask).validate(self.sampling.num_steps)  # the model's form
        if cfg.label_by not in LABEL_RULES:
            raise ValueError(f"label_by must be one of {', '.join(LABEL_RULES)}, got {cfg.label_by!r}")
        self.pairing = PairingParams(num_candidates=cfg.num_candidates, seed=cfg.pair_seed,
                                     pick="checker" if cfg.label_by == "checker" else "scorer").validate()
        # TRAIN prompts spanning every relation and texture; validation prompts after them (never trained on)
        self.prompt_lists = {
            "train": {f: stratified_prompt_list(f, "train", cfg.train_prompts) for f in FAMILIES},
            "validation": {f: stratified_prompt_list(f, "train", cfg.val_prompts, offset=cfg.train_prompts)
                           for f in FAMILIES},
            "test": {f: stratified_prompt_list(f, "test", cfg.eval_prompts) for f in FAMILIES}}
        self.train_prompts = [p.text for f in FAMILIES for p in self.prompt_lists["train"][f]]
        self._candidates: dict = {}

    # ---- pair sets ------------------------------------------------------------------------------
    def pair_set_names(self, part: str) -> list[str]:
        """The pair sets a part trains on. Calibrate's positive control needs the random set only (uncut: the
        D-Fusion set, whose size the headline cuts every set to, is not built for it)."""
        if part == "calibrate":
            return ["random"] if "dpo" in self.cfg.algos or self.cfg.sft_lrs else []
        names = list(dict.fromkeys(["random", "dfusion", *self.cfg.dpo_kinds])) if "dpo" in self.cfg.algos \
            or part == "ablations" else []
        if part == "ablations":
            names += [n for n in fusion_variants(self.fusion, self.sampling.num_steps, self.cfg.ablations)
                      if n != "dfusion"]
        return names

    def pair_sets(self, names: list[str]) -> dict[str, list[PairRecord]]:
        """The named pair sets (random, dfusion, dfusion-<ablation>) from one set of candidates, each cut to one
        common size (a fixed random subset); the signal of the cut set is written beside it."""
        variants = fusion_variants(self.fusion, self.sampling.num_steps, self.cfg.ablations)
        sets = {}
        for name in names:
            folder = self.out / "pairs" / name
            if (folder / "pairs.jsonl").is_file():
                sets[name] = load_pairs(folder)
                continue
            t0 = time.time()
            recs = self._build_set(name, variants, sets)
            save_pairs(recs, folder)
            self.log(f"pairs {name}: {len(recs)} in {time.time() - t0:.0f}s")
            sets[name] = recs
        size = self.common_size(sets)
        out = {}
        for name, recs in sets.items():  # each set's cut depends on its name only, whatever else is loaded
            # the control is cut as its D-Fusion set is (one to one while neither drops a pair): the same pairs
            key = "dfusion" if name == "control" and len(recs) == len(sets.get("dfusion", [])) else name
            rng = np.random.default_rng([self.cfg.pair_seed, zlib.crc32(key.encode())])
            keep = sorted(rng.permutation(len(recs))[:size]) if len(recs) > size else range(len(recs))
            out[name] = [recs[i] for i in keep]
            self._write_signal(name, out[name])
        return out

    def _build_set(self, name: str, variants: dict, sets: dict) -> list[PairRecord]:
        """One pair set from the shared candidates: random, control (from the D-Fusion set) or a D-Fusion form."""
        check = check_images if self.cfg.label_by == "checker" else None  # (images, prompt) -> pass / fail
        if name == "random":
            return build_random_pairs(self.model, self.train_prompts, self.scorer, self.sampling, self.pairing,
                                      candidates=self._candidates, check=check)
        if name == "control":
            fused = sets["dfusion"] if "dfusion" in sets else self.pair_sets(["dfusion"])["dfusion"]
            return build_control_pairs(self.model, fused, self.sampling, self.pairing, candidates=self._candidates)
        return build_pairs(self.model, self.train_prompts, self.scorer, self.sampling, variants[name], self.pairing,
                           candidates=self._candidates, check=check)

    def common_size(self, sets: dict[str, list[PairRecord]]) -> int:
        """The size every pair set is cut to: the smaller of the random and D-Fusion sets (an ablation set that
        comes out smaller keeps all its pairs; the report gives each set's count)."""
        sizes = [len(sets[n]) if n in sets else len(load_pairs(self.out / "pairs" / n, with_images=False))
                 for n in ("random", "dfusion") if n in sets or (self.out / "pairs" / n / "pairs.jsonl").is_file()]
        size = min(sizes) if sizes else min(len(v) for v in sets.values())
        if size < 2:
            raise ValueError(f"only {size} pairs could be built; raise train_prompts or num_candidates")
        return size

    def _write_signal(self, name: str, records: list[PairRecord]) -> None:
        from dfusion_core.training.pair_signal import pair_signal
        from dfusion_core.worlds.shapesworld import check_images

        path = self.out / "pairs" / name / "signal.json"
        if not path.is_file():
            path.write_text(json.dumps(pair_signal(records, check_images).as_dict()))

    # ---- arms -------------------------------------------------------------------------------------
    def arms(self, part: str) -> list[Arm]:
        """The arms of a part: calibrate = the random arms of the first seed; headline = base + every algorithm x
        {random, D-Fusion} x seed; ablations = DPO per ablation (and the D-Fusion / random DPO arms it is read
        against) x ablation seed."""
        first = self.cfg.seeds[0]
        if part == "calibrate":  # the positive control at each candidate lr, and the on-policy random arms
            dpo = [Arm("dpo", "random", first, lr=lr) for lr in self.cfg.dpo_lrs] if "dpo" in self.cfg.algos else []
            sft = [Arm("sft", "random", first, lr=lr) for lr in self.cfg.sft_lrs]
            return [Arm(None)] + dpo + sft + [Arm(a, "random", first) for a in self.cfg.algos if a != "dpo"]
        if part == "headline":
            return [Arm(None)] + [Arm(a, k, s) for s in self.cfg.seeds for a in self.cfg.algos
                                  for k in (self.cfg.dpo_kinds if a == "dpo" else ("random", "dfusion"))]
        if part == "ablations":
            # the ablations first; the arms they are read against (the headline's, reused when finished) last
            seeds = self.cfg.ablation_seeds
            algos = ("dpo", "ddpo") if self.cfg.rl_ablations else ("dpo",)
            refs = [Arm(algo, k, s) for s in seeds for algo in algos for k in ("random", "dfusion")]
            return [Arm(None)] + [Arm("dpo", "dfusion", s, a) for s in seeds for a in self.cfg.ablations] + \
                [Arm("ddpo", "dfusion", s, a) for s in seeds for a in self.cfg.rl_ablations] + refs
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")

    def evaluate(self, test: bool = True) -> dict:
        """{"train": report on the TRAIN prompts (held-out seeds), "validation": on TRAIN-split prompts never
        trained on (what a budget is chosen by), "test": on TEST prompts (unless test=False: a calibration arm is
        read on validation only, and TEST, half an evaluation's samples, is left to the headline)}."""
        c, s, lists = self.cfg, self.cfg.eval_seed, self.prompt_lists
        seeds = {"train": c.eval_train_seeds, "validation": c.eval_train_seeds, "test": c.eval_seeds}
        return {split: evaluate(self.model, self.scorer, "test" if split == "test" else "train", 0, seeds[split],
                                self.sampling, seed=s, localise=False, prompt_lists=lists[split])
                for split in self.splits(test)}

    def splits(self, test: bool = True) -> list[str]:
        """The splits an evaluation reads: validation where there are validation prompts, TEST unless test=False
        (then only where nothing else would choose a budget)."""
        c = self.cfg
        return [x for x in ("train", "validation", "test") if (x != "validation" or c.val_prompts)
                and (x != "test" or test or not c.val_prompts)]

    def validation_accuracy(self, trainer) -> dict:
        """Early stopping's score at a checkpoint: checker accuracy on the validation prompts (val_seeds each)."""
        c = self.cfg
        rep = evaluate(self.model, None, "train", 0, c.val_seeds, self.sampling, seed=c.eval_seed + 1000,
                       localise=False, prompt_lists=self.prompt_lists["validation"])
        return {"score": rep["families"]["all"]["accuracy"],
                **{f"val_{f}": rep["families"][f]["accuracy"] for f in FAMILIES}}

    def dpo_lr(self) -> float:
        """The headline's DPO learning rate: the one --part calibrate chose (budget.json), else dpo_lr."""
        path = self.out / "budget.json"
        lr = json.loads(path.read_text()).get("lr") if path.is_file() else None
        return self.cfg.dpo_lr if lr is None else float(lr)

    def choose_budget(self) -> dict | None:
        """After --part calibrate: the DPO lr whose positive control (oracle pairs) scores highest on the validation
        prompts at its best checkpoint, and whether a positive control (DPO at that lr, or SFT on the oracle
        winners at any lr) beat the base outside its interval."""
        from .statistics import paired_difference

        base_path = self.arm_path(Arm(None))
        arms = [a for a in self.arms("calibrate") if a.lr is not None and self.arm_path(a).is_file()]
        if not arms or not base_path.is_file() or not self.cfg.val_prompts:
            return None
        base = json.loads(base_path.read_text())["reports"]["validation"]["rows"]
        tried = []
        for a in arms:
            r = json.loads(self.arm_path(a).read_text())
            move = paired_difference(r["reports"]["validation"]["rows"], base, "all")
            tried.append({"algo": a.algo, "lr": a.lr, "best_step": r["train"].get("best_step"),
                          "steps": r["train"]["steps"],
                          "validation_accuracy": r["reports"]["validation"]["families"]["all"]["accuracy"],
                          "checkpoints": {v["step"]: v["score"] for v in r["train"].get("validations") or []},
                          "movement": move})
        passes = lambda rows: any((t["movement"]["ci95"][0] or 0) > 0 for t in rows) if rows else None
        dpo, sft = ([t for t in tried if t["algo"] == algo] for algo in ("dpo", "sft"))
        best = max(dpo, key=lambda t: t["validation_accuracy"]) if dpo else {"lr": None}  # no DPO arm: no lr chosen
        budget = {**best, "dpo_control_passes": passes([best] if dpo else []), "sft_control_passes": passes(sft),
                  "tried": tried, "base_validation_accuracy": json.loads(base_path.read_text())["reports"]
                  ["validation"]["families"]["all"]["accuracy"]}
        budget["positive_control_passes"] = bool(budget["dpo_control_passes"] or budget["sft_control_passes"])
        (self.out / "budget.json").write_text(json.dumps(budget, indent=1))
        return budget

    def arm_path(self, arm: Arm) -> Path:
        return self.out / "arms" / (arm.name.replace("/", "__") + ".json")

    def run_arm(self, arm: Arm, records: list[PairRecord] | None = None) -> dict:
        """Train (unless the base) and evaluate one arm; its result is written to arms/ and reused on a re-run."""
        path = self.arm_path(arm)
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        if arm.algo is None:
            train, reports = None, self.evaluate()
        elif arm.algo in ("ddpo", "dpok"):
            train, reports = self._on_policy(arm)  # (calibrate's on-policy arms are read on TEST too: no lr chosen)
        else:
            if records is None:
                records = self.pair_sets([arm.pair_set])[arm.pair_set]
            train, reports = self._offline(arm, records)
        result = {"arm": arm.name, "group": arm.group, **asdict(arm), "pairs": None if records is None else len(records),
                  "seconds": time.time() - t0, "train": train, "reports": reports}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        split = "test" if "test" in reports else "validation"
        fams = reports[split]["families"]
        self.log(f"{arm.name}: {split} " + ", ".join(f"{f} {fams[f]['accuracy']:.3f}" for f in fams) +
                 f" ({result['seconds']:.0f}s)")
        return result

    def _offline(self, arm: Arm, records: list[PairRecord]) -> tuple[dict, dict]:
        """DPO at the budget (arm.lr or the calibrated one), validated every val_every steps with early stopping;
        evaluated at its best validated checkpoint."""
        from dfusion_core.training.data import pairs_from_records
        from dfusion_core.training.trainer import TrainConfig, Trainer

        c = self.cfg
        cap, epochs = (c.sft_steps, c.sft_epochs) if arm.algo == "sft" else (c.dpo_steps, c.dpo_epochs)
        steps = max(1, min(cap, math.ceil(epochs * len(records) / c.dpo_batch)))
        validate = self.validation_accuracy if c.val_prompts and c.val_every else None
        tc = TrainConfig(algo=arm.algo, steps=steps, batch_size=c.dpo_batch, lr=arm.lr or self.dpo_lr(),
                         lora_rank=c.dpo_rank, dpo_beta=c.dpo_beta, seed=arm.seed,
                         ckpt_every=min(c.val_every, steps) if validate else steps, patience=c.patience,
                         val_fraction=0.0,  # every pair is trained on: validation is on prompts never trained on
                         dpo_outside_weight=0.0 if arm.ablation == "masked-loss" else 1.0)
        tr = Trainer(self.model, pairs_from_records(records), tc, self.out / "train" / arm.name.replace("/", "__"))
        try:
            history = tr.run(resume=True, progress=False, validate=validate).history
            best = tr.restore_best() if validate else None
            tr.net.eval()
            reports = self._base_reports(arm.lr is None) if best == 0 else None
            reports = reports or self.evaluate(test=arm.lr is None)
        finally:
            tr.unload()
        keys = ("loss", "implicit_acc", "reward_margin")
        mean = lambda rows, k: float(np.mean([h[k] for h in rows])) if rows and k in rows[0] else None
        return {"config": asdict(tc), "first_rows": {k: mean(history[:10], k) for k in keys},
                "last_rows": {k: mean(history[-10:], k) for k in keys}, "steps": tr.step, "best_step": best,
                "validations": tr.validations}, reports

    def _base_reports(self, test: bool) -> dict | None:
        """An arm whose best checkpoint is step 0 is the plain model: the base arm's reports (the same samples,
        evaluated with the same seeds) instead of sampling them again; None until the base arm is done."""
        path = self.arm_path(Arm(None))
        if not path.is_file():
            return None
        reports = json.loads(path.read_text())["reports"]
        return {k: reports[k] for k in self.splits(test)}

    def on_policy_config(self, arm: Arm) -> tuple:
        """(OnPolicyConfig, fusion form or None) of an on-policy arm: the budget, with its ablation applied."""
        from dfusion_core.training.onpolicy import OnPolicyConfig

        c = self.cfg
        fusion = None if arm.kind == "random" else self.fusion
        if arm.ablation and arm.ablation not in RL_LOSS_ABLATIONS:
            fusion = fusion_variants(self.fusion, self.sampling.num_steps, [arm.ablation])[f"dfusion-{arm.ablation}"]
        oc = OnPolicyConfig(algo=arm.algo, arm=arm.kind, rounds=c.rounds, batch_size=c.rl_batch, lr=c.rl_lr,
                            clip_eps=c.rl_clip, dual_clip=c.rl_dual_clip, kl_coef=c.rl_kl, kl_scale=c.rl_kl_scale,
                            lora_rank=c.rl_rank, inner_epochs=c.inner_epochs,
                            steps_per_trajectory=c.steps_per_trajectory, seed=arm.seed, ckpt_every=10 ** 6,
                            max_step_residual=2.0 if arm.ablation == "drawable-steps" else c.max_step_residual,
                            advantage_groups="prompt" if arm.ablation == "per-prompt-advantages"
                            else c.advantage_groups)
        return oc, fusion

    def _on_policy(self, arm: Arm) -> tuple[dict, dict]:
        from dfusion_core.training.onpolicy import OnPolicyTrainer

        c = self.cfg
        oc, fusion = self.on_policy_config(arm)
        # the rounds' candidates differ by training seed; round r's pairing seed derives from this one
        pairing = PairingParams(num_candidates=c.round_candidates, seed=c.pair_seed * 1000 + 7 + arm.seed)
        tr = OnPolicyTrainer(self.model, self.train_prompts, self.scorer, oc,
                             self.out / "train" / arm.name.replace("/", "__"), self.sampling, fusion, pairing)
        try:
            res = tr.run(resume=True, progress=False)
            tr.net.eval()
            reports = self.evaluate()
        finally:
            tr.unload()
        keep = ("round", "samples", "pairs", "fused", "reward_mean", "reward_std", "optimizer_steps", "loss", "ratio",
                "approx_kl", "clipfrac", "kl", "sample_s", "train_s")
        return {"config": asdict(oc), "rounds": [{k: r.get(k) for k in keep if k in r} for r in tr.rounds],
                "steps": res.steps}, reports

    # ---- the run ----------------------------------------------------------------------------------
    def run(self, part: str = "headline", workers: int = 1, worker_spec: dict | None = None,
            finished_only: bool = False) -> dict:
        """Run a part's arms (with finished_only, only report those already done) and write results.json."""
        t0 = time.time()
        arms = self.arms(part)
        if not finished_only:
            if workers > 1:
                run_in_processes(self, arms, part, workers, worker_spec or {})
            else:
                sets = self.pair_sets(self.pair_set_names(part)) if any(a.pair_set for a in arms) else {}
                for arm in arms:
                    self.run_arm(arm, sets.get(arm.pair_set))
        from .experiment_report import summarise

        if part == "calibrate":
            budget = self.choose_budget()
            if budget:
                verdict = lambda v: "-" if v is None else "passes" if v else "does not pass"
                chosen = "none (no DPO arm)" if budget["lr"] is None else \
                    f"{budget['lr']:g} (validation {budget['validation_accuracy']:.3f})"
                self.log(f"budget: DPO lr {chosen}, base {budget['base_validation_accuracy']:.3f}; positive control: "
                         f"DPO {verdict(budget['dpo_control_passes'])}, SFT {verdict(budget['sft_control_passes'])}")
        results = {a.name: json.loads(self.arm_path(a).read_text()) for a in arms if self.arm_path(a).is_file()}
        signals = {n: json.loads(p.read_text()) for n in self.pair_set_names(part)
                   if (p := self.out / "pairs" / n / "signal.json").is_file()}
        summary = summarise(self, part, results, signals, time.time() - t0)
        (self.out / f"results-{part}.json").write_text(json.dumps(summary, indent=1))
        return summary


# ---- several processes ------------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_init(spec: dict) -> None:
    """A worker process: one torch thread, its own model and scorer, the same experiment."""
    from dfusion_core.engine.loading import load_model
    from dfusion_core.pairs.scoring import make_scorer

    torch.set_num_threads(1)
    model = load_model(spec.get("model"), device="cpu")
    _WORKER["exp"] = Experiment(model, make_scorer(spec.get("scorer")), ExperimentConfig(**spec["config"]),
                                spec["out"], log=lambda m: print(f"[{os.getpid()}] {m}", flush=True))


def _worker_pairs(names: list[str]) -> None:
    _WORKER["exp"].pair_sets(names)


def _worker_arm(arm: Arm) -> str:
    _WORKER["exp"].run_arm(arm)
    return arm.name


def run_in_processes(exp: Experiment, arms: list[Arm], part: str, workers: int, spec: dict) -> None:
    """The part's arms over `workers` processes: the pair sets and the base first, the long on-policy arms next
    (D-Fusion before random), the offline arms once their pair sets exist."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    todo = [a for a in arms if not exp.arm_path(a).is_file()]
    spec = {**spec, "config": asdict(exp.cfg), "out": str(exp.out)}
    names = exp.pair_set_names(part) if any(a.pair_set for a in todo) else []
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(spec,)) as pool:
        ready = pool.submit(_worker_pairs, names) if names else None
        first = [a for a in todo if a.pair_set is None]
        first.sort(key=lambda a: (a.algo is not None, a.kind != "dfusion"))
        futures = [pool.submit(_worker_arm, a) for a in first]
        if ready is not None:
            ready.result()
        futures += [pool.submit(_worker_arm, a) for a in todo if a.pair_set is not None]
        for f in futures:
            f.result()


def _config_from_args(ap: argparse.ArgumentParser, a) -> ExperimentConfig:
    base = ExperimentConfig.smoke() if a.smoke else ExperimentConfig()
    cfg = replace(base, **{f: tuple(v) if isinstance(v, list) else v for f in asdict(base)
                           if (v := getattr(a, f, None)) is not None})
    from dfusion_core.training.trainer import ALGOS

    bad = [x for x in cfg.algos if x not in ("dpo", "ddpo", "dpok")]
    if bad:
        ap.error(f"--algos: unknown {bad}; choose from dpo ddpo dpok (of {' '.join(ALGOS)}, traj-dpo is not an arm)")
    try:
        fusion_variants(FusionParams(), cfg.num_steps, cfg.ablations)
    except ValueError as e:
        ap.error(f"--ablations: {e}")
    try:
        fusion_variants(FusionParams(), cfg.num_steps, [a for a in cfg.rl_ablations if a not in RL_LOSS_ABLATIONS])
    except ValueError as e:
        ap.error(f"--rl-ablations: {e}")
    if "masked-loss" in cfg.rl_ablations:
        ap.error("--rl-ablations: masked-loss is a DPO loss; on-policy ablations change the fusion or the steps")
    if cfg.label_by not in LABEL_RULES:
        ap.error(f"--label-by must be one of {', '.join(LABEL_RULES)}, got {cfg.label_by!r}")
    if not cfg.dpo_kinds or set(cfg.dpo_kinds) - {"random", "dfusion", "control"} or \
            ("control" in cfg.dpo_kinds and "dfusion" not in cfg.dpo_kinds):
        ap.error(f"--dpo-kinds: some of random dfusion control (control needs dfusion), got {list(cfg.dpo_kinds)}")
    if cfg.advantage_groups not in ("prompt-kind", "prompt"):
        ap.error(f"--advantage-groups must be prompt-kind or prompt, got {cfg.advantage_groups!r}")
    if cfg.rl_kl_scale not in ("flow_grpo", "exact") or not 0 < cfg.rl_clip < 1 or cfg.rl_kl < 0 or \
            not (cfg.rl_dual_clip == 0 or cfg.rl_dual_clip > 1):
        ap.error("--rl-kl-scale must be flow_grpo or exact, --rl-clip in (0, 1), --rl-kl >= 0, --rl-dual-clip 0 or > 1")
    if not (cfg.max_step_residual == 0 or cfg.max_step_residual >= 1):
        ap.error(f"--max-step-residual must be 0 or >= 1, got {cfg.max_step_residual}")
    for f in ("train_prompts", "num_candidates", "num_steps", "dpo_steps", "sft_steps", "dpo_batch", "rounds", "round_candidates",
              "rl_batch", "inner_epochs", "dpo_rank", "rl_rank", "eval_train_seeds", "eval_prompts", "eval_seeds"):
        if getattr(cfg, f) < 1:
            ap.error(f"--{f.replace('_', '-')} must be >= 1, got {getattr(cfg, f)}")
    if cfg.val_prompts < 0:
        ap.error(f"--val-prompts must be >= 0, got {cfg.val_prompts}")
    for f in ("seeds", "ablation_seeds"):
        v = getattr(cfg, f)
        if not v or len(set(v)) != len(v) or min(v) < 0:
            ap.error(f"--{f.replace('_', '-')}: distinct integers >= 0, got {list(v)}")
    if not (0 < cfg.dpo_lr < 1 and 0 < cfg.rl_lr < 1) or not cfg.dpo_lrs or \
            not all(0 < x < 1 for x in cfg.dpo_lrs + cfg.sft_lrs):
        ap.error("--dpo-lr, --dpo-lrs, --sft-lrs and --rl-lr must be in (0, 1)")
    if cfg.dpo_epochs <= 0 or cfg.sft_epochs <= 0 or cfg.val_every < 0 or cfg.val_seeds < 1 or cfg.patience < 0:
        ap.error("--dpo-epochs and --sft-epochs must be > 0, --val-every and --patience >= 0, --val-seeds >= 1")
    return cfg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--part", choices=PARTS, default="headline", help="calibrate: the budget on train prompts; "
                    "headline: base + {dpo, ddpo, dpok} x {random, dfusion} x seeds; ablations (default: headline)")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded ShapesWorld model)")
    ap.add_argument("--scorer", default=None, help="scorer (default: the embedded ShapesWorld CLIP)")
    ap.add_argument("--smoke", action="store_true", help="a few minutes: tiny budget, same code path")
    ap.add_argument("--report", default=None, help="also write the markdown report here (e.g. docs/RESULTS.md) with "
                    "every part finished in --out; figures go to results/ beside it")
    ap.add_argument("--workers", type=int, default=1, help="arms run in this many processes, one thread each")
    ap.add_argument("--finished-only", action="store_true", help="report the arms already finished, run nothing new")
    ap.add_argument("--extra", default=None, help="a markdown file appended to the report (e.g. docs/results_extra.md)")
    for f, v in asdict(ExperimentConfig()).items():
        if isinstance(v, (int, float, str)):
            ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=None, help=f"default: {v}")
        elif isinstance(v, tuple):
            typ = type(v[0]) if v and isinstance(v[0], (int, float)) else str
            ap.add_argument("--" + f.replace("_", "-"), nargs="*", type=typ, default=None,
                            help=f"default: {' '.join(map(str, v))}")
    a = ap.parse_args(argv)
    if a.extra and not Path(a.extra).is_file():
        ap.error(f"--extra {a.extra}: no such file")
    if not 1 <= a.workers <= (os.cpu_count() or 1) * 4:
        ap.error(f"--workers must be between 1 and {(os.cpu_count() or 1) * 4}, got {a.workers}")
    cfg = _config_from_args(ap, a)
    from dfusion_core.engine.loading import load_model
    from dfusion_core.pairs.scoring import make_scorer
    from .experiment_report import write_reports

    if a.workers > 1:
        torch.set_num_threads(1)
    model = load_model(a.model, device="cpu" if not torch.cuda.is_available() else None)
    exp = Experiment(model, make_scorer(a.scorer), cfg, a.out)
    exp.run(a.part, a.workers, {"model": a.model, "scorer": a.scorer}, finished_only=a.finished_only)
    command = "python -m experiments.shapesworld.experiment " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:])
    print(write_reports(exp, None if a.finished_only else command, a.report, a.extra))


if __name__ == "__main__":
    main()
