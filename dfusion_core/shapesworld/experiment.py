"""The paper's claim, checked with ground truth: do D-Fusion pairs align a model better than random pairs?

    python -m dfusion_core.shapesworld.experiment --out runs/experiment --report docs/RESULTS.md     # the full comparison
    python -m dfusion_core.shapesworld.experiment --out /tmp/smoke --smoke                            # minutes, same code

Every arm gets the same budget: pairs built by the CLIP scorer from the same candidates of the same TRAIN
prompts (equal pair counts), the same training steps, learning rate, LoRA and seeds. Arms: the base model;
DPO, DDPO and DPOK each on random pairs (the paper's baseline) and on D-Fusion pairs; DPO on D-Fusion pairs
built with ablated settings (no mask, early / late steps, other threshold modes, reference-union-base).
Every arm is evaluated on the TEST prompts (combinations never trained on) with the ground-truth checker and
the CLIP scorer, on the same seeds. Settings are the paper's defaults; nothing is tuned on test prompts.

Resumable: pair sets and per-arm results are written as they finish and are reused on a re-run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..engine.ablation import change_inside_outside, default_ranges, mask_region
from ..engine.config import FusionParams, MaskParams, SamplingParams, apply_model_defaults, fusion_defaults
from ..engine.loading import LoadedModel
from ..engine.pairs import PairingParams, PairRecord, build_pairs, build_random_pairs, load_pairs, save_pairs
from .evaluate import evaluate, grouped_bootstrap
from .world import FAMILIES, prompt_list


@dataclass(frozen=True)
class ExperimentConfig:
    """One budget for every arm (defaults: the paper's training setup, sized for <= 60 min on 2 CPU cores)."""

    train_prompts: int = 4  # train prompts per family that pairs are built from (8 pairs each)
    num_candidates: int = 16  # candidates sampled and scored per prompt (paper: 16)
    num_steps: int = 20  # DDIM steps everywhere (paper: 20)
    train_steps: int = 150  # optimizer steps per arm
    batch_size: int = 4  # pairs (DPO) or trajectories (DDPO, DPOK) per step
    lr: float = 1e-4  # AdamW, LoRA rank 4 on attention (paper)
    lora_rank: int = 4
    eval_prompts: int = 16  # TEST prompts per family
    eval_seeds: int = 3  # seeds per test prompt, the same for every arm
    algos: tuple[str, ...] = ("dpo", "ddpo", "dpok")
    # DPO on D-Fusion pairs built with one setting changed: global fusion, early / late steps only, relative
    # threshold instead of Otsu, reference-union-base mask, the paper's union of per-keyword masks
    ablations: tuple[str, ...] = ("no-mask", "early", "late", "relative", "union-base", "union")
    seed: int = 0

    @classmethod
    def smoke(cls) -> "ExperimentConfig":
        return cls(train_prompts=1, num_candidates=4, num_steps=4, train_steps=2, batch_size=2, eval_prompts=1,
                   eval_seeds=2, ablations=("no-mask",))


def fusion_variants(base: FusionParams, num_steps: int, names) -> dict[str, FusionParams]:
    """The D-Fusion setting and its ablations, by name ('dfusion' = the model's fusion form, its dfusion.json over
    the paper's defaults)."""
    ranges = {name: (a, b) for name, a, b in default_ranges(num_steps)}
    table = {
        "no-mask": replace(base, use_mask=False),  # global fusion
        "early": replace(base, start_step=min(ranges["early"][0], num_steps), end_step=min(ranges["early"][1], num_steps)),
        "late": replace(base, start_step=min(ranges["late"][0], num_steps), end_step=num_steps),
        "relative": replace(base, mask=replace(base.mask, threshold_mode="relative", threshold=0.5)),
        "area": replace(base, mask=replace(base.mask, threshold_mode="area", threshold=0.25)),
        "union-base": replace(base, mask=replace(base.mask, union_base=True)),
        "reference-only": replace(base, mask=replace(base.mask, union_base=False)),  # for a union-base default
        "no-hold": replace(base, hold_outside=False),  # the target's latents outside the mask not held
        "union": replace(base, mask=replace(base.mask, combine="union")),  # the paper's: OR of per-keyword masks
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {sorted(table)}")
    return {"dfusion": base} | {f"dfusion-{n}": table[n] for n in names}


def pair_consistency(records: list[PairRecord]) -> dict:
    """How winner and loser differ: mean |winner - loser| (0..255) over the whole image, and, where a fusion
    mask exists, inside vs outside it. Consistent pairs change the inside and keep the outside."""
    whole, inside, outside, gaps = [], [], [], []
    for r in records:
        w, l = r.images["target"], r.images["base"]
        everything = np.ones(w.size[::-1], dtype=bool)
        whole.append(change_inside_outside(w, l, everything)[0])
        gaps.append(float(r.scores["target"] - r.scores["base"]))
        if r.fusion:  # random pairs are not fused: no mask
            last = r.fusion["end_step"] or r.masks.shape[0]
            i, o = change_inside_outside(w, l, mask_region(r.masks, r.fusion["start_step"], last, w.size[::-1]))
            inside += [i] if not np.isnan(i) else []
            outside += [o] if not np.isnan(o) else []
    mean = lambda v: float(np.mean(v)) if v else None
    return {"pairs": len(records), "score_gap": mean(gaps), "change_whole": mean(whole),
            "change_inside_mask": mean(inside), "change_outside_mask": mean(outside)}


def paired_difference(rows_a: list[dict], rows_b: list[dict], family: str, key: str = "correct",
                      n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same (prompt, seed) samples, with a 95% bootstrap interval resampling prompts."""
    pick = lambda rows: {(r["prompt"], r["seed"]): float(r[key]) for r in rows if family == "all" or r["family"] == family}
    a, b = pick(rows_a), pick(rows_b)
    by_prompt: dict[str, list[float]] = {}
    for k in a.keys() & b.keys():
        by_prompt.setdefault(k[0], []).append(a[k] - b[k])
    if not by_prompt:
        return {"diff": None, "ci95": [None, None]}
    groups = list(by_prompt.values())
    diff = sum(map(sum, groups)) / sum(map(len, groups))
    return {"diff": float(diff), "ci95": list(grouped_bootstrap(groups, n_boot, seed))}


class Experiment:
    def __init__(self, model: LoadedModel, scorer, cfg: ExperimentConfig, out: str | Path,
                 sampling: SamplingParams | None = None, log=print):
        self.model, self.scorer, self.cfg, self.out, self.log = model, scorer, cfg, Path(out), log
        s, mask = apply_model_defaults(model.defaults, SamplingParams(num_steps=cfg.num_steps), MaskParams())
        self.sampling = (sampling or s).validate()
        self.fusion = fusion_defaults(model.defaults, mask).validate(self.sampling.num_steps)  # the model's form
        self.pairing = PairingParams(num_candidates=cfg.num_candidates, seed=cfg.seed).validate()
        self.train_prompts = [p.text for fam in FAMILIES for p in prompt_list(fam, "train", cfg.train_prompts)]
        self._candidates: dict = {}

    # ---- pair sets ------------------------------------------------------------------------------
    def pair_sets(self) -> dict[str, list[PairRecord]]:
        """random + every D-Fusion variant, from one set of candidates; truncated to one common size."""
        variants = fusion_variants(self.fusion, self.sampling.num_steps, self.cfg.ablations)
        sets = {}
        for name in ["random", *variants]:
            folder = self.out / "pairs" / name
            if (folder / "pairs.jsonl").is_file():
                sets[name] = load_pairs(folder)
                continue
            t0 = time.time()
            if name == "random":
                recs = build_random_pairs(self.model, self.train_prompts, self.scorer, self.sampling, self.pairing,
                                          candidates=self._candidates)
            else:
                recs = build_pairs(self.model, self.train_prompts, self.scorer, self.sampling, variants[name],
                                   self.pairing, candidates=self._candidates)
            save_pairs(recs, folder)
            self.log(f"pairs {name}: {len(recs)} in {time.time() - t0:.0f}s")
            sets[name] = recs
        n = min(len(r) for r in sets.values())
        if n < 2:
            raise ValueError(f"only {n} pairs could be built; raise train_prompts or num_candidates")
        rng = np.random.default_rng(self.cfg.seed)
        return {k: [v[i] for i in sorted(rng.permutation(len(v))[:n])] for k, v in sets.items()}

    # ---- arms -------------------------------------------------------------------------------------
    def arms(self) -> list[tuple[str, str | None, str | None]]:
        """(arm name, algorithm, pair set); the base model has neither."""
        out = [("base", None, None)]
        for algo in self.cfg.algos:
            out += [(f"{algo}/random", algo, "random"), (f"{algo}/dfusion", algo, "dfusion")]
        out += [(f"dpo/dfusion-{a}", "dpo", f"dfusion-{a}") for a in self.cfg.ablations]
        return out

    def evaluate(self) -> dict:
        return evaluate(self.model, self.scorer, "test", self.cfg.eval_prompts, self.cfg.eval_seeds, self.sampling,
                        seed=self.cfg.seed)

    def run_arm(self, name: str, algo: str | None, records: list[PairRecord] | None) -> dict:
        from ..training.data import pairs_from_records
        from ..training.trainer import TrainConfig, Trainer

        path = self._arm_path(name)
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        train_log = []
        if algo is None:
            report = self.evaluate()
        else:
            tc = TrainConfig(algo=algo, steps=self.cfg.train_steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                             lora_rank=self.cfg.lora_rank, seed=self.cfg.seed, ckpt_every=self.cfg.train_steps)
            tr = Trainer(self.model, pairs_from_records(records), tc, self.out / "train" / name.replace("/", "__"))
            try:
                train_log = tr.run(resume=True, progress=False).history
                tr.net.eval()
                report = self.evaluate()
            finally:
                tr.unload()
        result = {"arm": name, "algo": algo, "pairs": None if records is None else len(records), "report": report,
                  "seconds": time.time() - t0,
                  "final_train_row": train_log[-1] if train_log else None}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        fams = report["families"]
        self.log(f"{name}: " + ", ".join(f"{f} {fams[f]['accuracy']:.3f}" for f in fams) + f" ({result['seconds']:.0f}s)")
        return result

    def _arm_path(self, name: str) -> Path:
        return self.out / "arms" / (name.replace("/", "__") + ".json")

    def run(self, finished_only: bool = False) -> dict:
        """Run every arm (or, with finished_only, report the arms already done without running the rest)."""
        t0 = time.time()
        sets = self.pair_sets()
        consistency = {k: pair_consistency(v) for k, v in sets.items()}
        results = {name: self.run_arm(name, algo, sets.get(src)) for name, algo, src in self.arms()
                   if not finished_only or self._arm_path(name).is_file()}
        comparisons = {}
        for algo in self.cfg.algos:
            a, b = results.get(f"{algo}/dfusion"), results.get(f"{algo}/random")
            if a is None or b is None:
                continue
            comparisons[algo] = {}
            for fam in [*FAMILIES, "all"]:
                fa, fb = a["report"]["families"][fam], b["report"]["families"][fam]
                comparisons[algo][fam] = {
                    "dfusion": fa["accuracy"], "random": fb["accuracy"],
                    "dfusion_ci95": fa["accuracy_ci95_prompts"], "random_ci95": fb["accuracy_ci95_prompts"],
                    "separated": fa["accuracy_ci95_prompts"][0] > fb["accuracy_ci95_prompts"][1],
                    "paired": paired_difference(a["report"]["rows"], b["report"]["rows"], fam),
                }
        summary = {"config": asdict(self.cfg), "sampling": asdict(self.sampling), "model": self.model.model_id,
                   "train_prompts": self.train_prompts, "pair_sets": consistency, "comparisons": comparisons,
                   "arms": {k: {"algo": v["algo"], "pairs": v["pairs"], "seconds": v["seconds"],
                                "families": v["report"]["families"], "final_train_row": v["final_train_row"]}
                            for k, v in results.items()},
                   "hardware": hardware(), "wall_seconds_this_run": time.time() - t0}
        (self.out / "results.json").write_text(json.dumps(summary, indent=1))
        figures(summary, sets.get("dfusion", []), self.out)
        return summary


def hardware() -> dict:
    import os

    return {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def figures(summary: dict, dfusion_pairs: list[PairRecord], out: Path) -> None:
    """accuracy.png (checker accuracy per arm and family, 95% intervals) and triplets.png (base | reference | target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in summary["arms"] if "dfusion-" not in a]
    fams = [*FAMILIES, "all"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        f = summary["arms"][arm]["families"]
        acc = np.array([f[x]["accuracy"] for x in fams])
        ci = np.array([f[x]["accuracy_ci95_prompts"] for x in fams], dtype=float)
        ax.bar(np.arange(len(fams)) + i * width, acc, width, yerr=[acc - ci[:, 0], ci[:, 1] - acc], capsize=2, label=arm)
    ax.set_xticks(np.arange(len(fams)) + 0.4 - width / 2, fams)
    ax.set_ylabel("checker accuracy (test prompts)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    picks = [r for r in dfusion_pairs if r.images.get("reference") is not None][:6]
    if picks:
        fig, axes = plt.subplots(len(picks), 3, figsize=(4.5, 1.6 * len(picks)), squeeze=False)
        for row, r in zip(axes, picks):
            for ax, key in zip(row, ("base", "reference", "target")):
                ax.imshow(r.images[key])
                ax.set_xticks([]); ax.set_yticks([])
                ax.set_title(f"{key} {r.scores[key]:.2f}", fontsize=7)
            row[0].set_ylabel(r.prompt, fontsize=6, rotation=0, ha="right", va="center")
        fig.tight_layout()
        fig.savefig(out / "triplets.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def report_markdown(summary: dict, command: str, figure_dir: str) -> str:
    """docs/RESULTS.md from results.json: tables with intervals, the verdict per algorithm and family."""
    fams = [*FAMILIES, "all"]
    cfg, hw = summary["config"], summary["hardware"]
    ci = lambda c: f"[{c[0]:.2f}, {c[1]:.2f}]"
    wins = [(a, f) for a, d in summary["comparisons"].items() for f in FAMILIES if d[f]["separated"]]
    total = len(summary["comparisons"]) * len(FAMILIES)
    missing = [n for n in ("base", *(f"{a}/{k}" for a in summary["config"]["algos"] for k in ("random", "dfusion")))
               if n not in summary["arms"]]
    lines = ["# Results: D-Fusion pairs vs random pairs on ShapesWorld", "",
             f"**Headline:** D-Fusion pairs beat random pairs outside the 95% intervals in {len(wins)} of {total} "
             "(algorithm, family) cells on held-out test prompts, judged by the ground-truth checker." +
             (f" Arms not run (out of time): {', '.join(missing)}." if missing else ""), "",
             "## Setup", "",
             f"- Model: `{summary['model']}`; {summary['sampling']['num_steps']} DDIM steps, eta "
             f"{summary['sampling']['eta']}, CFG {summary['sampling']['guidance_scale']}.",
             f"- Pairs: {cfg['train_prompts']} TRAIN prompts per family, {cfg['num_candidates']} candidates each, chosen "
             "by the ShapesWorld CLIP scorer (D-Fusion: best quarter as references, each twice, against the worst half; "
             "random: candidates paired at random, the higher score wins); every pair set cut to the same size.",
             f"- Training: {cfg['train_steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, LoRA rank "
             f"{cfg['lora_rank']}, seed {cfg['seed']}, paper defaults otherwise (same for every arm).",
             f"- Evaluation: {cfg['eval_prompts']} TEST prompts per family (combinations never trained on) x "
             f"{cfg['eval_seeds']} seeds, the same for every arm; checker accuracy with 95% bootstrap intervals over "
             "prompts; CLIP score; diversity = mean pairwise pixel difference between a prompt's seeds.",
             f"- Hardware: {hw['cpus']} CPU cores ({hw['machine']}), {hw['threads']} torch threads, GPU: "
             f"{hw['cuda'] or 'none'}; torch {hw['torch']}. Wall time of the run that wrote this: "
             f"{summary['wall_seconds_this_run'] / 60:.1f} min (arms reused from an earlier run are not counted).", "",
             "```bash", command, "```", "",
             "## Checker accuracy on test prompts [95% CI over prompts]", "",
             "| arm | pairs | " + " | ".join(fams) + " | CLIP (all) | diversity (all) |",
             "| --- | --- | " + " | ".join("---" for _ in fams) + " | --- | --- |"]
    for arm, a in summary["arms"].items():
        f = a["families"]
        lines.append(f"| {arm} | {a['pairs'] or '-'} | " + " | ".join(
            f"{f[x]['accuracy']:.3f} {ci(f[x]['accuracy_ci95_prompts'])}" for x in fams) +
            f" | {f['all'].get('clip_mean', float('nan')):.3f} | {f['all']['diversity']:.3f} |")
    lines += ["", "## CLIP score and diversity on test prompts", "",
              "CLIP score: mean [95% CI]; diversity: mean pairwise pixel difference between a prompt's seeds (a "
              "collapse towards one image lowers it).", "",
              "| arm | " + " | ".join(f"CLIP {x}" for x in fams) + " | " + " | ".join(f"diversity {x}" for x in FAMILIES) + " |",
              "| --- | " + " | ".join("---" for _ in [*fams, *FAMILIES]) + " |"]
    clip = lambda d: "-" if d.get("clip_mean") is None else f"{d['clip_mean']:.3f} {ci(d['clip_ci95'])}"
    for arm, a in summary["arms"].items():
        f = a["families"]
        lines.append(f"| {arm} | " + " | ".join(clip(f[x]) for x in fams) + " | " +
                     " | ".join(f"{f[x]['diversity']:.3f}" for x in FAMILIES) + " |")
    lines += ["", "## D-Fusion minus random, per algorithm and family", "",
              "`separated`: the two arms' 95% intervals do not overlap (the issue's criterion). `paired`: the "
              "accuracy difference on the same prompts and seeds with a 95% bootstrap interval over prompts.", "",
              "| algorithm | family | D-Fusion | random | separated | paired difference [95% CI] |",
              "| --- | --- | --- | --- | --- | --- |"]
    for algo, d in summary["comparisons"].items():
        for fam in fams:
            c = d[fam]
            p = c["paired"]
            pd = "-" if p["diff"] is None else f"{p['diff']:+.3f} {ci(p['ci95'])}"
            lines.append(f"| {algo} | {fam} | {c['dfusion']:.3f} | {c['random']:.3f} | "
                         f"{'yes' if c['separated'] else 'no'} | {pd} |")
    lines += ["", "## Pair sets (train prompts)", "",
              "Mean absolute pixel change (0-255) between winner and loser; inside / outside the fusion mask where "
              "one exists. CLIP score gap = winner minus loser.", "",
              "| pair set | pairs | CLIP score gap | change, whole image | inside mask | outside mask |",
              "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for name, c in summary["pair_sets"].items():
        lines.append(f"| {name} | {c['pairs']} | {fmt(c['score_gap'])} | {fmt(c['change_whole'])} | "
                     f"{fmt(c['change_inside_mask'])} | {fmt(c['change_outside_mask'])} |")
    lines += ["", "## Figures", "", f"![accuracy per arm and family]({figure_dir}/accuracy.png)", "",
              f"![base, reference and target of D-Fusion pairs]({figure_dir}/triplets.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded ShapesWorld model)")
    ap.add_argument("--scorer", default=None, help="scorer (default: the embedded ShapesWorld CLIP)")
    ap.add_argument("--smoke", action="store_true", help="a few minutes: tiny budget, same code path")
    ap.add_argument("--report", default=None, help="also write the markdown report here (e.g. docs/RESULTS.md); "
                                                      "figures are copied beside it")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--finished-only", action="store_true", help="report the arms already finished, run nothing new")
    ap.add_argument("--extra", default=None, help="a markdown file appended to the report (analysis, measured "
                                                   "elsewhere, e.g. docs/results_extra.md)")
    for f, v in asdict(ExperimentConfig()).items():
        if isinstance(v, (int, float)):
            ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=None)
        elif isinstance(v, tuple):
            ap.add_argument("--" + f.replace("_", "-"), nargs="*", default=None, help=f"default: {' '.join(v)}")
    a = ap.parse_args(argv)
    if a.extra and not Path(a.extra).is_file():
        ap.error(f"--extra {a.extra}: no such file")
    if a.threads:
        torch.set_num_threads(a.threads)
    base = ExperimentConfig.smoke() if a.smoke else ExperimentConfig()
    cfg = replace(base, **{f: tuple(v) if isinstance(v, list) else v for f in asdict(base)
                           if (v := getattr(a, f, None)) is not None})
    from ..training.trainer import ALGOS

    bad = [x for x in cfg.algos if x not in ALGOS]
    if bad:
        ap.error(f"--algos: unknown {bad}; choose from {' '.join(ALGOS)}")
    try:
        fusion_variants(FusionParams(), cfg.num_steps, cfg.ablations)
    except ValueError as e:
        ap.error(f"--ablations: {e}")
    from ..engine.loading import load_model
    from ..engine.scoring import make_scorer

    model = load_model(a.model, device="cpu" if not torch.cuda.is_available() else None)
    summary = Experiment(model, make_scorer(a.scorer), cfg, a.out).run(finished_only=a.finished_only)
    command = "python -m dfusion_core.shapesworld.experiment " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    out = Path(a.out)
    (out / "RESULTS.md").write_text(report_markdown(summary, command, "."))
    if a.report:
        import shutil

        dest = Path(a.report)
        fig_dir = dest.parent / "results"
        fig_dir.mkdir(parents=True, exist_ok=True)
        for png in ("accuracy.png", "triplets.png"):
            if (out / png).is_file():
                shutil.copy(out / png, fig_dir / png)
        extra = Path(a.extra).read_text() if a.extra else ""
        dest.write_text(report_markdown(summary, command, "results") + ("\n" + extra if extra else ""))
    print(out / "RESULTS.md")


if __name__ == "__main__":
    main()
