"""Training data in one format, whatever the source: the app's preference store or a pair folder written by
build-pairs (D-Fusion pairs, or with --random the paper's baseline: winner and loser from different seeds).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..pairs.build import PairRecord, load_pairs


@dataclass
class PreferencePair:
    """winner / loser with their trajectories (latents x_T..x_0, timesteps) and scores."""

    prompt: str
    winner: object  # Trajectory
    loser: object
    winner_score: float | None
    loser_score: float | None
    num_steps: int
    eta: float
    guidance_scale: float
    negative_prompt: str
    # [h, w] in [0, 1]: the fusion mask of a D-Fusion pair (its per-step masks averaged over the fused steps),
    # where winner and loser differ by construction; None for a pair without one (random pairs)
    mask: object = None
    flow_sampler: str = "sde"  # flow models: the sampler that drew the trajectories (their log-probs are its own)


def pair_mask(masks) -> "torch.Tensor | None":
    """A record's fusion mask for training: the mean of its fused steps' masks (steps outside the range are 0),
    or None when it has none (a random pair stores an empty [S, 1, 1] mask)."""
    if masks is None or masks.numel() == 0 or masks.shape[-1] * masks.shape[-2] <= 1 or not masks.any():
        return None
    fused = masks.flatten(1).amax(1) > 0
    return masks[fused].float().mean(0) if fused.any() else None


def pairs_from_records(records: list[PairRecord]) -> list[PreferencePair]:
    """Labelled records -> (winner, loser); ties carry no preference and are skipped."""
    out = []
    for r in records:
        if r.label == "tie":
            continue
        s = r.sampling
        tw, tb = (r.target, r.base) if r.label == "target" else (r.base, r.target)
        sw, sb = (r.scores.get("target"), r.scores.get("base")) if r.label == "target" else \
            (r.scores.get("base"), r.scores.get("target"))
        out.append(PreferencePair(r.prompt, tw, tb, sw, sb, int(s["num_steps"]), float(s["eta"]),
                                  float(s["guidance_scale"]), s.get("negative_prompt", ""), pair_mask(r.masks),
                                  s.get("flow_sampler", "sde")))  # records from before the choice: SDE
    return out


LOG_PROB_ALGOS = ("traj-dpo", "ddpo", "dpok")  # learn from the sampling steps' log-probs (Diffusion-DPO does not)


def load_training_pairs(source: str | Path, algo: str | None = None) -> list[PreferencePair]:
    """A preference store folder (store.sqlite) or a pair folder (pairs.jsonl); `algo`: refuse data it cannot use."""
    p = Path(source).expanduser()
    if (p / "store.sqlite").is_file():
        from ..data.preference_store import PreferenceStore

        records = PreferenceStore(p).records()
    elif (p / "pairs.jsonl").is_file():
        records = load_pairs(p, with_images=False)
    else:
        raise ValueError(f"{p} is neither a preference store (store.sqlite) nor a pair folder (pairs.jsonl)")
    pairs = pairs_from_records(records)
    check_pairs(pairs, algo)
    return pairs


def check_pairs(pairs: list[PreferencePair], algo: str | None = None) -> None:
    """Refuse data no algorithm, or `algo` in particular, can learn from (ValueError with the reason)."""
    if len(pairs) < 2:
        raise ValueError(f"training needs at least two labelled pairs, got {len(pairs)} (ties do not count)")
    shapes = {tuple(p.winner.latents.shape) for p in pairs} | {tuple(p.loser.latents.shape) for p in pairs}
    if len(shapes) != 1:
        raise ValueError(f"pairs have mismatched trajectory shapes {sorted(shapes)}: they come from different "
                         "models, sizes or step counts; train on one kind at a time")
    if len({(p.num_steps, p.eta, p.guidance_scale) for p in pairs}) != 1:
        raise ValueError("pairs were sampled with different steps / eta / guidance; train on one setting at a time")
    samplers = sorted({p.flow_sampler for p in pairs})
    if len(samplers) != 1:
        raise ValueError(f"pairs were drawn with different flow samplers ({', '.join(samplers)}): their log-probs are "
                         "of different step distributions; train on one sampler at a time")
    if algo in LOG_PROB_ALGOS:
        check_log_probs(pairs, algo)


def check_log_probs(pairs: list[PreferencePair], algo: str) -> None:
    """The trajectory methods learn from per-step likelihood ratios: with eta = 0 (deterministic DDIM) no step has
    noise, every log-prob is 0, and training would run with a constant loss and change nothing."""
    eta = pairs[0].eta
    hint = "sample the pairs with eta > 0 (the paper uses 1.0), or train them with dpo, which needs no log-probs"
    if eta == 0:
        raise ValueError(f"{algo} learns from the sampling steps' log-probabilities, but these pairs were sampled "
                         f"with eta = 0 (deterministic DDIM), where every log-probability is 0: {hint}")
    if not any(t.log_probs.any() for p in pairs for t in (p.winner, p.loser)):
        raise ValueError(f"{algo} learns from the sampling steps' log-probabilities, but these pairs' recorded "
                         f"log-probabilities are all 0 (sampled with eta = {eta:g}, {pairs[0].num_steps} steps): "
                         f"{hint}")
