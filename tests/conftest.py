"""Shared fixtures: tiny random pipelines of each supported shape, saved and loaded back like real ones."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dfusion_core  # noqa: E402,F401  (sets the offline environment)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def pipelines_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipelines")


def _load(kind, pipelines_dir):
    from dfusion_core.engine.loading import load_model
    from dfusion_core.engine.tiny import build_tiny_pipeline

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
