"""The processors: default attention when idle, exact maps when recording, K/V replaced only in the mask."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dfusion_core.engine.attention import (ROLE_PLAIN, ROLE_REF, ROLE_TARGET, AttentionController, DFusionAttnProcessor,
                                    RowInfo, layer_factor, layer_hw, select_fusion_layers, select_map_layers)
from dfusion_core.engine.reference_cache import ReferenceStore


def _unet_out(model, x, t, emb, added=None):
    kw = {"added_cond_kwargs": added} if added else {}
    return model.unet(x, t, encoder_hidden_states=emb, **kw).sample


def _inputs(model, b=2):
    g = torch.Generator().manual_seed(0)
    c, h, w = model.latent_shape(None, None)
    x = torch.randn(b, c, h, w, generator=g)
    cond = model.encode(["a red dog", "a blue cat"][:b], "", False, *model.default_size())
    added = cond.added_cond
    return x, torch.tensor([500, 300][:b]), cond.cond, added


@pytest.mark.slow
def test_recording_processor_equals_default(any_model):
    x, t, emb, added = _inputs(any_model)
    ctl = any_model.controller
    with torch.no_grad():
        ctl.store = ReferenceStore()
        ctl.map_layers = frozenset(n for n, k in any_model.layer_kinds.items() if k == "cross")
        ctl.begin_call([RowInfo(ROLE_REF, 0, ref=1), RowInfo(ROLE_PLAIN, 0)], cfg=False)
        try:
            recorded = _unet_out(any_model, x, t, emb, added)
        finally:
            ctl.end()
        maps = ctl.store.maps(ROLE_REF, 1, 0)
        ctl.store, ctl.map_layers = None, frozenset()
        procs = any_model.unet.attn_processors
        any_model.unet.set_attn_processor(AttnProcessor2_0())
        try:
            default = _unet_out(any_model, x, t, emb, added)
        finally:
            any_model.unet.set_attn_processor(procs)
    torch.testing.assert_close(recorded, default, atol=1e-5, rtol=1e-5)
    assert set(maps) == {n for n, k in any_model.layer_kinds.items() if k == "cross"}
    for m in maps.values():  # softmax over all 77 tokens
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[0]), atol=1e-5, rtol=0)


def _attn_and_controller(mask):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    ctl = AttentionController()
    ctl.store = ReferenceStore()

    class M:
        def mask(self, ref, base, step, layer, n):
            return mask

    ctl.masker = M()
    ctl.fusion_layers = frozenset({"l"})
    proc = DFusionAttnProcessor(ctl, "l", is_cross=False)
    return attn, ctl, proc


def _reference_then_target(attn, ctl, proc, h_ref, h_tgt):
    """The reference writes its K/V (step 0); the target reads them one call later."""
    ctl.begin_call([RowInfo(ROLE_REF, 0, ref=7)], cfg=False)
    proc(attn, h_ref)
    ctl.begin_call([RowInfo(ROLE_TARGET, 0, ref=7, base=1)], cfg=False)
    fused = proc(attn, h_tgt)
    ctl.end()
    return fused


def test_kv_fusion_replaces_only_masked_positions_and_keeps_queries():
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])
    attn, ctl, proc = _attn_and_controller(mask)
    h_ref, h_tgt = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    fused = _reference_then_target(attn, ctl, proc, h_ref, h_tgt)
    # expected: K*, V* mixed row-wise by the mask, queries from the target
    q = attn.to_q(h_tgt)
    k = torch.where(mask.bool()[None, :, None], attn.to_k(h_ref), attn.to_k(h_tgt))
    v = torch.where(mask.bool()[None, :, None], attn.to_v(h_ref), attn.to_v(h_tgt))
    split = lambda z: z.view(1, 4, 2, 4).transpose(1, 2)
    o = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 2.0, -1) @ split(v)
    expected = attn.to_out[0](o.transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)


def test_empty_mask_or_inactive_step_is_plain_attention():
    for mask in (torch.zeros(4), None):
        attn, ctl, proc = _attn_and_controller(mask)
        h_ref, h_tgt = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
        fused = _reference_then_target(attn, ctl, proc, h_ref, h_tgt)
        torch.testing.assert_close(fused, AttnProcessor2_0()(attn, h_tgt))


def test_layer_geometry_and_selection(sd1, sdxl):
    assert layer_hw(256, (64, 64)) == (16, 16)
    assert layer_hw(24, (16, 24)) == (4, 6)
    assert layer_factor(sd1.unet, "down_blocks.2.attentions.0.transformer_blocks.0.attn2") == 4
    assert layer_factor(sd1.unet, "up_blocks.0.attentions.0.transformer_blocks.0.attn1") == 4
    assert layer_factor(sd1.unet, "mid_block.attentions.0.transformer_blocks.0.attn1") == 4
    paper = select_fusion_layers(sd1.layer_kinds, "mid+up")
    assert paper and all(n.endswith("attn1") and n.startswith(("mid_block", "up_blocks")) for n in paper)
    assert select_fusion_layers(sd1.layer_kinds, ("up_blocks.2",)) < paper
    with pytest.raises(ValueError, match="no self-attention layer"):
        select_fusion_layers(sd1.layer_kinds, ("nowhere",))
    layers, used = select_map_layers(sd1.unet, sd1.layer_kinds, (4,))
    assert used == (4,) and all(n.endswith("attn2") for n in layers)
    # SDXL-shaped tiny UNet has cross-attention at factors 2 (down/up) and 2 (mid) only: closest is used
    _, used_xl = select_map_layers(sdxl.unet, sdxl.layer_kinds, (4,))
    assert used_xl == (2,)
