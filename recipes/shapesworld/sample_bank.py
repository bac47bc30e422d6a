"""A bank of the generator's own samples, each labelled by the world's checker.

    python -m recipes.shapesworld.sample_bank build --model DIR --split train --per-family 24 --seeds 8 --out bank.npz
    python -m recipes.shapesworld.sample_bank auroc --bank test.npz --scorer assets/shapesworld-clip

Pairs are chosen among one prompt's candidates, so a scorer is useful when it ranks a prompt's checker-correct
samples above its wrong ones. Rendered near misses teach the scorer the grammar; they do not show it the
generator's own failures (merged or missing objects, stripes drawn as loose bars, a third object). A bank of the
generator's samples on TRAIN prompts, labelled by the checker, is the scorer's within-prompt ranking data
(`train_clip --bank`, the way reward models are fitted to labelled samples of the model they score); a bank on TEST
prompts measures the within-prompt AUROC of any scorer without sampling again. `build` resumes: prompts already
in OUT are skipped, and OUT is rewritten (atomically) after every batch of prompts.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfusion_core.data.atomic import write_atomic
from dfusion_core.worlds.shapesworld.world import FAMILIES, stratified_prompt_list


@dataclass
class Bank:
    """N samples: uint8 images [N, H, W, 3], and per sample its prompt, family, seed and checker verdict."""
    images: np.ndarray
    prompts: np.ndarray
    families: np.ndarray
    seeds: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls) -> "Bank":
        return cls(np.zeros((0, 0, 0, 3), np.uint8), np.array([], str), np.array([], str), np.array([], np.int64),
                   np.array([], bool))

    @classmethod
    def load(cls, path) -> "Bank":
        with np.load(path) as z:
            return cls(*(z[k] for k in ("images", "prompts", "families", "seeds", "correct")))

    def save(self, path) -> None:
        def write(p):
            with open(p, "wb") as fh:
                np.savez(fh, images=self.images, prompts=self.prompts, families=self.families, seeds=self.seeds,
                         correct=self.correct)
        write_atomic(Path(path), write)

    def extend(self, images, prompts, families, seeds, correct) -> "Bank":
        imgs = np.stack([np.asarray(im, np.uint8) for im in images])
        return Bank(imgs if not len(self.images) else np.concatenate([self.images, imgs]),
                    np.concatenate([self.prompts, prompts]), np.concatenate([self.families, families]),
                    np.concatenate([self.seeds, np.asarray(seeds, np.int64)]),
                    np.concatenate([self.correct, np.asarray(correct, bool)]))

    def ranked_prompts(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(prompt, indices of its correct samples, of its wrong ones) for every prompt that has both."""
        out = []
        for p in dict.fromkeys(self.prompts.tolist()):
            idx = np.flatnonzero(self.prompts == p)
            pos, neg = idx[self.correct[idx]], idx[~self.correct[idx]]
            if len(pos) and len(neg):
                out.append((p, pos, neg))
        return out


def build(model, out: Path, split: str, per_family: int, n_seeds: int, offset: int = 0, prompts_per_batch: int = 2,
          progress=print) -> Bank:
    """Sample `n_seeds` images of `per_family` stratified prompts of each family (from `offset`), check each."""
    from dfusion_core.engine.sampling import sample
    from dfusion_core.worlds.shapesworld.checker import check

    bank = Bank.load(out) if out.exists() else Bank.empty()
    done = set(bank.prompts.tolist())
    todo = [(f, s) for f in FAMILIES for s in stratified_prompt_list(f, split, per_family, offset)
            if s.text not in done]
    sampling = model.default_sampling()
    for i in range(0, len(todo), prompts_per_batch):
        chunk = todo[i:i + prompts_per_batch]
        texts = [s.text for _, s in chunk for _ in range(n_seeds)]
        seeds = [k for _ in chunk for k in range(n_seeds)]
        images = sample(model, texts, seeds, sampling).images
        correct = [check(np.asarray(im), t).correct for im, t in zip(images, texts)]
        bank = bank.extend(images, texts, [f for f, _ in chunk for _ in range(n_seeds)], seeds, correct)
        bank.save(out)
        progress(f"{min(i + prompts_per_batch, len(todo))}/{len(todo)} prompts, {len(bank.correct)} samples, "
                 f"{bank.correct.mean():.2f} correct")
    return bank


def within_prompt_auroc(bank: Bank, scorer, draws: int = 2000, seed: int = 0) -> dict:
    """Per family and overall: the probability that a prompt's correct sample outscores its wrong one (pairs
    weighted equally), over the prompts with both; `ci95` resamples those prompts (a bank holds few of them)."""
    from dfusion_core.worlds.shapesworld.evaluate import auroc

    scores = np.asarray(scorer(list(bank.images), bank.prompts.tolist()), dtype=float)
    per_prompt: dict[str, list[tuple[float, int]]] = {}  # family -> (wins, pairs) of each prompt
    for p, pos, neg in bank.ranked_prompts():
        fam = str(bank.families[pos[0]])
        n = len(pos) * len(neg)
        for key in (fam, "all"):
            per_prompt.setdefault(key, []).append((auroc(scores[pos].tolist(), scores[neg].tolist()) * n, n))
    rng = np.random.default_rng(seed)
    out = {}
    for k, rows in per_prompt.items():
        w, n = np.array(rows).T
        pick = rng.integers(0, len(w), (draws, len(w)))
        boot = w[pick].sum(1) / n[pick].sum(1)
        out[k] = {"auroc": round(float(w.sum() / n.sum()), 4), "pairs": int(n.sum()), "prompts": len(w),
                  "ci95": [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="sample and label a bank (resumes)")
    b.add_argument("--model", required=True, help="generator pipeline folder")
    b.add_argument("--split", default="train", choices=("train", "test"))
    b.add_argument("--per-family", type=int, default=24, help="prompts per family (24)")
    b.add_argument("--seeds", type=int, default=8, help="samples per prompt (8)")
    b.add_argument("--offset", type=int, default=0, help="skip the first OFFSET stratified prompts (0)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--out", required=True, type=Path)
    s = sub.add_parser("auroc", help="within-prompt AUROC of a scorer on a bank")
    s.add_argument("--bank", required=True, type=Path)
    s.add_argument("--scorer", required=True, help="a scorer spec, e.g. an open_clip folder")
    a = ap.parse_args(argv)
    import torch

    if a.cmd == "build":
        from dfusion_core.engine.loading import load_model

        if a.threads:
            torch.set_num_threads(a.threads)
        build(load_model(a.model), a.out, a.split, a.per_family, a.seeds, a.offset)
    else:
        import json

        from dfusion_core.pairs.scoring import make_scorer

        print(json.dumps(within_prompt_auroc(Bank.load(a.bank), make_scorer(a.scorer)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
