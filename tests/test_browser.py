"""A real browser (Debian chromium via playwright): Fuse -> a word's mask -> keyboard label -> Dataset; then the
Fuse tab's controls one by one: shortcuts whatever has the focus, the threshold slider of each mode, a refused
fusion, step sliders that cannot cross, neutral names."""
import os
import re
from pathlib import Path

import pytest
from conftest import fused_page, launch_app

pytest.importorskip("playwright.sync_api")
from app.walkthrough import chromium_path, next_status, status_text, walk  # noqa: E402

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium_path() is None, reason="Debian chromium is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def served(sd1, tmp_path_factory):
    from app.service import AppService

    svc = AppService(sd1, store_dir=tmp_path_factory.mktemp("store"))
    url, demo = launch_app(svc)
    yield url, svc
    demo.close()


@pytest.mark.slow
def test_click_through_fuse_mask_label_dataset(served, tmp_path):
    url, svc = served
    shots = Path(os.environ.get("DFUSION_SCREENSHOTS", tmp_path))
    n0 = len(svc.store)
    walk(url, "a red dog", shots, word="dog")
    assert len(svc.store) == n0 + 1  # the keyboard shortcut saved the pair
    assert (shots / "fuse.png").stat().st_size > 10_000 and (shots / "dataset.png").is_file()


# ---- one fused pair in one page, for the checks of the Fuse tab's controls below -----------------------
WAIT_MS = 180_000  # a re-fusion can take seconds on a loaded CPU


@pytest.fixture(scope="module")
def fused(sd1, tmp_path_factory):
    """A page (on its own app and store) with 'a red dog' sampled and fused once: (page, service)."""
    from app.service import AppService

    svc = AppService(sd1, store_dir=tmp_path_factory.mktemp("store"))
    with fused_page(svc, WAIT_MS) as page:
        yield page, svc


def _status(page) -> str:
    return status_text(page)


def _next_status(page, old: str) -> str:
    """Wait for the status line to change from `old` (a fusion, a label or an undo answered)."""
    return next_status(page, old, WAIT_MS)


def _coverage(status: str) -> float:
    return int(re.search(r"mask covers (\d+)%", status).group(1)) / 100


def _set_slider(page, elem_id: str, value) -> str:
    """Type a value into a slider's number box and leave it (a release, as a drag ends): the next status."""
    old, box = _status(page), page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()
    return _next_status(page, old)


@pytest.mark.slow
def test_shortcuts_work_while_a_checkbox_radio_or_slider_has_focus(fused):
    page, svc = fused
    n0 = len(svc.store)
    for control in ("#use-mask input[type=checkbox]", "#keywords input[type=checkbox]", "#words input[type=radio]",
                    "#start-step input[type=range]"):
        page.locator(control).first.focus()
        old = _status(page)
        page.keyboard.press("1")
        saved = _next_status(page, old)
        assert saved.startswith("saved pair") and len(svc.store) == n0 + 1, control
        page.locator(control).first.focus()
        page.keyboard.press("z")
        assert _next_status(page, saved).startswith("removed pair") and len(svc.store) == n0, control
    box = page.locator("#start-step input[type=number]")  # a text box keeps its keys: typing a digit labels nothing
    box.focus()
    page.keyboard.press("1")
    page.wait_for_timeout(1000)
    assert len(svc.store) == n0 and _status(page).startswith("removed pair")
    box.fill("3")
    box.blur()
    page.locator("#status", has_text="fused in").wait_for(timeout=WAIT_MS)


@pytest.mark.slow
def test_threshold_slider_spans_where_the_mask_changes_and_is_off_where_it_does_nothing(fused):
    page, _ = fused
    slider = page.locator("#threshold input[type=range]")
    assert slider.is_disabled()  # auto: Otsu picks the cut, the slider would do nothing
    assert "auto" in page.locator("#threshold").inner_text()
    old = _status(page)
    page.locator("#threshold-mode label", has_text="absolute").click()
    _next_status(page, old)
    page.wait_for_function("() => !document.querySelector('#threshold input[type=range]').disabled",
                           timeout=WAIT_MS)
    lo, hi = (float(x) for x in slider.evaluate("e => [e.min, e.max]"))
    assert 0 <= lo < hi < 0.5, (lo, hi)  # this map's attention probabilities, not the whole [0, 1]
    full, middle, empty = (_coverage(_set_slider(page, "threshold", v)) for v in (lo, (lo + hi) / 2, hi))
    assert full >= 0.6 and empty <= 0.1 and full > middle > empty, (full, middle, empty)
    old = _status(page)
    page.locator("#use-mask input").click()  # no mask: the threshold does nothing
    _next_status(page, old)
    page.wait_for_function("() => document.querySelector('#threshold input[type=range]').disabled", timeout=WAIT_MS)
    old = _status(page)
    page.locator("#use-mask input").click()
    _next_status(page, old)
    old = _status(page)
    page.locator("#threshold-mode label", has_text="auto").click()
    _next_status(page, old)
    page.wait_for_function("() => document.querySelector('#threshold input[type=range]').disabled", timeout=WAIT_MS)
    legend = page.locator("#mask-legend").inner_text()
    assert "untinted" in legend and "tinted" in legend and "reference" in legend


