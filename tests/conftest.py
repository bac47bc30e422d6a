"""Shared fixtures: tiny random pipelines of each supported shape, saved and loaded back like real ones."""
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# the tests never download: set before any Hugging Face library is imported (dfusion_core itself leaves it to users)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import dfusion_core  # noqa: E402,F401  (telemetry off)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(items):
    """A browser or multi-process test is slow too: `-m "not slow"` (the quick tier) leaves them all out."""
    for item in items:
        if item.get_closest_marker("browser") or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pipelines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipelines")


def _load(kind, pipelines_dir):
    from dfusion_core.engine.loading import load_model
    from dfusion_core.testing.tiny import build_tiny_pipeline

    path = pipelines_dir / kind
    if not path.exists():
        build_tiny_pipeline(kind, path)
    return load_model(path, device="cpu")


@pytest.fixture(scope="session")
def sd1(pipelines_dir):
    return _load("sd1", pipelines_dir)


@pytest.fixture(scope="session")
def sd2(pipelines_dir):
    return _load("sd2", pipelines_dir)


@pytest.fixture(scope="session")
def sdxl(pipelines_dir):
    return _load("sdxl", pipelines_dir)


@pytest.fixture(scope="session")
def sd3(pipelines_dir):
    return _load("sd3", pipelines_dir)


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def any_model(request, pipelines_dir):
    """Every UNet shape."""
    return _load(request.param, pipelines_dir)


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl", "sd3"])
def every_family(request, pipelines_dir):
    """Every supported shape, UNets and the SD3-shaped MMDiT: for behaviour the family seam must keep."""
    return _load(request.param, pipelines_dir)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from dfusion_core.engine.tokenizer_build import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def launch_app(svc):
    """Serve the app for `svc` on a free local port; returns (url, demo)."""
    import socket

    from app.ui import CSS, SHORTCUTS, build_demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(svc)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, head=SHORTCUTS, css=CSS,
                        quiet=True)
    return f"http://127.0.0.1:{port}/", demo


def write_random_lora(model, folder, seed: int, rank: int = 4, scale: float = 0.3):
    """A LoRA folder (diffusers' peft key names) with nonzero A and B on every attention projection of the
    denoiser: unlike a fresh adapter (B = 0) it changes what the model computes."""
    import torch
    from safetensors.torch import save_file

    g, state = torch.Generator().manual_seed(seed), {}
    for name, mod in model.denoiser.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * scale
            state[f"unet.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


@contextmanager
def fused_page(svc, wait_ms: int, prompt: str = "a red dog", word: str = "dog"):
    """A chromium page on the app of `svc` with `prompt` sampled and fused once (word's heatmap shown)."""
    from playwright.sync_api import sync_playwright

    from app.walkthrough import open_and_fuse

    url, demo = launch_app(svc)
    try:
        with sync_playwright() as p:
            browser, page = open_and_fuse(p, url, prompt, word, wait_ms)
            try:
                yield page
            finally:
                browser.close()
    finally:
        demo.close()
