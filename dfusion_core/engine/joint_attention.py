"""D-Fusion's attention control for MMDiT blocks (SD3 / SD3.5 `SD3Transformer2DModel`).

An MMDiT block runs ONE attention over [image tokens ; text tokens], so every block is both the place where a
keyword's map is read and the place where content is fused (docs/METHOD.md, "Beyond the paper"):
  * map: the image queries' attention to the keyword's text keys (head-averaged), the softmax taken over
    the whole joint sequence ("joint") or over the text keys alone ("text"), for the rows that need maps;
  * fusion: the target's IMAGE keys/values are replaced by the reference's inside the mask,
    K* = M K_ref + (1 - M) K_tgt (V alike); text tokens keep the target's own, queries are untouched.
While the controller is inactive the processor computes exactly what diffusers' JointAttnProcessor2_0 does.
SD3.5's extra image-only attention (`attn2` of its dual-attention blocks) is a plain self-attention: it
can fuse but has no text keys to read maps from. Blocks are addressed by module path
("transformer_blocks.3.attn"), as UNet layers are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import ROLE_REF, AttentionController, fuse_kv

MAP_SOFTMAX = ("joint", "text")


def _qkv(x: torch.Tensor, heads: int, to_q, to_k, to_v, norm_q, norm_k):
    """Queries, keys, values of one stream (image or text) as [batch, heads, tokens, dim], q/k normalised."""
    def split(t):
        return t.view(x.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(to_q(x)), split(to_k(x)), split(to_v(x))
    return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v


class JointDFusionProcessor:
    """JointAttnProcessor2_0 plus D-Fusion's map recording (image -> text) and image-token K/V fusion."""

    def __init__(self, controller: AttentionController, name: str):
        self.controller, self.name = controller, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = _qkv(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        ctl = self.controller
        if ctl.active and self.name in ctl.fusion_layers:
            key, value = fuse_kv(ctl, self.name, key, value)
        has_text = encoder_hidden_states is not None
        if has_text:
            tq, tk, tv = _qkv(encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                              attn.norm_added_q, attn.norm_added_k)
            query, key, value = torch.cat([query, tq], 2), torch.cat([key, tk], 2), torch.cat([value, tv], 2)
        rows = []
        if has_text and ctl.active and self.name in ctl.map_layers:
            rows = [b for b, half, r in ctl.batch_rows() if half == 1 and r.role in ctl.map_roles]
        if rows:  # the rows whose maps are read take the explicit softmax, the others sdpa: no row computed twice
            out = self._record(attn, query, key, value, rows, n_img)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if not has_text:
            return img
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt

    def _record(self, attn, query, key, value, rows, n_img):
        """Attention with the maps of `rows` recorded: those rows by an explicit softmax (whose probs are the
        maps), the rest by sdpa."""
        ctl = self.controller
        idx = torch.tensor(rows, device=query.device)
        scores = torch.matmul(query[idx], key[idx].transpose(-1, -2)) * attn.scale
        probs = scores.float().softmax(dim=-1)
        out = torch.empty_like(query)
        out[idx] = torch.matmul(probs.to(value.dtype), value[idx])
        chosen = set(rows)
        rest = [b for b in range(query.shape[0]) if b not in chosen]
        if rest:
            other = torch.tensor(rest, device=query.device)
            out[other] = F.scaled_dot_product_attention(query[other], key[other], value[other], dropout_p=0.0,
                                                        is_causal=False)
        img_to_text = scores[:, :, :n_img, n_img:].float().softmax(-1) if ctl.map_softmax == "text" \
            else probs[:, :, :n_img, n_img:]
        head_mean = img_to_text.mean(dim=1)  # [rows, N_img, T_text]
        n = len(ctl.rows)
        for j, b in enumerate(rows):
            r = ctl.rows[b % n]
            ctl.store.put_map(r.role, r.ref if r.role == ROLE_REF else r.base, r.step, self.name, head_mean[j])
        return out


def install_joint(transformer, controller: AttentionController) -> dict[str, str]:
    """Put a JointDFusionProcessor in every MMDiT attention; returns {layer: 'joint' | 'self'}.

    'joint' layers see text keys (maps + fusion); 'self' layers (SD3.5's image-only attn2) fuse only.
    Layers whose processor is not diffusers' default joint processor keep theirs.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    procs, kinds = {}, {}
    for key, proc in transformer.attn_processors.items():
        name = key[: -len(".processor")]
        if isinstance(proc, (JointAttnProcessor2_0, JointDFusionProcessor)):
            procs[key] = JointDFusionProcessor(controller, name)
            kinds[name] = "self" if name.endswith("attn2") else "joint"
        else:
            procs[key] = proc
    transformer.set_attn_processor(procs)
    return kinds
