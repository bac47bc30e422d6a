"""The evidence harness's numbers and report: per-arm results -> results-<part>.json -> docs/RESULTS.md + figures.

Every interval is a 95% bootstrap interval over prompts (a prompt's seeds, and its samples under every training
seed, are resampled together). Movement = an arm minus the base model, D-Fusion - random = the two arms of one
algorithm, both as paired differences on the same prompts and evaluation seeds (experiment.paired_difference).
A cell is won when the D-Fusion - random interval on TEST prompts lies above 0, lost when below.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np

from .statistics import METRICS, SPLITS, hardware, holm, paired_difference, pooled_summary
from dfusion_core.worlds.shapesworld.world import FAMILIES

FAMS = (*FAMILIES, "all")
LABELS = {"correct": "checker accuracy", "clip": "CLIP score", "diversity": "diversity"}


def _rows(run: dict, split: str) -> list[dict]:
    return run["reports"][split]["rows"]


def _by_seed(runs: list[dict]) -> dict:
    return {r["seed"]: r for r in runs}


def splits_of(results) -> tuple[str, ...]:
    """The splits every arm was evaluated on (validation only where the run had validation prompts)."""
    return tuple(s for s in SPLITS if all(s in r["reports"] for r in results))


def _group_summary(runs: list[dict], base: dict | None, splits: tuple[str, ...]) -> dict:
    """One arm over its training seeds: pooled metrics and the movement from the base model, per split/family."""
    first = runs[0]
    out = {"algo": first["algo"], "kind": first["kind"], "ablation": first["ablation"], "seeds": [r["seed"] for r in runs],
           "pairs": first["pairs"], "seconds": sum(r["seconds"] for r in runs), "training": [r["train"] for r in runs]}
    for split in splits:
        rows = [_rows(r, split) for r in runs]
        out[split] = {f: {m: pooled_summary(rows, f, m) for m in METRICS} for f in FAMS}
        if base is not None and first["algo"] is not None:
            out[f"{split}_movement"] = {f: {m: paired_difference(rows, _rows(base, split), f, m) for m in METRICS}
                                        for f in FAMS}
    return out


def _compare(a_runs: list[dict], b_runs: list[dict], split: str) -> dict:
    """a - b on the training seeds both have, seed by seed."""
    a, b = _by_seed(a_runs), _by_seed(b_runs)
    seeds = sorted(a.keys() & b.keys())
    ra, rb = [_rows(a[s], split) for s in seeds], [_rows(b[s], split) for s in seeds]
    return {"seeds": seeds, **{f: {m: paired_difference(ra, rb, f, m) for m in METRICS} for f in FAMS}}


def summarise(exp, part: str, results: dict[str, dict], signals: dict[str, dict], wall: float) -> dict:
    """results-<part>.json: the arms pooled over seeds, movement from base, D-Fusion - random per algorithm,
    ablations against the D-Fusion and random DPO arms, the pair signal of every pair set."""
    from dataclasses import asdict

    groups: dict[str, list[dict]] = {}
    for r in sorted(results.values(), key=lambda r: (r["seed"] is not None, r["seed"] or 0)):
        groups.setdefault(r["group"], []).append(r)
    base = groups.get("base", [None])[0]
    splits = splits_of(results.values())
    arms = {g: _group_summary(runs, base, splits) for g, runs in groups.items()}
    comparisons = {split: {algo: _compare(groups[f"{algo}/dfusion"], groups[f"{algo}/random"], split)
                           for algo in exp.cfg.algos if f"{algo}/dfusion" in groups and f"{algo}/random" in groups}
                   for split in splits}
    controls = {split: {algo: _compare(groups[f"{algo}/dfusion"], groups[f"{algo}/control"], split)
                        for algo in exp.cfg.algos if f"{algo}/dfusion" in groups and f"{algo}/control" in groups}
                for split in splits}
    ablations = {}
    for g, runs in groups.items():
        if runs[0]["ablation"]:
            algo = runs[0]["algo"]
            ablations[g] = {split: {ref: _compare(runs, groups[f"{algo}/{ref}"], split)
                                    for ref in ("dfusion", "random") if f"{algo}/{ref}" in groups} for split in splits}
    return {"part": part, "config": asdict(exp.cfg), "sampling": asdict(exp.sampling), "fusion": asdict(exp.fusion),
            "model": exp.model.model_id, "train_prompts": exp.train_prompts, "pair_signal": signals, "arms": arms,
            "comparisons": comparisons, "controls": controls, "primary": primary_endpoint(controls),
            "ablations": ablations, "hardware": hardware(), "wall_seconds_this_run": wall,
            "budget": json.loads(b.read_text()) if (b := exp.out / "budget.json").is_file() else None}


PRIMARY = "TEST prompts, all families: DPO on D-Fusion pairs minus DPO on the control pairs, checker accuracy"


def primary_endpoint(controls: dict) -> dict | None:
    """The one pre-stated endpoint (PRIMARY) and its family cells with Holm-adjusted p-values (no family win is
    claimed on fewer than 10 prompts)."""
    c = controls.get("test", {}).get("dpo")
    if c is None:
        return None
    cells = {f: c[f]["correct"] for f in FAMILIES}
    adjusted = holm({f: d["p"] if (d.get("prompts") or 0) >= 10 else None for f, d in cells.items()})
    return {"endpoint": PRIMARY, **c["all"]["correct"],
            "families": {f: {**d, "p_holm": adjusted[f]} for f, d in cells.items()}}


# ---- markdown ---------------------------------------------------------------------------------------
def ci(c) -> str:
    return "[-, -]" if c is None or c[0] is None else f"[{c[0]:+.3f}, {c[1]:+.3f}]"


def est(d: dict, key: str = "diff", signed: bool = True) -> str:
    v = d.get(key)
    if v is None:
        return "-"
    c = d["ci95"]
    return f"{v:+.3f} {ci(c)}" if signed else f"{v:.3f} [{c[0]:.2f}, {c[1]:.2f}]"


def verdict(d: dict) -> str:
    lo, hi = d["ci95"]
    if lo is None:
        return "-"
    return "above 0" if lo > 0 else "below 0" if hi < 0 else "includes 0"


def cells(summary: dict, split: str) -> tuple[int, int, int]:
    """(won, lost, total) (algorithm, family) cells on a split: D-Fusion - random accuracy interval above / below 0."""
    comp = summary["comparisons"].get(split, {})
    v = [verdict(comp[a][f]["correct"]) for a in comp for f in FAMILIES]
    return v.count("above 0"), v.count("below 0"), len(v)


def _setup(summary: dict, commands: list[str]) -> list[str]:
    c, s, f, hw = summary["config"], summary["sampling"], summary["fusion"], summary["hardware"]
    m = f["mask"]
    labeller = "world's checker" if c.get("label_by") == "checker" else "CLIP scorer"
    return ["## Setup", "",
            f"- Model: `{Path(summary['model']).name}` (the embedded default unless named otherwise); {s['num_steps']} "
            f"sampling steps ({s.get('flow_sampler', 'ddim')} sampler), eta {s['eta']}, CFG {s['guidance_scale']}.",
            f"- Prompts: {c['train_prompts']} TRAIN prompts per family, the same for every arm, dealt in turn from "
            f"each relation / texture; {c.get('val_prompts', 0)} validation prompts per family after them (TRAIN-split "
            f"captions never trained on); {c['eval_prompts']} TEST prompts per family x {c['eval_seeds']} seeds. "
            f"Pairs picked and labelled by the {labeller}.",
            f"- DPO (offline): pair sets from {c['num_candidates']} candidates per prompt scored by the ShapesWorld CLIP "
            "scorer. D-Fusion: best quarter as references, each twice, against the worst half, fused with the model's "
            f"form (mask {m['combine']} of the keywords' maps, reference-union-base {m['union_base']}, grown "
            f"{m.get('dilate', 0)} cells, steps {f['start_step']}-{f['end_step'] or s['num_steps']}, layers "
            f"{f['layers']}, held outside the mask {f['hold_outside']}); random: the same candidates paired at random, "
            f"the higher score wins; every set cut to one size. At most {c['dpo_steps']} steps and "
            f"{c.get('dpo_epochs', '-')} epochs, batch {c['dpo_batch']}, lr {_lr_text(summary)}, LoRA rank "
            f"{c['dpo_rank']}, beta {c['dpo_beta']:g}; "
            + (f"validation accuracy ({c.get('val_seeds')} seeds a validation prompt) every {c['val_every']} steps, "
               f"stopped after {c.get('patience')} checkpoints without a better one, evaluated at the best checkpoint."
               if c.get("val_every") and c.get("val_prompts") else "evaluated at the last step (no validation)."),
            f"- DDPO / DPOK (on-policy): {c['rounds']} rounds; each samples {c['round_candidates']} fresh candidates per "
            "prompt from the current policy, pairs them (random arm: plain samples; D-Fusion arm: fused targets and "
            "their bases), scores them with the CLIP scorer, normalises rewards per prompt "
            f"{'and kind (bases among bases, targets among targets)' if c.get('advantage_groups', 'prompt') == 'prompt-kind' else 'over all its samples'}"
            " and trains "
            f"{c['inner_epochs']} pass(es), batch {c['rl_batch']} trajectories, {c['steps_per_trajectory'] or 'all'} "
            f"denoising steps per trajectory, lr {c['rl_lr']}, LoRA rank {c['rl_rank']}, PPO clip {c.get('rl_clip', 0.1):g}"
            f"{', dual clip %g' % c['rl_dual_clip'] if c.get('rl_dual_clip') else ''} (DPOK: + KL "
            f"{c.get('rl_kl', 0.01):g} to the base model, {c.get('rl_kl_scale', 'exact')} scale).",
            f"- Training seeds: {', '.join(map(str, c['seeds']))} (LoRA start, batches, noise and the rounds' samples).",
            f"- Evaluation (same seeds for every arm): TRAIN prompts x {c['eval_train_seeds']} held-out seeds and "
            f"{c['eval_prompts']} TEST prompts per family (combinations never trained on) x {c['eval_seeds']} seeds; "
            "ground-truth checker accuracy, CLIP score, diversity (mean pixel difference between a prompt's seeds).",
            f"- Hardware: {hw['cpus']} CPU cores ({hw['machine']}), GPU {hw['cuda'] or 'none'}, torch {hw['torch']}.",
            "", "```bash", *commands, "```", ""]


def _lr_text(summary: dict) -> str:
    b = summary.get("budget")
    return f"{b['lr']:g} (chosen by --part calibrate)" if b and b.get("lr") is not None else \
        f"{summary['config']['dpo_lr']:g}"


def _budget_lines(summary: dict) -> list[str]:
    """How the calibration chose the lr, and whether the positive control moved the model."""
    b = summary.get("budget")
    if not b:
        return ["No learning rate was chosen (the calibration needs validation prompts and the base arm)."]
    seeds = summary["config"].get("val_seeds")
    rows = [f"| control | lr | steps run | early stopping's score by step ({seeds} seeds) | best step | validation "
            "accuracy at it | movement from base [95% CI] |", "| --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {t.get('algo', 'dpo')} | {t['lr']:g} | {t['steps']} | "
             f"{', '.join(f'{k}: {v:.3f}' for k, v in (t.get('checkpoints') or {}).items()) or '-'} | "
             f"{'-' if t['best_step'] is None else t['best_step']} | {t['validation_accuracy']:.3f} | "
             f"{est(t['movement'])} |" for t in b["tried"]]
    said = lambda v: "moved validation accuracy up outside its interval" if v else \
        "did **not** move validation accuracy up outside its interval"
    lines = ["Positive controls, validated on the validation prompts (base: "
             f"{b['base_validation_accuracy']:.3f}): DPO on oracle pairs (random pairs labelled by the checker) at each "
             "learning rate, and SFT (the denoising loss on the same pairs' winners, the model's own checker-correct "
             "samples)."]
    if b.get("lr") is not None:
        lines += [f"Chosen: DPO lr **{b['lr']:g}**; DPO at it {said(b.get('dpo_control_passes', b['positive_control_passes']))}."]
    if b.get("sft_control_passes") is not None:
        lines += [f"SFT {said(b['sft_control_passes'])} at "
                  f"{'some' if b['sft_control_passes'] else 'any'} learning rate tried."]
    lines += ["An arm whose best step is 0 ended as the plain model (its evaluation is the base's samples). The "
              "early-stopping score is read on other seeds than the final validation accuracy."]
    lines += ["The budget can align the model: the evaluation sees a trained move." if b["positive_control_passes"] else
              "No positive control moved the model: no affordable budget aligned it, and the comparisons below cannot "
              "show an alignment effect."]
    return [" ".join(lines), "", *rows]


def _movement_table(summary: dict, split: str) -> list[str]:
    lines = [f"| arm | seeds | " + " | ".join(f"{f} accuracy" for f in FAMS) + " | movement, all [95% CI] | moved |",
             "| --- | --- | " + " | ".join("---" for _ in FAMS) + " | --- | --- |"]
    for g, a in summary["arms"].items():
        mv = a.get(f"{split}_movement", {}).get("all", {}).get("correct")
        lines.append(f"| {g} | {len(a['seeds']) if a['algo'] else '-'} | " +
                     " | ".join(est(a[split][f]["correct"], "mean", signed=False) for f in FAMS) +
                     f" | {est(mv) if mv else '-'} | {'-' if not mv else 'yes' if verdict(mv) != 'includes 0' else 'no'} |")
    return lines


def _comparison_table(summary: dict, split: str) -> list[str]:
    lines = ["| algorithm | family | D-Fusion | random | D-Fusion - random [95% CI] | per seed | CLIP diff | "
             "diversity diff | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for algo, comp in summary["comparisons"].get(split, {}).items():
        d, r = summary["arms"][f"{algo}/dfusion"][split], summary["arms"][f"{algo}/random"][split]
        for f in FAMS:
            c = comp[f]
            per = ", ".join("-" if x is None else f"{x:+.3f}" for x in c["correct"]["per_run"])
            lines.append(f"| {algo} | {f} | {d[f]['correct']['mean']:.3f} | {r[f]['correct']['mean']:.3f} | "
                         f"{est(c['correct'])} | {per} | {est(c['clip'])} | {est(c['diversity'])} | "
                         f"{verdict(c['correct'])} |")
    return lines


def _signal_table(summary: dict) -> list[str]:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["| pair set | pairs | P(winner correct) | P(loser correct) | checker gap | winner only | loser only | "
             "CLIP gap | |w - l| inside mask | outside mask |", "| --- " * 10 + "|"]
    for name, s in summary["pair_signal"].items():
        lines.append(f"| {name} | {s['pairs']} | {fmt(s['p_winner_correct'])} | {fmt(s['p_loser_correct'])} | "
                     f"{fmt(s['checker_gap'])} | {fmt(s['winner_only'])} | {fmt(s['loser_only'])} | "
                     f"{fmt(s['score_gap'])} | {fmt(None if s['diff_in_mask'] is None else 255 * s['diff_in_mask'])} | "
                     f"{fmt(None if s['diff_out_mask'] is None else 255 * s['diff_out_mask'])} |")
    return lines


def _training_table(summary: dict) -> list[str]:
    """What training did to each arm: DPO's loss and implicit accuracy, the rounds' rewards, ratio and KL."""
    lines = ["| arm | seed | training |", "| --- | --- | --- |"]
    for g, a in summary["arms"].items():
        for seed, t in zip(a["seeds"], a["training"]):
            if not t:
                continue
            if "rounds" in t:
                rw = " -> ".join(f"{r['reward_mean']:.3f}" for r in t["rounds"])
                last = t["rounds"][-1] if t["rounds"] else {}
                kl = f", KL to the base model {last['kl']:.3f}" if "kl" in last else ""
                text = (f"reward mean per round {rw}; last round ratio {last.get('ratio', float('nan')):.4f}, "
                        f"approx KL {last.get('approx_kl', float('nan')):.2e}, clip fraction "
                        f"{last.get('clipfrac', float('nan')):.3f}{kl}; {t['steps']} optimizer steps")
            else:
                f, l = t["first_rows"], t["last_rows"]
                text = (f"loss {f['loss']:.3f} -> {l['loss']:.3f}, implicit accuracy "
                        f"{(f['implicit_acc'] or 0):.2f} -> {(l['implicit_acc'] or 0):.2f}; {t['steps']} steps")
            lines.append(f"| {g} | {seed} | {text} |")
    return lines


def _ablation_table(summary: dict) -> list[str]:
    lines = ["| arm | seeds | pairs | test accuracy | minus D-Fusion arm, test | minus random arm, test | "
             "per seed, minus random, test | minus D-Fusion arm, train | moved from base, test |", "| --- " * 9 + "|"]
    algos = list(dict.fromkeys(a["algo"] for a in summary["arms"].values() if a["algo"]))
    for algo in algos:
        for g in [f"{algo}/random", f"{algo}/dfusion", *(x for x in summary["ablations"] if x.startswith(algo + "/"))]:
            a = summary["arms"].get(g)
            if a is None:
                continue
            ab = summary["ablations"].get(g, {})
            cmp = lambda split, ref: est(ab[split][ref]["all"]["correct"]) if ref in ab.get(split, {}) else "-"
            mv = a.get("test_movement", {}).get("all", {}).get("correct")
            per = ab.get("test", {}).get("random", {}).get("all", {}).get("correct", {}).get("per_run") or []
            lines.append(f"| {g} | {', '.join(map(str, a['seeds']))} | {a['pairs'] or '-'} | "
                         f"{est(a['test']['all']['correct'], 'mean', signed=False)} | {cmp('test', 'dfusion')} | "
                         f"{cmp('test', 'random')} | {', '.join(f'{x:+.3f}' for x in per if x is not None) or '-'} | "
                         f"{cmp('train', 'dfusion')} | {est(mv) if mv else '-'} |")
    return lines


def _control_table(summary: dict, split: str) -> list[str]:
    lines = ["| algorithm | family | prompts | D-Fusion | control | D-Fusion - control [95% CI] | p | p (Holm) | "
             "per seed | CLIP diff |", "| --- " * 10 + "|"]
    primary = summary.get("primary") or {}
    for algo, comp in summary.get("controls", {}).get(split, {}).items():
        d, c = summary["arms"][f"{algo}/dfusion"][split], summary["arms"][f"{algo}/control"][split]
        for f in FAMS:
            x = comp[f]["correct"]
            holm_p = primary.get("families", {}).get(f, {}).get("p_holm") if split == "test" else None
            per = ", ".join("-" if v is None else f"{v:+.3f}" for v in x["per_run"])
            lines.append(f"| {algo} | {f} | {x.get('prompts', '-')} | {d[f]['correct']['mean']:.3f} | "
                         f"{c[f]['correct']['mean']:.3f} | {est(x)} | {_p(x.get('p'))} | {_p(holm_p)} | {per} | "
                         f"{est(comp[f]['clip'])} |")
    return lines


def _p(p) -> str:
    return "-" if p is None else f"{p:.3f}"


def _primary_sentence(h: dict) -> list[str]:
    p = h.get("primary")
    if not p or p.get("diff") is None:
        return []
    answer = ("D-Fusion pairs trained a better model than the same pairs left unfused" if p["ci95"][0] > 0 else
              "the same pairs left unfused trained a better model than D-Fusion pairs" if p["ci95"][1] < 0 else
              "no difference between D-Fusion pairs and the same pairs left unfused could be shown")
    return [f"**Primary endpoint** ({p['endpoint']}): {p['diff']:+.3f} {ci(p['ci95'])}, p = {_p(p['p'])}: "
            f"{answer} (two-stage bootstrap over training seeds and {p.get('prompts')} prompts)."]


def _headline(parts: dict) -> list[str]:
    h = parts.get("headline")
    if h is None:
        return ["**Headline:** not in this report: its output folder holds no finished headline run (parts here: "
                f"{', '.join(parts) or 'none'})."]
    won, lost, total = cells(h, "test")
    twon, tlost, ttotal = cells(h, "train")
    trained = [a for a in h["arms"].values() if a["algo"]]
    moves = [verdict(a["test_movement"]["all"]["correct"]) for a in trained if "test_movement" in a]
    n_seeds = len(h["config"]["seeds"])
    return [*_primary_sentence(h), "", f"**Headline:** on TEST prompts (combinations never trained on), D-Fusion pairs beat random pairs in "
            f"**{won} of {total}** (algorithm, family) cells and lost {lost} (paired difference in checker accuracy, "
            f"pooled over up to {n_seeds} training seeds, 95% interval above / below 0); on TRAIN prompts with "
            f"held-out seeds they won {twon} of {ttotal} and lost {tlost}. Of {len(trained)} trained arms, "
            f"{moves.count('below 0')} moved the test accuracy below the base model's and {moves.count('above 0')} "
            "above it, outside their intervals."]


def report_markdown(parts: dict, commands: list[str], figure_dir: str, triplets: bool = True) -> str:
    """docs/RESULTS.md from the parts' summaries (calibrate, headline, ablations; any may be missing)."""
    any_part = next(iter(parts.values()))
    lines = ["# Results: D-Fusion pairs vs random pairs on ShapesWorld", "", *_headline(parts), "",
             *_setup(any_part, commands)]
    if "calibrate" in parts:
        cal = parts["calibrate"]
        split = "validation" if "validation" in cal["arms"].get("base", {}) else "train"
        lines += ["## Calibration: the positive control and the learning rate (validation prompts)", "",
                  "Chosen on TRAIN-split prompts never trained on; no D-Fusion arm and no TEST prompt was used to "
                  "choose it.", "", *_budget_lines(cal), "", *_movement_table(cal, split), ""]
    h = parts.get("headline")
    if h is not None:
        for split, title in (("test", "TEST prompts (unseen combinations)"), ("train", "TRAIN prompts, held-out seeds")):
            lines += [f"## Checker accuracy on {title}", "",
                      "Accuracy: mean over training seeds [95% CI over prompts]; movement: arm minus base on the same "
                      "samples.", "", *_movement_table(h, split), "",
                      f"### D-Fusion minus random on {title}", "",
                      "Paired differences on the same prompts and evaluation seeds, pooled over training seeds (the "
                      "interval resamples prompts); `per seed`: each training seed's own difference.", "",
                      *_comparison_table(h, split), ""]
        if h.get("controls", {}).get("test"):
            lines += ["## D-Fusion minus the inconsistent control (TEST prompts)", "",
                      "The control trains on the very same (reference, base) pairs as the D-Fusion arm, the "
                      "reference left unfused as the winner: the two differ in visual consistency alone. Paired "
                      "differences on the same prompts and seeds; the interval and p resample training seeds, "
                      "then prompts; p (Holm) over the family cells, none given under 10 prompts.", "",
                      *_control_table(h, "test"), ""]
        lines += ["## Pair signal of the offline pair sets (before training)", "", *_signal_table(h), "",
                  "## Training", "", *_training_table(h), ""]
    if "ablations" in parts:
        a = parts["ablations"]
        seeds = ", ".join(map(str, a["config"].get("ablation_seeds", [0])))  # summaries before the option: seed 0
        lines += [f"## Ablations (training seeds {seeds})", "",
                  "DPO on D-Fusion pairs built with one setting changed (`masked-loss`: the model's pairs, the "
                  "Diffusion-DPO error counted inside the fusion mask only), and DDPO rounds whose targets are fused "
                  "with one setting changed or that train differently (`per-prompt-advantages`: rewards normalised "
                  "per prompt over targets and bases together; `drawable-steps`: without the steps the plain policy "
                  "would not draw). Differences on all families, paired, against the same algorithm's "
                  "D-Fusion and random arms of the same seeds (pooled over them).", "",
                  *_ablation_table(a), "", f"![checker accuracy of the ablation arms]({figure_dir}/ablations.png)", "",
                  "Pair signal of the ablation pair sets:", "", *_signal_table(a), ""]
    lines += ["## Figures", "", f"![checker accuracy per arm]({figure_dir}/accuracy.png)", ""]
    if triplets:  # a D-Fusion pair set was built (calibrate builds none)
        lines += [f"![base, reference and target of D-Fusion pairs]({figure_dir}/triplets.png)", ""]
    return "\n".join(lines)


