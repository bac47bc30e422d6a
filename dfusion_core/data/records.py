"""Pair records on disk: one JSON line (prompt, seeds, parameters, scores, label) plus one safetensors file
with both trajectories and the masks, plus PNG images; every file is written atomically.

The data layer: reading or writing a pair needs torch tensors and safetensors, never a model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .trajectory import Trajectory

FORMAT_VERSION = 1


@dataclass
class PairRecord:
    """One preference pair, as stored: winner = target (fused), loser = base."""

    prompt: str
    base_seed: int
    ref_seed: int
    scores: dict  # base / reference / target -> float
    sampling: dict
    fusion: dict
    keywords: list
    model_id: str
    target: Trajectory
    base: Trajectory
    masks: torch.Tensor
    images: dict = field(default_factory=dict)  # base / reference / target -> PIL image
    label: str = "target"  # which image is preferred: target | base | tie
    pair_id: str = ""
    extra: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"format": FORMAT_VERSION, "pair_id": self.pair_id, "prompt": self.prompt,
                "base_seed": self.base_seed, "ref_seed": self.ref_seed, "scores": self.scores,
                "sampling": self.sampling, "fusion": self.fusion, "keywords": self.keywords,
                "model_id": self.model_id, "label": self.label, "extra": self.extra}


def record_tensors(rec: PairRecord) -> dict[str, torch.Tensor]:
    """The tensors of a pair (both trajectories and the masks), ready for safetensors."""
    tensors = {**rec.target.tensors("target"), **rec.base.tensors("base"), "masks": rec.masks.float()}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def write_record_files(rec: PairRecord, out: Path) -> None:
    """<id>.safetensors and <id>.<role>.png, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = record_tensors(rec)
    write_atomic(out / f"{rec.pair_id}.safetensors", lambda p: save_file(tensors, str(p)))
    for role, im in rec.images.items():
        write_atomic(out / f"{rec.pair_id}.{role}.png", lambda p, im=im: im.save(p, format="PNG"))


def record_from_files(meta: dict, d: Path, with_images: bool = True) -> PairRecord:
    """Rebuild a PairRecord from its metadata and the files write_record_files wrote."""
    t = load_file(str(d / f"{meta['pair_id']}.safetensors"))
    images = {}
    if with_images:
        for role in ("base", "reference", "target"):
            f = d / f"{meta['pair_id']}.{role}.png"
            if f.is_file():
                images[role] = Image.open(f).convert("RGB")
    return PairRecord(prompt=meta["prompt"], base_seed=meta["base_seed"], ref_seed=meta["ref_seed"],
                      scores=meta.get("scores", {}), sampling=meta["sampling"], fusion=meta["fusion"],
                      keywords=meta.get("keywords", []), model_id=meta.get("model_id", ""),
                      target=Trajectory.from_tensors(t, "target", meta["base_seed"]),
                      base=Trajectory.from_tensors(t, "base", meta["base_seed"]), masks=t["masks"], images=images,
                      label=meta.get("label", "target"), pair_id=meta["pair_id"], extra=meta.get("extra", {}))


def save_record(rec: PairRecord, out_dir: str | Path) -> Path:
    """Write one pair's files, then its JSON line last (so a listed pair is whole)."""
    out = Path(out_dir)
    write_record_files(rec, out)
    with open(out / "pairs.jsonl", "a") as f:
        f.write(json.dumps(rec.meta()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return out


def save_pairs(records: list[PairRecord], out_dir: str | Path) -> Path:
    for r in records:
        save_record(r, out_dir)
    return Path(out_dir)


def load_pairs(out_dir: str | Path, with_images: bool = True) -> list[PairRecord]:
    """Read pairs written by save_pairs (a torn last line from a killed writer is skipped)."""
    d = Path(out_dir)
    index = d / "pairs.jsonl"
    if not index.is_file():
        raise ValueError(f"{d} holds no pairs.jsonl: not a pair folder")
    records = []
    for line in index.read_text().splitlines():
        try:
            meta = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append(record_from_files(meta, d, with_images))
    return records
