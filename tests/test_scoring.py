"""OpenCLIP scorer through a named config + checkpoint file and through a model folder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dfusion_core.pairs.scoring import OpenCLIPScorer, make_scorer

TINY_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("clip")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}", pretrained=None, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def _images():
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]


def test_folder_scorer_returns_cosines(clip_folder):
    s = OpenCLIPScorer(clip_folder, None)
    scores = s(_images(), ["a red square", "a blue square", "a green square"])
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    again = make_scorer(f"openclip:{clip_folder}")(_images(), ["a red square", "a blue square", "a green square"])
    np.testing.assert_allclose(scores, again, atol=1e-6)


def test_named_model_with_checkpoint_file(clip_folder, tmp_path):
    import open_clip

    open_clip.add_model_config(str(_write_named_cfg(tmp_path)))
    s = OpenCLIPScorer("dfusion-test-tiny", str(clip_folder / "open_clip_model.safetensors"))
    ref = OpenCLIPScorer(clip_folder, None)
    np.testing.assert_allclose(s(_images(), ["a", "b", "c"]), ref(_images(), ["a", "b", "c"]), atol=1e-5)


def _write_named_cfg(tmp_path):
    p = tmp_path / "dfusion-test-tiny.json"
    p.write_text(json.dumps(TINY_CFG))
    return p


def test_scorer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown OpenCLIP model"):
        OpenCLIPScorer("NoSuchNet", None)
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        OpenCLIPScorer("ViT-B-32", "not-a-tag")
    with pytest.raises(ValueError, match="no open_clip_config.json"):
        OpenCLIPScorer(tmp_path, None)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("magic:thing")
    with pytest.raises(ValueError, match="unknown scorer 'checker'"):  # the checker judges eval, it scores no pairs
        make_scorer("checker")


def test_paper_scorer_without_network_is_a_clear_error():
    with pytest.raises(ValueError, match="no network here"):
        OpenCLIPScorer("ViT-B-32", "laion2b_s34b_b79k")