@pytest.mark.slow
def test_a_refused_fusion_keeps_the_last_outputs_and_says_why(fused):
    page, _ = fused
    before = page.locator("#target img").get_attribute("src")
    status = _status(page)
    box = page.locator("#prompt textarea")
    box.fill("")
    box.blur()
    page.locator("#keywords label").first.wait_for(state="detached", timeout=WAIT_MS)  # the words follow the box
    page.click("#fuse")
    page.locator("#prompt", has_text="prompt is empty").wait_for(timeout=WAIT_MS)  # said at the prompt
    msg = page.locator("#prompt div.validation-error")  # (the box itself gets the class too)
    assert msg.evaluate("e => getComputedStyle(e).pointerEvents") == "none"  # clicks reach the control
    m, t = msg.bounding_box(), box.bounding_box()  # the message covers no part of the box it is about
    assert m["y"] + m["height"] <= t["y"] + 1 or t["y"] + t["height"] <= m["y"] + 1, (m, t)
    page.wait_for_timeout(500)
    for panel in ("#base", "#reference", "#target", "#mask", "#status"):  # no panel replaced by an error badge
        assert "Error" not in page.locator(panel).inner_text(), panel
    assert page.locator("#target img").get_attribute("src") == before and _status(page) == status
    box.fill("a red dog")
    box.press("Enter")
    page.locator("#keywords label", has_text="dog").wait_for(timeout=WAIT_MS)
    ref = page.locator("#ref-seed textarea, #ref-seed input").first
    seed = ref.input_value()
    ref.fill(page.locator("#base-seed textarea, #base-seed input").first.input_value())
    page.click("#fuse")
    page.locator("#ref-seed", has_text="same seed").wait_for(timeout=WAIT_MS)
    assert page.locator("#target img").get_attribute("src") == before
    ref.fill(seed)


@pytest.mark.slow
def test_the_fusion_step_sliders_cannot_cross(fused):
    """...and after every fusion both boxes show the range the target was fused with (typed values, followed ones
    and ones typed past the slider's end alike)."""
    page, _ = fused
    start = page.locator("#start-step input[type=number]")
    end = page.locator("#end-step input[type=number]")
    n = int(end.get_attribute("max"))

    def shown(status):
        page.wait_for_function("r => document.querySelector('#start-step input[type=number]').value + '-' + "
                               "document.querySelector('#end-step input[type=number]').value === r",
                               arg=re.search(r"steps (\d+-\d+)", status).group(1), timeout=10_000)
        return status
    assert "steps 2-2" in shown(_set_slider(page, "end-step", 2))  # the end moved below the start: the start follows
    assert start.input_value() == "2"
    assert "steps 5-5" in shown(_set_slider(page, "start-step", 5))  # the start moved past the end: the end follows
    assert end.input_value() == "5"
    assert "steps 3-3" in shown(_set_slider(page, "end-step", 3))
    assert f"steps 3-{n}" in shown(_set_slider(page, "end-step", n))
    box = page.locator("#end-step input[type=number]")
    box.fill(str(n + 5))  # past the slider's end: the boxes come back to the range the target was fused with
    box.blur()
    page.wait_for_timeout(3000)
    shown(f"steps 3-{n}")
    assert f"steps 3-{n}" in _status(page)


