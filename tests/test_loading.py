"""Any SD 1.x / 2.x / SDXL folder loads; anything else gets a clear error."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_random_lora

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
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and downloads are off"):
        load_model("someone/some-model-that-is-not-cached", device="cpu")


def test_importing_the_library_leaves_downloads_on_and_telemetry_off():
    """A notebook that imports dfusion_core can still load a hub id: only telemetry is switched off."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_HUB_DISABLE_TELEMETRY")}
    code = ("import os, dfusion_core; from huggingface_hub import constants; "
            "print(os.environ.get('HF_HUB_OFFLINE'), constants.HF_HUB_OFFLINE, os.environ.get('HF_HUB_DISABLE_TELEMETRY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False", "1"]


def test_fp16_on_cpu_is_refused(pipelines_dir):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        load_model(pipelines_dir / "sd1", device="cpu", dtype="fp16")


def test_bf16_on_cpu_loads(pipelines_dir, sd1):
    m = load_model(pipelines_dir / "sd1", device="cpu", dtype="bf16")
    import torch
    assert m.unet.dtype == torch.bfloat16


@pytest.mark.slow
def test_several_loras_stay_loaded_and_each_call_picks_its_weights(pipelines_dir, sd1, tmp_path):
    """Adapters are kept by name; use_lora switches between them and back to the exact base weights (every
    adapter off), and model_id always names the weights that compute."""
    import torch

    from dfusion_core.engine.config import SamplingParams
    from dfusion_core.engine.sampling import sample

    m = load_model(pipelines_dir / "sd1", device="cpu")  # its own copy: the shared sd1 stays untouched
    la, lb = write_random_lora(m, tmp_path / "a", 0), write_random_lora(m, tmp_path / "b", 1)

    def final():
        return sample(m, "a red dog", [3], SamplingParams(num_steps=3)).trajectories[0].final

    base = final()
    m.load_lora(la, "a")
    assert m.model_id == f"{m.base_id}+lora:{la}"
    out_a = final()
    m.load_lora(lb, "b")
    out_b = final()
    assert sorted(m.lora_adapters()) == ["a", "b"] and m.model_id.endswith(str(lb))
    assert (out_a - base).abs().max() > 1e-3 and (out_b - out_a).abs().max() > 1e-3
    m.use_lora(None)
    assert m.model_id == m.base_id and sorted(m.lora_adapters()) == ["a", "b"]
    assert torch.equal(final(), base)  # base = adapters off, bit for bit
    m.use_lora("a")
    assert torch.equal(final(), out_a) and m.model_id.endswith(str(la))
    with pytest.raises(ValueError, match="no LoRA adapter 'c' is loaded"):
        m.use_lora("c")
    assert m.unload_lora("a") and m.model_id == m.base_id  # the active one went: back to the base
    assert m.unload_lora("b") and not m.unload_lora("b") and m.lora_adapters() == []
    m.load_lora(la, "a2")  # after the last adapter went, a new one computes (no layer left switched off)
    assert torch.equal(final(), out_a)


def test_a_cached_hub_id_without_t5_loads_with_its_familys_defaults(pipelines_dir, sd3, tmp_path, monkeypatch):
    """An SD3 repository without T5 in the local Hugging Face cache loads offline (T5 passed as absent, as for a
    folder), and the app's page gets the family's defaults before it loads (peek_model), as load_model applies."""
    import huggingface_hub.constants as hc

    from dfusion_core.engine.loading import peek_model

    repo = tmp_path / "models--someone--tiny-sd3"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(pipelines_dir / "sd3", snap, symlinks=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    source, defaults = peek_model("someone/tiny-sd3")
    assert defaults == {"eta": 0.7}
    m = load_model("someone/tiny-sd3", device="cpu")
    assert m.kind == "sd3" and m.pipe.text_encoder_3 is None and m.default_sampling().eta == 0.7


def test_diffusers_note_that_a_text_encoder_got_no_lora_keys_is_quietened_and_other_warnings_stay():
    """Every load of a denoiser-only adapter made diffusers print two paragraphs about the text encoders."""
    import io

    from diffusers.utils import logging as dlog

    from dfusion_core.engine.loading import _keep_diffusers_record, quiet_shared_encoder_reports

    log = dlog.get_logger("diffusers.loaders.lora_base")
    handler = dlog._get_library_root_logger().handlers[0]  # diffusers' own stderr handler
    handler.removeFilter(_keep_diffusers_record)  # as before any model loaded in this process
    note = "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder'."
    stream = io.StringIO()
    old = handler.setStream(stream)
    try:
        log.warning(note)
        assert note in stream.getvalue()  # what diffusers prints unfiltered
        quiet_shared_encoder_reports()
        stream.truncate(0)
        stream.seek(0)
        log.warning(note)
        log.warning("an unrelated diffusers warning")
    finally:
        handler.setStream(old)
    assert note not in stream.getvalue() and "an unrelated diffusers warning" in stream.getvalue()
