"""Maps -> keyword masks -> per-layer masks."""
import torch

import pytest

from dfusion_core.engine.config import MaskParams
from dfusion_core.engine.masks import aggregate_maps, keyword_mask, keyword_maps, otsu_threshold, resize_mask, threshold_maps


def test_aggregate_upsamples_coarse_layers_and_averages():
    fine = torch.zeros(16, 3)
    fine[:, 1] = 1.0
    coarse = torch.zeros(4, 3)
    coarse[:, 1] = 3.0
    agg = aggregate_maps({"a": fine, "b": coarse}, (4, 4))
    assert agg.shape == (3, 4, 4)
    torch.testing.assert_close(agg[1], torch.full((4, 4), 2.0))


def test_keyword_map_is_mean_of_its_tokens():
    agg = torch.stack([torch.full((2, 2), float(i)) for i in range(5)])
    km = keyword_maps(agg, [(1, 3), (4,)])
    assert km[0, 0, 0] == 2.0 and km[1, 0, 0] == 4.0


def test_otsu_separates_a_bimodal_map():
    x = torch.cat([torch.full((90,), 0.01), torch.full((10,), 0.2)]) + torch.rand(100) * 0.01
    t = otsu_threshold(x)
    assert 0.02 < t <= 0.2
    m = threshold_maps(x.view(1, 10, 10), "auto", 0.0)
    assert int(m.sum()) == 10


def test_threshold_modes():
    m = torch.linspace(0, 1, 100).view(1, 10, 10)
    assert int(threshold_maps(m, "absolute", 0.5).sum()) == 50
    assert int(threshold_maps(m * 2, "relative", 0.5).sum()) == 50
    assert int(threshold_maps(m, "area", 0.2).sum()) == 20


def test_a_diffuse_keyword_spreads_the_union_but_not_the_mean():
    """One keyword peaked on a 3x3 object, one almost flat (a colour word that also sees the background):
    Otsu per keyword then OR covers most of the image; Otsu on the mean map keeps the object."""
    torch.manual_seed(0)
    peaked = torch.full((10, 10), 0.01)
    peaked[2:5, 2:5] = 0.3
    diffuse = 0.05 + 0.01 * torch.rand(10, 10)
    kmaps = torch.stack([peaked, diffuse])
    union = keyword_mask(kmaps, "auto", 0.5, "union")
    mean = keyword_mask(kmaps, "auto", 0.5, "mean")
    assert union.float().mean() > 0.4
    assert mean.sum() == 9 and mean[2:5, 2:5].all()
    with pytest.raises(ValueError, match="combine"):
        MaskParams(combine="max").validate()


def test_resize_nearest_is_blocky_smooth_is_soft():
    m = torch.zeros(4, 4)
    m[1:3, 1:3] = 1
    near = resize_mask(m, (8, 8), "nearest")
    assert set(near.unique().tolist()) == {0.0, 1.0} and near.sum() == 16
    smooth = resize_mask(m, (8, 8), "smooth", feather=1.0)
    assert 0 < smooth.min() or smooth.unique().numel() > 2
    grown = resize_mask(m, (4, 4), "nearest", dilate=1)
    assert grown.sum() == 16


def test_dilate_base_grows_the_bases_objects_and_not_the_references():
    """reference ∪ base with dilate_base: the base's object is erased with a margin of its own, while the
    reference's part keeps its cut (a plain dilate grows both)."""
    from dfusion_core.engine.masks import FusionMasker

    def object_at(r, c):
        m = torch.zeros(8, 8)
        m[r:r + 2, c:c + 2] = 1.0
        return torch.stack([m.flatten(), torch.zeros(64)], 1)  # [positions, tokens]: token 0 is the keyword's

    class Store:
        def maps(self, role, ident, step):
            return {"layer": object_at(0, 0) if role == "ref" else object_at(5, 5)}

    def combined(**kw):
        params = MaskParams(threshold_mode="absolute", threshold=0.5, union_base=True, **kw).validate()
        return FusionMasker(Store(), params, [(0,)], (8, 8), (1, 20)).combined_mask(1, 2, 0)

    plain, grown = combined(), combined(dilate_base=1)
    assert plain.sum() == 8 and grown.sum() == 4 + 16
    assert grown[:2, :2].all() and grown[2, :3].sum() == 0 and grown[:3, 2].sum() == 0  # the reference's: not grown
    assert grown[4:8, 4:8].all()  # the base's 2x2 object grown one cell on every side (clipped by the edge)
    with pytest.raises(ValueError, match="dilate_base must be 0..16"):
        MaskParams(dilate_base=-1).validate()
