"""Pair records on disk: one JSON line (prompt, seeds, parameters, scores, label) plus one safetensors file
with both trajectories and the masks, plus PNG images; every file is written atomically.

A pair folder's index is `pairs.jsonl`. Several processes building into one folder (`accelerate launch ...
build-pairs`) never append to one file: process `r` appends to `index_name(r)` (rank 0, and every
single-process writer, to `pairs.jsonl`; the others to `pairs.p{r}.jsonl`), a pair's files are named by its
content-derived pair id, and `load_pairs` reads every index, a pair id once. `done/<key>.json` marks a prompt
whose pairs are all listed (written atomically after them), so a rerun after a crash skips it.

The data layer: reading or writing a pair needs torch tensors and safetensors, never a model.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .atomic import write_atomic, write_text_atomic
from .trajectory import Trajectory

FORMAT_VERSION = 1
INDEX = "pairs.jsonl"  # the folder's index: a single-process writer's, and rank 0's
DONE_DIR = "done"  # done/<key>.json: one marker per finished prompt
IMAGE_ROLES = ("base", "reference", "target")  # <pair_id>.<role>.png, each optional
PAIR_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a pair id names its files: a plain name, no dots or separators


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
        for role in IMAGE_ROLES:
            f = d / f"{meta['pair_id']}.{role}.png"
            if f.is_file():
                images[role] = Image.open(f).convert("RGB")
    return record_from_tensors(meta, t, images)


def record_from_tensors(meta: dict, t: dict[str, torch.Tensor], images: dict) -> PairRecord:
    """A PairRecord from its metadata, its safetensors' tensors and its images (KeyError names a missing one)."""
    return PairRecord(prompt=meta["prompt"], base_seed=meta["base_seed"], ref_seed=meta["ref_seed"],
                      scores=meta.get("scores", {}), sampling=meta["sampling"], fusion=meta["fusion"],
                      keywords=meta.get("keywords", []), model_id=meta.get("model_id", ""),
                      target=Trajectory.from_tensors(t, "target", meta["base_seed"]),
                      base=Trajectory.from_tensors(t, "base", meta["base_seed"]), masks=t["masks"], images=images,
                      label=meta.get("label", "target"), pair_id=meta["pair_id"], extra=meta.get("extra", {}))


def index_name(rank: int = 0) -> str:
    """The index file process `rank` appends to: pairs.jsonl for rank 0 (the one file older versions and
    single-process runs write), pairs.p{rank}.jsonl for the others, so no two processes append to one file."""
    return INDEX if rank == 0 else f"pairs.p{int(rank)}.jsonl"


def index_files(out_dir: str | Path) -> list[Path]:
    """A folder's index files in rank order: pairs.jsonl, then pairs.p1.jsonl, pairs.p2.jsonl, ..."""
    d = Path(out_dir)
    ranked = []
    for f in d.glob("pairs.p*.jsonl"):
        rank = f.name[len("pairs.p"):-len(".jsonl")]
        if rank.isdigit():
            ranked.append((int(rank), f))
    return ([d / INDEX] if (d / INDEX).is_file() else []) + [f for _, f in sorted(ranked)]


def is_pair_folder(out_dir: str | Path) -> bool:
    return bool(index_files(out_dir))


def _index_metas(out_dir: str | Path):
    """Every listed pair's metadata, each pair id once (the first listing wins); torn lines are skipped."""
    seen = set()
    for index in index_files(out_dir):
        for line in index.read_text().splitlines():
            try:
                meta = json.loads(line)
                pid = meta["pair_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a killed writer
            if pid not in seen:
                seen.add(pid)
                yield meta


def stored_pair_ids(out_dir: str | Path) -> set[str]:
    """The pair ids a folder's index files list (none if it has no index yet)."""
    return {m["pair_id"] for m in _index_metas(out_dir)}


def start_index(out_dir: str | Path, rank: int = 0) -> Path:
    """Create the folder and process `rank`'s index file (empty if new): the folder reads as a pair folder from
    the start of a build (rank 0's pairs.jsonl is the file older readers look for)."""
    index = Path(out_dir) / index_name(rank)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.touch()
    return index


def _append_line(index: Path, line: str) -> None:
    """Append one line and fsync it; a torn last line (its writer killed mid-write) is closed first, so the new
    line is never glued onto it."""
    with open(index, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def save_record(rec: PairRecord, out_dir: str | Path, rank: int = 0) -> Path:
    """Write one pair's files, then its JSON line last (so a listed pair is whole), to process `rank`'s index."""
    out = Path(out_dir)
    write_record_files(rec, out)
    _append_line(out / index_name(rank), json.dumps(rec.meta()))
    return out


def save_pairs(records: list[PairRecord], out_dir: str | Path) -> Path:
    for r in records:
        save_record(r, out_dir)
    return Path(out_dir)


def load_pairs(out_dir: str | Path, with_images: bool = True) -> list[PairRecord]:
    """Read pairs written by save_pairs / save_record: every index file (pairs.jsonl, then each process's
    pairs.p{rank}.jsonl), each pair id once; a torn last line from a killed writer is skipped."""
    d = Path(out_dir)
    if not is_pair_folder(d):
        raise ValueError(f"{d} holds no pairs.jsonl: not a pair folder")
    return [record_from_files(meta, d, with_images) for meta in _index_metas(d)]


def mark_done(out_dir: str | Path, key: str, info: dict) -> None:
    """Mark the prompt `key` finished (its pairs are listed): done/<key>.json, written atomically."""
    d = Path(out_dir) / DONE_DIR
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / f"{key}.json", json.dumps(info))


def done_markers(out_dir: str | Path) -> dict[str, dict]:
    """key -> info of every prompt marked done in a folder (temp files of a killed writer are not markers)."""
    out = {}
    for f in sorted((Path(out_dir) / DONE_DIR).glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out
