"""D-Fusion's attention control as diffusers attention processors.

One processor class replaces diffusers' default in every UNet attention layer. While the controller is
inactive it computes exactly what `AttnProcessor2_0` computes (scaled_dot_product_attention). During a
D-Fusion run the controller says, per batch row, which image the row belongs to:
  * cross-attention layers chosen as mask layers record the softmax attention of the rows that need maps
    (reference, and base for the union option) - explicit softmax for those rows only, SDPA elsewhere;
  * self-attention layers chosen as fusion layers store the reference rows' keys/values and replace the
    target rows' keys/values by  K* = M K_ref + (1 - M) K_tgt  (and V alike), queries untouched.
Layers are addressed by module path ("up_blocks.1.attentions.0.transformer_blocks.0.attn1").
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ROLE_PLAIN, ROLE_REF, ROLE_TARGET, ROLE_BASE = "plain", "ref", "tgt", "base"


@dataclass(frozen=True)
class RowInfo:
    """What one image of the current UNet call is (a CFG batch holds each image twice)."""

    role: str  # plain | ref | tgt | base
    step: int  # 0-based denoising step this row is at
    ref: int = -1  # reference id (ref rows: their own id; target rows: the reference they fuse from)
    base: int = -1  # base id (base rows: their own id; target rows: their base)


@dataclass
class AttentionController:
    """Per-call state shared by all processors of one UNet; inactive = the default attention."""

    active: bool = False
    rows: list[RowInfo] = field(default_factory=list)
    cfg: bool = False  # batch is [uncond rows, cond rows]
    map_layers: frozenset[str] = frozenset()  # cross-attention layers whose maps are recorded
    map_roles: frozenset[str] = frozenset({ROLE_REF})
    fusion_layers: frozenset[str] = frozenset()  # self-attention layers that store / fuse K,V
    store: object | None = None  # a ReferenceStore: put_kv/get_kv/put_map
    masker: object | None = None  # a FusionMasker: mask(ref, base, step, layer, n_tokens) -> Tensor | None
    map_softmax: str = "joint"  # MMDiT maps: softmax over the joint sequence or over the text keys only

    @contextmanager
    def configured(self, store, masker=None, map_layers=frozenset(), fusion_layers=frozenset(),
                   map_roles=frozenset({ROLE_REF}), map_softmax: str = "joint"):
        """Set up one run (fusion, or map recording) and restore the idle state afterwards, whatever happens."""
        self.store, self.masker, self.map_roles = store, masker, frozenset(map_roles)
        self.map_softmax = map_softmax
        self.map_layers, self.fusion_layers = frozenset(map_layers), frozenset(fusion_layers)
        try:
            yield self
        finally:
            self.store = self.masker = None
            self.map_layers = self.fusion_layers = frozenset()
            self.map_roles, self.map_softmax = frozenset({ROLE_REF}), "joint"
            self.end()

    def begin_call(self, rows: list[RowInfo], cfg: bool) -> None:
        self.rows, self.cfg, self.active = rows, cfg, True

    def end(self) -> None:
        self.active, self.rows = False, []

    def batch_rows(self):
        """(batch index, half, RowInfo); half 0 = unconditional, 1 = conditional."""
        n = len(self.rows)
        if self.cfg:
            for half in (0, 1):
                for i, r in enumerate(self.rows):
                    yield half * n + i, half, r
        else:
            for i, r in enumerate(self.rows):
                yield i, 1, r


def layer_name(processor_key: str) -> str:
    return processor_key[: -len(".processor")] if processor_key.endswith(".processor") else processor_key


def layer_factor(unet, name: str) -> int:
    """Downsampling factor of a layer's feature map relative to the latent (1, 2, 4, ...)."""
    n_down = len(unet.config.down_block_types)
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (len(unet.config.up_block_types) - 1 - int(parts[1]))
    if parts[0] == "mid_block":
        return 2 ** (n_down - 1)
    raise ValueError(f"cannot place layer {name!r} in the UNet")


