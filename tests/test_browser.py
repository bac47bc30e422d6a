"""A real browser (Debian chromium via playwright): Fuse -> a word's mask -> keyboard label -> Dataset."""
import os
from pathlib import Path

import pytest
from conftest import launch_app

pytest.importorskip("playwright.sync_api")
from app.walkthrough import chromium_path, walk  # noqa: E402

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Debian chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def served(sd1, tmp_path_factory):
    from app.service import AppService

    svc = AppService(sd1, store_dir=tmp_path_factory.mktemp("store"))
    url, demo = launch_app(svc)
    yield url, svc
    demo.close()


def test_click_through_fuse_mask_label_dataset(served, tmp_path):
    url, svc = served
    shots = Path(os.environ.get("DFUSION_SCREENSHOTS", tmp_path))
    n0 = len(svc.store)
    walk(url, "a red dog", shots, word="dog")
    assert len(svc.store) == n0 + 1  # the keyboard shortcut saved the pair
    assert (shots / "fuse.png").stat().st_size > 10_000 and (shots / "dataset.png").is_file()
