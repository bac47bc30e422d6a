"""Any SD 1.x / 2.x / SDXL folder loads; anything else gets a clear error."""
import json
import shutil

import pytest

from dfusion_core.engine.loading import ModelLoadError, load_model


def test_kinds_are_detected(sd1, sd2, sdxl):
    assert (sd1.kind, sd2.kind, sdxl.kind) == ("sd", "sd", "sdxl")
    assert isinstance(sd1.unet.config.attention_head_dim, int)  # SD 1.x: int head count
    assert isinstance(sd2.unet.config.attention_head_dim, list)  # SD 2.x: list
    assert sd2.pipe.scheduler.config.prediction_type == "v_prediction"


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path, device="cpu")


def test_corrupt_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path, device="cpu")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline; supported"):
        load_model(tmp_path, device="cpu")


def test_corrupt_weights(pipelines_dir, sd1, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pipelines_dir / "sd1", bad)
    for f in (bad / "unet").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load folder"):
        load_model(bad, device="cpu")


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="no network here"):
        load_model("someone/some-model-that-is-not-cached", device="cpu")


def test_fp16_on_cpu_is_refused(pipelines_dir):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load_model(pipelines_dir / "sd1", device="cpu", dtype="fp16")


def test_bf16_on_cpu_loads(pipelines_dir, sd1):
    m = load_model(pipelines_dir / "sd1", device="cpu", dtype="bf16")
    import torch
    assert m.unet.dtype == torch.bfloat16
