"""Where the reference's per-step keys/values and attention maps live between UNet calls.

A ReferenceStore serves one fusion run: the reference rows write K/V and maps, the target rows read them one
call later. With `keep_all=False` K/V of finished steps are dropped as soon as the target has used them
(memory of one step); with `keep_all=True` the whole run is kept so the ReferenceCache can re-fuse a new
threshold / step range / layer choice by running the target branch alone.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ReferenceStore:
    def __init__(self, device: torch.device | str | None = None, keep_all: bool = True):
        self.device = torch.device(device) if device is not None else None
        self.keep_all = keep_all
        self.kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._maps: dict[tuple, dict[str, torch.Tensor]] = {}
        self.kv_layers: set[str] = set()
        self.map_layers: set[str] = set()

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(self.device, copy=True) if self.device is not None else t.clone()

    def put_kv(self, ref: int, step: int, layer: str, half: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv[(ref, step, layer, half)] = (self._to(k), self._to(v))
        self.kv_layers.add(layer)

    def get_kv(self, ref: int, step: int, layer: str, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.kv[(ref, step, layer, half)]
        except KeyError:
            raise RuntimeError(f"no reference K/V for ref {ref}, step {step}, layer {layer}") from None

    def put_map(self, role: str, ident: int, step: int, layer: str, probs: torch.Tensor) -> None:
        self._maps.setdefault((role, ident, step), {})[layer] = probs.detach().float().to(self.device or probs.device)
        self.map_layers.add(layer)

    def maps(self, role: str, ident: int, step: int) -> dict[str, torch.Tensor]:
        m = self._maps.get((role, ident, step))
        if not m:
            raise RuntimeError(f"no attention maps recorded for {role} {ident} at step {step}")
        return m

    def has_maps(self, role: str, ident: int, step: int) -> bool:
        return bool(self._maps.get((role, ident, step)))

    def finish_step(self, step: int) -> None:
        """The targets have used step `step`: drop its K/V unless the whole run is being cached."""
        if not self.keep_all:
            for key in [k for k in self.kv if k[1] <= step]:
                del self.kv[key]

    def nbytes(self) -> int:
        kv = sum(_nbytes(k) + _nbytes(v) for k, v in self.kv.values())
        return kv + sum(_nbytes(t) for d in self._maps.values() for t in d.values())


@dataclass
class CachedReference:
    """Everything a target-only re-fuse needs about one reference (and, optionally, the base's maps)."""

    store: ReferenceStore
    reference: object  # Trajectory of the reference
    reference_image: object  # PIL image
    base: object | None = None  # Trajectory of the base, when it was replayed
    base_image: object | None = None


class ReferenceCache:
    """LRU cache of reference runs, bounded in bytes.

    Size: per cached reference, K and V at every step for both CFG halves plus the mask layers' maps; for
    SD 1.5 at 512 px in fp16 about 1.85 GB with all self-attention layers (all_layers=True, so a change of
    fusion layers is still a hit) or 1.1 GB with the paper's layers only (docs/ARCHITECTURE.md). Entries
    beyond `max_bytes` evict the least recently used; an entry larger than the whole budget is not cached.
    `device="cpu"` offloads cached tensors from the GPU.
    """

    def __init__(self, max_bytes: int = 4 << 30, device: str | None = None, all_layers: bool = True):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes, self.device, self.all_layers = int(max_bytes), device, all_layers
        self._entries: OrderedDict[tuple, CachedReference] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> CachedReference | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, entry: CachedReference) -> bool:
        size = entry.store.nbytes()
        if size > self.max_bytes:
            return False
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes() > self.max_bytes:
            self._entries.popitem(last=False)
        return True

    def nbytes(self) -> int:
        return sum(e.store.nbytes() for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def forget(self, model_id: str) -> int:
        """Drop the entries computed with the weights `model_id` (keys start with it: fusion's cache key), e.g.
        when a LoRA folder is loaded again with new weights under the same id; entries of other weights stay."""
        stale = [k for k in self._entries if k[0] == model_id]
        for k in stale:
            del self._entries[k]
        return len(stale)