def layer_hw(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Feature-map size of a layer with n_tokens positions, for a latent of size latent_hw (any aspect)."""
    H, W = latent_hw
    f = math.sqrt(H * W / n_tokens)
    h, w = max(1, round(H / f)), max(1, round(W / f))
    if h * w != n_tokens:  # odd sizes round up when downsampling
        h, w = math.ceil(H / round(f)), math.ceil(W / round(f))
    if h * w != n_tokens:
        raise ValueError(f"cannot infer a {n_tokens}-token feature map for a {H}x{W} latent")
    return h, w


class DFusionAttnProcessor:
    """Default attention (SDPA) plus D-Fusion's map recording and masked K/V fusion."""

    def __init__(self, controller: AttentionController, name: str, is_cross: bool):
        self.controller, self.name, self.is_cross = controller, name, is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctl = self.controller
        record_rows: list[int] = []
        if ctl.active:
            if self.is_cross and self.name in ctl.map_layers:
                record_rows = [b for b, half, r in ctl.batch_rows() if half == 1 and r.role in ctl.map_roles]
            elif not self.is_cross and self.name in ctl.fusion_layers:
                key, value = fuse_kv(ctl, self.name, key, value)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        if record_rows:
            out = self._record(attn, query, key, value, attention_mask, record_rows, out)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _record(self, attn, query, key, value, attention_mask, rows, sdpa_out):
        """Explicit softmax for the rows whose maps are read; their output comes from the same probs."""
        ctl = self.controller
        idx = torch.tensor(rows, device=query.device)
        scores = torch.matmul(query[idx], key[idx].transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask[idx]
        probs = scores.float().softmax(dim=-1)
        out = sdpa_out.clone()
        out[idx] = torch.matmul(probs.to(value.dtype), value[idx])
        head_mean = probs.mean(dim=1)  # [rows, N, 77]
        n = len(ctl.rows)
        for j, b in enumerate(rows):
            r = ctl.rows[b % n]
            ident = r.ref if r.role == ROLE_REF else r.base
            ctl.store.put_map(r.role, ident, r.step, self.name, head_mean[j])
        return out


def fuse_kv(ctl: AttentionController, layer: str, key: torch.Tensor, value: torch.Tensor):
    """Store the reference rows' K/V of `layer`; blend them into target rows where the mask says so:
    K* = M K_ref + (1 - M) K_tgt, V* alike ([batch, heads, tokens, dim]; an MMDiT passes its image tokens only)."""
    targets = []
    for b, half, r in ctl.batch_rows():
        if r.role == ROLE_REF:
            ctl.store.put_kv(r.ref, r.step, layer, half, key[b], value[b])
        elif r.role == ROLE_TARGET:
            targets.append((b, half, r))
    if not targets:
        return key, value
    key, value = key.clone(), value.clone()
    n_tokens = key.shape[2]
    for b, half, r in targets:
        m = ctl.masker.mask(r.ref, r.base, r.step, layer, n_tokens)
        if m is None:  # step outside the fusion range
            continue
        k_ref, v_ref = ctl.store.get_kv(r.ref, r.step, layer, half)
        m = m.to(key.device, key.dtype).view(1, n_tokens, 1)
        key[b] = torch.lerp(key[b], k_ref.to(key.device, key.dtype), m)
        value[b] = torch.lerp(value[b], v_ref.to(value.device, value.dtype), m)
    return key, value


def install(unet, controller: AttentionController) -> dict[str, str]:
    """Put a DFusionAttnProcessor in every self/cross-attention layer; returns {layer: 'self'|'cross'}.

    Only layers using diffusers' default processors are taken over; others (IP-Adapter, added-KV) keep
    theirs and cannot be chosen for fusion.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    procs, kinds = {}, {}
    for key, proc in unet.attn_processors.items():
        name = layer_name(key)
        kind = "self" if name.endswith("attn1") else "cross" if name.endswith("attn2") else None
        if kind is not None and isinstance(proc, (AttnProcessor, AttnProcessor2_0, DFusionAttnProcessor)):
            procs[key] = DFusionAttnProcessor(controller, name, kind == "cross")
            kinds[name] = kind
        else:
            procs[key] = proc
    unet.set_attn_processor(procs)
    return kinds


def select_fusion_layers(kinds: dict[str, str], layers) -> frozenset[str]:
    """Self-attention layers for a preset ('mid+up', 'up', 'mid', 'all') or a list of path prefixes."""
    selfs = [n for n, k in kinds.items() if k == "self"]
    if isinstance(layers, str):
        prefixes = {"mid+up": ("mid_block", "up_blocks"), "up": ("up_blocks",), "mid": ("mid_block",),
                    "all": ("",)}[layers]
    else:
        prefixes = tuple(layers)
    chosen = frozenset(n for n in selfs if any(n.startswith(p) for p in prefixes))
    if not chosen:
        raise ValueError(f"no self-attention layer matches {layers!r}; available: {', '.join(sorted(selfs)[:6])} ...")
    return chosen


def select_map_layers(unet, kinds: dict[str, str], factors) -> tuple[frozenset[str], tuple[int, ...]]:
    """Cross-attention layers at the requested downsampling factors, falling back to the closest factor
    the UNet has (e.g. SDXL has none at 1/1, small UNets none at 1/4). Returns (layers, factors used)."""
    crosses = [n for n, k in kinds.items() if k == "cross"]
    if not crosses:
        raise ValueError("this UNet has no cross-attention layer to read masks from")
    by_factor: dict[int, list[str]] = {}
    for n in crosses:
        by_factor.setdefault(layer_factor(unet, n), []).append(n)
    used = []
    for f in factors:
        if f in by_factor:
            used.append(f)
        else:
            used.append(min(by_factor, key=lambda a: (abs(math.log2(a) - math.log2(f)), a)))
    used_t = tuple(sorted(set(used)))
    return frozenset(n for f in used_t for n in by_factor[f]), used_t
