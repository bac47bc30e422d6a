"""Why on-policy rounds with D-Fusion targets broke the default model: two probes, on the experiment's budget.

    python benchmarks/onpolicy_probe.py residuals                 # how far a fused target's steps are off the policy
    python benchmarks/onpolicy_probe.py train --half bases-only   # train a D-Fusion round's plain samples only
    python benchmarks/onpolicy_probe.py train --half targets-only --advantage-groups prompt

`residuals`: D-Fusion pairs of 6 TRAIN prompts (8 candidates, the model's fusion form); per denoising step, the
mean squared standardised residual ((x_next - mean) / std)^2 of the target's and the base's recorded steps under
the plain model (a draw of the policy gives ~1), median and max over pairs, and the sampler's std per step.

`train`: one DDPO (or --algo dpok) D-Fusion arm of the experiment (ExperimentConfig, training seed --seed) whose
rounds train only one half of their samples (the other half still counts in the advantages): `bases-only` (the
plain draws) or `targets-only` (the fused targets); then the experiment's evaluation (TRAIN prompts x held-out
seeds, TEST prompts). Prints the rounds' reward and approx KL and the checker accuracy per family; writes
--out/result.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _setup():
    from dfusion_core.engine.loading import load_model
    from dfusion_core.pairs.scoring import make_scorer
    from experiments.shapesworld.experiment import Experiment, ExperimentConfig

    model, scorer = load_model(None, device="cpu"), make_scorer(None)
    return model, scorer, ExperimentConfig()


def _residuals_per_step(model, sampling, prompt, trajectory) -> torch.Tensor:
    """[steps] mean squared standardised residual of the recorded steps under the plain model."""
    from dfusion_core.engine.steps import mean_sq_residual
    from dfusion_core.engine.sampling import recompute_log_probs, sampler_stds

    with torch.no_grad():
        lp = recompute_log_probs(model, prompt, trajectory, sampling)
    return mean_sq_residual(lp, sampler_stds(model, sampling))


def residuals(out: Path) -> dict:
    from dfusion_core.pairs.build import PairingParams, build_pairs
    from dfusion_core.engine.sampling import sampler_stds
    from experiments.shapesworld.experiment import Experiment

    model, scorer, cfg = _setup()
    exp = Experiment(model, scorer, cfg, out)
    prompts = exp.train_prompts[::2][:6]
    recs = build_pairs(model, prompts, scorer, exp.sampling, exp.fusion, PairingParams(num_candidates=8, seed=7), 16)
    t = torch.stack([_residuals_per_step(model, exp.sampling, r.prompt, r.target) for r in recs])
    b = torch.stack([_residuals_per_step(model, exp.sampling, r.prompt, r.base) for r in recs])
    rows = {"pairs": len(recs), "std": sampler_stds(model, exp.sampling).tolist(),
            "target_median": t.median(0).values.tolist(), "target_max": t.max(0).values.tolist(),
            "base_median": b.median(0).values.tolist(), "base_max": b.max(0).values.tolist(),
            "target_share_above_2": float((t > 2).float().mean()), "base_share_above_2": float((b > 2).float().mean())}
    for k in ("std", "base_median", "base_max", "target_median", "target_max"):
        print(f"{k:14s}", " ".join(f"{v:.3g}" for v in rows[k]))
    print(f"steps above 2: targets {rows['target_share_above_2']:.3f}, bases {rows['base_share_above_2']:.3f}")
    return rows


def _trainer_for_half(half: str):
    """OnPolicyTrainer whose rounds train only `half` of their samples."""
    from dfusion_core.training.onpolicy import OnPolicyTrainer

    class HalfTrainer(OnPolicyTrainer):
        def collect_round(self, r, progress=False):
            d = super().collect_round(r, progress)
            fused = torch.tensor(d.fused).view(-1, 1)
            d.drawable = d.drawable & (~fused if half == "bases-only" else fused)
            return d

    return HalfTrainer


def train_half(out: Path, half: str, algo: str, advantage_groups: str, seed: int = 0) -> dict:
    from dfusion_core.pairs.build import PairingParams
    from experiments.shapesworld.experiment import Experiment
    from dfusion_core.training.onpolicy import OnPolicyConfig

    model, scorer, c = _setup()
    exp = Experiment(model, scorer, c, out)
    oc = OnPolicyConfig(algo=algo, arm="dfusion", rounds=c.rounds, batch_size=c.rl_batch, lr=c.rl_lr,
                        lora_rank=c.rl_rank, inner_epochs=c.inner_epochs, steps_per_trajectory=c.steps_per_trajectory,
                        seed=seed, ckpt_every=10 ** 6, advantage_groups=advantage_groups)
    pairing = PairingParams(num_candidates=c.round_candidates, seed=c.pair_seed * 1000 + 7 + seed)  # the arm's
    t0 = time.time()
    tr = _trainer_for_half(half)(model, exp.train_prompts, scorer, oc, out / "train", exp.sampling, exp.fusion,
                                 pairing)
    try:
        tr.run(resume=True, progress=False)
        tr.net.eval()
        reports = exp.evaluate()
    finally:
        tr.unload()
    acc = {s: {f: v["accuracy"] for f, v in reports[s]["families"].items()} for s in ("train", "test")}
    for r in tr.rounds:
        print(f"round {r['round']}: reward {r['reward_mean']:.3f}, approx KL {r['approx_kl']:.2e}")
    print(json.dumps(acc))
    return {"half": half, "algo": algo, "advantage_groups": advantage_groups, "seed": seed, "rounds": tr.rounds,
            "accuracy": acc,
            "seconds": time.time() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=("residuals", "train"))
    ap.add_argument("--half", choices=("bases-only", "targets-only"), default="bases-only")
    ap.add_argument("--algo", choices=("ddpo", "dpok"), default="ddpo")
    ap.add_argument("--advantage-groups", choices=("prompt", "prompt-kind"), default="prompt",
                    help="prompt: the rounds as the first headline ran them (default here)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the experiment's arm of that seed)")
    ap.add_argument("--out", default=None, help="default: runs/onpolicy-probe/<probe>[-<half>-<algo>-<groups>]")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    name = a.probe if a.probe == "residuals" else f"train-{a.half}-{a.algo}-{a.advantage_groups}" + \
        (f"-s{a.seed}" if a.seed else "")
    out = Path(a.out or f"runs/onpolicy-probe/{name}")
    out.mkdir(parents=True, exist_ok=True)
    res = residuals(out) if a.probe == "residuals" else train_half(out, a.half, a.algo, a.advantage_groups, a.seed)
    (out / "result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