def test_the_fuse_tab_names_no_winner(fused):
    page, _ = fused
    text = page.locator("body").inner_text().lower()
    assert "winner" not in text and "loser" not in text
    for elem, name in (("#base", "Base"), ("#reference", "Reference"), ("#target", "Target")):
        assert name in page.locator(elem).inner_text()
    classes = [page.locator(f"#label-{lab}").get_attribute("class") for lab in ("target", "base", "tie", "skip")]
    assert len({" ".join(sorted(c.split())) for c in classes}) == 1  # no answer looks like the expected one


@pytest.mark.slow
def test_the_dataset_tab_shows_a_pair_labelled_in_the_fuse_tab_without_refresh_and_undoes_a_delete(fused):
    page, svc = fused
    old = _status(page)
    page.click("#label-tie")
    pid = _next_status(page, old).split()[2]
    page.get_by_role("tab", name="Dataset").click()  # the table was drawn when the page opened, before the label
    row = page.locator("#pairs-table [role=row]", has_text=pid)
    row.wait_for(timeout=WAIT_MS)
    row.locator("[role=gridcell]").first.click()  # the row's id goes to the pair id box
    page.wait_for_function("pid => [...document.querySelectorAll('#dataset-tab textarea, #dataset-tab input')]"
                           ".some(e => e.value === pid)", arg=pid, timeout=WAIT_MS)
    page.click("#delete-pair")
    page.locator("#dataset-status", has_text="Undo delete").wait_for(timeout=WAIT_MS)
    row.wait_for(state="detached", timeout=WAIT_MS)
    assert pid not in svc.store.ids()
    page.click("#undo-delete")
    page.locator("#dataset-status", has_text="restored as 'tie'").wait_for(timeout=WAIT_MS)
    row.wait_for(timeout=WAIT_MS)
    assert svc.store.get(pid, with_images=False).label == "tie"
    svc.store.delete(pid)
    page.get_by_role("tab", name="Fuse").click()


@pytest.mark.slow
def test_a_new_page_shows_its_weights_and_its_fine_tunes_state(fused):
    """A page opened (a new session) names its weights under the header; its Train tab says no fine-tune of
    this session exists and where runs go, with a progress bar, not a slider."""
    page, svc = fused
    context = page.context.browser.new_context()  # the same browser, a new gradio session
    fresh = context.new_page()
    try:
        fresh.goto(page.url)
        fresh.locator("#session-weights", has_text="computes with the base weights").wait_for(timeout=WAIT_MS)
        fresh.get_by_role("tab", name="Train").click()
        status = fresh.locator("#train-status", has_text="no fine-tune started in this session")
        status.wait_for(timeout=WAIT_MS)
        assert str(svc.runs_dir.resolve()) not in status.inner_text()  # the runs folder, without the server's path
        assert f"runs are written under {svc.runs_dir.name}" in status.inner_text()
        assert fresh.locator("#train-progress progress").count() == 1
        assert fresh.locator("#train-progress input[type=range]").count() == 0
    finally:
        context.close()


@pytest.mark.slow
def test_a_refused_action_is_a_toast_and_blanks_no_panel(fused):
    """Train, Ablations and Dataset actions refused before they start (a new session: no fine-tune, no fused pair,
    no row picked) say why in a toast, and the panels they would fill keep what they showed: no Error badge."""
    page, _ = fused
    actions = [("Train", "Cancel", "no fine-tune of this session is running", ["#train-message", "#train-status"]),
               ("Train", "Resume", "no fine-tune of this session to resume", ["#train-message", "#train-status"]),
               ("Train", "Load into the Fuse view", "no trained weights yet", ["#train-message", "#session-weights"]),
               ("Ablations", "Run the ablation grid", "fuse a pair first", ["#ablation-gallery", "#ablation-plot"]),
               ("Dataset", "Relabel", "click a row first", ["#dataset-status", "#pairs-table"])]
    context = page.context.browser.new_context()  # the same browser, a new gradio session
    fresh = context.new_page()
    try:
        fresh.goto(page.url)
        fresh.locator("#session-weights", has_text="computes with the base weights").wait_for(timeout=WAIT_MS)
        for tab, button, message, panels in actions:
            fresh.get_by_role("tab", name=tab).click()
            fresh.get_by_role("button", name=button, exact=True).click()
            toast = fresh.locator(".toast-body", has_text=message)
            toast.wait_for(timeout=WAIT_MS)
            fresh.wait_for_timeout(300)
            for panel in panels:
                assert "Error" not in fresh.locator(panel).inner_text(), (button, panel)
            toast.locator(".toast-close").click()
    finally:
        context.close()
