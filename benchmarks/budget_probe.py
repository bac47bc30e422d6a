"""How far does one training budget move the default model? Random-pair DPO or on-policy DDPO on TRAIN prompts,
checker accuracy on TRAIN prompts with held-out seeds before and after (paired difference, 95% interval over
prompts), and the mean pixel change of four fixed samples. The probes that set the evidence harness's budget.

    python benchmarks/budget_probe.py dpo --lr 1e-3 --steps 600 --rank 16 --beta 500
    python benchmarks/budget_probe.py ddpo --lr 5e-3 --inner-epochs 2 --rounds 3

TRAIN prompts: the first 4 per family (pairs: 16 candidates each, cached in --out); evaluation: the first 8 TRAIN
prompts per family x 3 seeds (seed 7: never a candidate seed), the base model's evaluation cached in --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("algo", choices=("dpo", "ddpo"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=600, help="dpo: optimizer steps")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--beta", type=float, default=500.0, help="dpo: beta (beta/2 convention)")
    ap.add_argument("--rounds", type=int, default=3, help="ddpo: on-policy rounds")
    ap.add_argument("--inner-epochs", type=int, default=2, help="ddpo: passes per round")
    ap.add_argument("--out", default="runs/budget-probe")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dfusion_core.engine.config import MaskParams, SamplingParams, apply_model_defaults
    from dfusion_core.engine.loading import load_model
    from dfusion_core.pairs.build import PairingParams, build_random_pairs, load_pairs, save_pairs
    from dfusion_core.engine.sampling import sample
    from dfusion_core.pairs.scoring import make_scorer
    from dfusion_core.worlds.shapesworld import check_images
    from dfusion_core.worlds.shapesworld.evaluate import evaluate
    from experiments.shapesworld.statistics import paired_difference
    from dfusion_core.worlds.shapesworld.world import FAMILIES, prompt_list
    from dfusion_core.training.pair_signal import pair_signal

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, scorer = load_model(None, device="cpu"), make_scorer(None)
    s, _ = apply_model_defaults(model.defaults, SamplingParams(), MaskParams())
    prompts = [x.text for fam in FAMILIES for x in prompt_list(fam, "train", 4)]
    ev = lambda: evaluate(model, None, "train", 8, 3, s, seed=7, localise=False)
    base_file = out / "base_eval.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else ev()
    base_file.write_text(json.dumps(base))
    fixed = lambda: sample(model, "the red circle above the blue square", [1, 2, 3, 4], s).images
    before, t0 = fixed(), time.time()
    if a.algo == "dpo":
        from dfusion_core.training.data import pairs_from_records
        from dfusion_core.training.trainer import TrainConfig, Trainer

        folder = out / "pairs-random"
        if not (folder / "pairs.jsonl").is_file():
            save_pairs(build_random_pairs(model, prompts, scorer, s, PairingParams(num_candidates=16)), folder)
        recs = load_pairs(folder)
        print("pair signal", json.dumps(pair_signal(recs, check_images).as_dict()))
        cfg = TrainConfig(algo="dpo", steps=a.steps, batch_size=8, lr=a.lr, lora_rank=a.rank, dpo_beta=a.beta,
                          ckpt_every=10 ** 6)
        tr = Trainer(model, pairs_from_records(recs), cfg, out / f"dpo-{a.lr}-{a.steps}-{a.rank}-{a.beta}")
        h = tr.run(resume=False, progress=False).history
        mean = lambda rows, k: float(np.mean([r[k] for r in rows]))
        print(f"loss {mean(h[:20], 'loss'):.3f} -> {mean(h[-20:], 'loss'):.3f}, implicit accuracy "
              f"{mean(h[:20], 'implicit_acc'):.2f} -> {mean(h[-20:], 'implicit_acc'):.2f}")
    else:
        from dfusion_core.training.onpolicy import OnPolicyConfig, OnPolicyTrainer

        cfg = OnPolicyConfig(algo="ddpo", rounds=a.rounds, arm="random", batch_size=8, lr=a.lr, lora_rank=a.rank,
                             inner_epochs=a.inner_epochs, steps_per_trajectory=5, ckpt_every=10 ** 6)
        tr = OnPolicyTrainer(model, prompts, scorer, cfg, out / f"ddpo-{a.lr}-{a.inner_epochs}", sampling=s,
                             pairing=PairingParams(num_candidates=8))
        tr.run(resume=False, progress=False)
        for r in tr.rounds:
            print({k: r.get(k) for k in ("round", "reward_mean", "ratio", "approx_kl", "clipfrac")})
    tr.net.eval()
    after_eval, after = ev(), fixed()
    tr.unload()
    change = np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(after, before)])
    print(f"trained in {time.time() - t0:.0f}s; pixel change of 4 fixed samples {change:.1f} / 255")
    for f in [*FAMILIES, "all"]:
        d = paired_difference(after_eval["rows"], base["rows"], f)
        print(f"{f}: accuracy {base['families'][f]['accuracy']:.3f} -> {after_eval['families'][f]['accuracy']:.3f}, "
              f"paired {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")


if __name__ == "__main__":
    main()
