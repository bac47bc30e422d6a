"""A real browser (Debian chromium via playwright): Fuse -> a word's mask -> keyboard label -> Dataset."""
import os
import shutil

import pytest
from conftest import launch_app

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def served(sd1, tmp_path_factory):
    from app.service import AppService
    svc = AppService(sd1, store_dir=tmp_path_factory.mktemp("store"))
    url, demo = launch_app(svc)
    yield url, svc
    demo.close()


def test_click_through_fuse_mask_label_dataset(served, tmp_path):
    url, svc = served
    shots = os.environ.get("DFUSION_SCREENSHOTS", str(tmp_path))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1800})
        page.goto(url)
        box = page.locator("#prompt textarea")
        box.wait_for(timeout=30_000)
        box.fill("a red dog")
        box.press("Enter")
        page.locator("#words label", has_text="dog").wait_for(timeout=30_000)
        page.click("#sample")
        page.locator("#gallery img").first.wait_for(timeout=60_000)
        assert page.locator("#gallery img").count() >= 2
        page.click("#fuse")
        page.locator("#status", has_text="fused in").wait_for(timeout=60_000)
        page.locator("#target img").wait_for(timeout=30_000)
        page.screenshot(path=f"{shots}/fuse.png", full_page=True)
        page.locator("#words label", has_text="dog").click()
        page.locator("#heat img").wait_for(timeout=30_000)
        n0 = len(svc.store)
        page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a text field
        page.keyboard.press("1")
        page.locator("#status", has_text="saved pair").wait_for(timeout=30_000)
        assert len(svc.store) == n0 + 1
        page.get_by_role("tab", name="Dataset").click()
        page.click("#refresh")
        page.locator("#pairs-table", has_text="a red dog").wait_for(timeout=30_000)
        page.screenshot(path=f"{shots}/dataset.png", full_page=True)
        browser.close()
