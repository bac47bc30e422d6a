"""A scripted visit of the app in a real browser (playwright + Debian chromium): Fuse -> a word's mask ->
label with the keyboard -> Dataset. The browser test runs it; `python -m app.walkthrough` uses it to take
the README's screenshots on the embedded model.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .views import PREVIEW_STATUS, SUPERSEDED_STATUS

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def status_text(page) -> str:
    """The Fuse tab's status line as shown."""
    return page.locator("#status [data-testid=markdown]").inner_text().strip()


def next_status(page, old: str, timeout_ms: int) -> str:
    """Wait for the status line to change from `old` (a fusion, a label or an undo answered); the new line. A
    fusion's previews and a superseded fusion's line are passed over: they are not its answer."""
    passing = [PREVIEW_STATUS.split("{")[0], SUPERSEDED_STATUS]
    page.wait_for_function("([old, passing]) => { const e = document.querySelector('#status [data-testid=markdown]');"
                           " const t = e ? e.innerText.trim() : '';"
                           " return t && t !== old && !passing.some(p => t.startsWith(p)); }", arg=[old, passing],
                           timeout=timeout_ms)
    return status_text(page)


def open_and_fuse(p, url: str, prompt: str, word: str, timeout_ms: int):
    """Open the app in a new headless chromium (a sync_playwright handle `p`), type the prompt, wait for its word
    `word`, sample candidates and fuse the suggested pair. Returns (browser, page)."""
    browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1300, "height": 1800})
    page.goto(url)
    box = page.locator("#prompt textarea")
    box.wait_for(timeout=timeout_ms)
    box.fill(prompt)
    box.press("Enter")
    page.locator("#words label", has_text=word).wait_for(timeout=timeout_ms)
    page.click("#sample")
    page.locator("#gallery img").first.wait_for(timeout=timeout_ms)
    page.click("#fuse")
    page.locator("#status", has_text="fused in").wait_for(timeout=timeout_ms)
    return browser, page


def walk(url: str, prompt: str, shots: Path, word: str, timeout_ms: int = 60_000) -> None:
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_and_fuse(p, url, prompt, word, timeout_ms)
        page.locator("#target img").wait_for(timeout=timeout_ms)
        page.locator("#words label", has_text=word).click()
        page.locator("#heat img").wait_for(timeout=timeout_ms)
        page.wait_for_timeout(800)  # images fade in
        page.screenshot(path=str(shots / "fuse.png"), full_page=True)
        page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a text field
        page.keyboard.press("1")
        page.locator("#status", has_text="saved pair").wait_for(timeout=timeout_ms)
        page.get_by_role("tab", name="Dataset").click()
        page.click("#refresh")
        page.locator("#pairs-table", has_text=prompt).wait_for(timeout=timeout_ms)
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "dataset.png"), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="the red circle above the blue square")
    ap.add_argument("--word", default="circle")
    ap.add_argument("--out", default="docs/screenshots")
    ap.add_argument("--store", default=None)
    a = ap.parse_args()
    import tempfile

    import dfusion_core  # noqa: F401
    from dfusion_core.engine.loading import load_model
    from dfusion_core.pairs.scoring import DEFAULT_SCORER, make_scorer

    from .service import AppService
    from .ui import CSS, SHORTCUTS, build_demo

    svc = AppService(load_model(), store_dir=a.store or tempfile.mkdtemp(),
                     scorer=make_scorer() if DEFAULT_SCORER.is_dir() else None)
    demo = build_demo(svc)
    demo.queue().launch(server_name="127.0.0.1", server_port=7899, prevent_thread_lock=True, head=SHORTCUTS, css=CSS,
                        quiet=True)
    try:
        walk("http://127.0.0.1:7899/", a.prompt, Path(a.out), a.word)
    finally:
        demo.close()


if __name__ == "__main__":
    main()