# ---- figures ----------------------------------------------------------------------------------------
def figures(parts: dict, dfusion_pairs: list, out: Path) -> list[str]:
    """accuracy.png (accuracy per arm, family and split, 95% intervals) and triplets.png (base | reference | target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    summary = parts.get("headline") or parts.get("calibrate") or parts.get("ablations")
    groups = [g for g, a in summary["arms"].items() if not a["ablation"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    width = 0.8 / max(1, len(groups))
    shown = [s for s in ("test", "validation", "train") if all(s in summary["arms"][g] for g in groups)][:2]
    for ax, split in zip(axes, shown):  # a calibration's arms are read on validation, not TEST
        for i, g in enumerate(groups):
            _bars(ax, [summary["arms"][g][split][f]["correct"] for f in FAMS], i * width, width, g)
        ax.set_xticks(np.arange(len(FAMS)) + 0.4 - width / 2, FAMS)
        ax.set_title(f"{split.upper()} prompts")
    axes[0].set_ylabel("checker accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    written.append("accuracy.png")
    if "ablations" in parts:
        written.append(_ablation_figure(parts["ablations"], out / "ablations.png"))
    by_prompt = {}  # one pair per prompt, the families in turn
    for r in dfusion_pairs:
        if r.images.get("reference") is not None:
            by_prompt.setdefault(r.prompt, r)
    firsts = list(by_prompt.values())
    step = max(1, len(firsts) // 6)
    picks = firsts[::step][:6]
    if picks:
        # the prompt gets a column of its own: as a y-label it squeezed the square images and left tall gaps
        fig, axes = plt.subplots(len(picks), 4, figsize=(6.4, 1.5 * len(picks)), squeeze=False,
                                 gridspec_kw={"width_ratios": [1.6, 1, 1, 1]})
        for row, r in zip(axes, picks):
            row[0].axis("off")
            row[0].text(1.0, 0.5, textwrap.fill(r.prompt, 28), fontsize=7, ha="right", va="center",
                        transform=row[0].transAxes)
            for ax, key in zip(row[1:], ("base", "reference", "target")):
                ax.imshow(r.images[key])
                ax.set_xticks([]); ax.set_yticks([])
                ax.set_title(f"{key} {r.scores[key]:.2f}", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "triplets.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("triplets.png")
    return written


def _bars(ax, summaries: list[dict], offset: float, width: float, label: str) -> None:
    """One bar per pooled summary ({"mean", "ci95"}) at 0, 1, ... + offset, its 95% interval as the error bar."""
    acc = np.array([x["mean"] for x in summaries], dtype=float)
    c = np.array([x["ci95"] for x in summaries], dtype=float)
    ax.bar(np.arange(len(summaries)) + offset, acc, width, yerr=[acc - c[:, 0], c[:, 1] - acc], capsize=2, label=label)


def _ablation_figure(summary: dict, path: Path) -> str:
    """ablations.png: checker accuracy (all families) of every ablation arm beside the arms it is read against."""
    import matplotlib.pyplot as plt

    groups = list(summary["arms"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups)), 3.6))
    for i, split in enumerate(("test", "train")):
        _bars(ax, [summary["arms"][g][split]["all"]["correct"] for g in groups], i * 0.4, 0.4,
              f"{split.upper()} prompts")
    ax.set_xticks(np.arange(len(groups)) + 0.2, groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("checker accuracy, all families")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_reports(exp, command: str | None, report: str | None = None, extra: str | None = None) -> Path:
    """RESULTS.md (and figures) in the output folder from every finished part, and at `report` if given; the
    commands that ran parts are listed in it (`command` None: a report-only run, not listed)."""
    from dfusion_core.pairs.build import load_pairs

    parts = {p: json.loads(f.read_text()) for p in ("calibrate", "headline", "ablations")
             if (f := exp.out / f"results-{p}.json").is_file()}
    cmds_file = exp.out / "commands.json"
    cmds = json.loads(cmds_file.read_text()) if cmds_file.is_file() else []
    cmds = [c for c in cmds if c != command] + ([command] if command else [])
    cmds_file.write_text(json.dumps(cmds))
    folder = exp.out / "pairs" / "dfusion"
    pairs = load_pairs(folder) if (folder / "pairs.jsonl").is_file() else []
    pngs = figures(parts, pairs, exp.out) if parts else []
    (exp.out / "RESULTS.md").write_text(report_markdown(parts, cmds, ".", "triplets.png" in pngs))
    if report:
        dest = Path(report)
        fig_dir = dest.parent / dest.stem.lower()  # RESULTS.md -> results/, RESULTS-ablations.md -> results-ablations/
        fig_dir.mkdir(parents=True, exist_ok=True)
        for png in pngs:
            shutil.copy(exp.out / png, fig_dir / png)
        text = report_markdown(parts, cmds, fig_dir.name, "triplets.png" in pngs)
        dest.write_text(text + ("\n" + Path(extra).read_text() if extra else ""))
    return exp.out / "RESULTS.md"
