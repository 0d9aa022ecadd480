"""A real browser (Debian's chromium via Playwright) drives the page: pick a misclassified image, choose
its true label, apply, see the plot and the flip set, undo. Saves a screenshot (to $EDITLAB_SCREENSHOT
as well when set, e.g. docs/screenshot.png)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from app_support import launch, make_lab

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # generous: the test machine's cores are shared

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")]




@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    lab = make_lab(tmp_path_factory, request)
    demo, url = launch(lab)
    yield url, lab
    demo.close()


def wait_for_selection_other_than(info, image_id: str) -> str:
    """The selection panel's text once it describes another image (while an event runs, the panel keeps
    the old text under a progress timer, so a plain 'text changed' wait can fire too early)."""
    deadline = time.time() + TIMEOUT_MS / 1000
    while time.time() < deadline:
        text = info.inner_text()
        found = re.search(r"#(\d+)", text)
        if found and found.group(1) != image_id and "true label" in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"the selection did not change from image {image_id}")


def test_fix_a_misclassified_image_in_the_browser(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, lab = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            requested = []
            page.on("request", lambda req: requested.append(req.url))
            page.goto(url)
            thumbnails = page.locator("#browse-gallery .thumbnail-item")
            thumbnails.first.wait_for()
            # The thumbnails are files the app wrote once and Gradio serves as static: they must load.
            page.wait_for_function("() => { const imgs = [...document.querySelectorAll('#browse-gallery img')];"
                                   " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth == 32); }")
            page.wait_for_function("() => { const i = document.querySelector('#selected-image img');"
                                   " return i && i.complete && i.naturalWidth == 256; }")
            info = page.locator("#selected-info")
            sync_api.expect(info).to_contain_text("misclassified")
            first_image = re.search(r"#(\d+)", info.inner_text()).group(1)
            thumbnails.nth(1).click()  # the gallery shows misclassified images only, by default
            text = wait_for_selection_other_than(info, first_image)
            assert "misclassified" in text
            true_label = re.search(r"true label:\s*(\w+)", text).group(1)

            page.locator("#target input").click()
            page.get_by_role("option", name=true_label, exact=True).click()
            sync_api.expect(page.locator("#target input")).to_have_value(true_label)
            page.locator("#max-steps input").fill("50")
            page.locator("#apply").click()

            status = page.locator("#status")
            # An edit takes well under a second on a quiet machine; on a shared one it can take many.
            sync_api.expect(status).to_contain_text("Applied: Edit 1 applied", timeout=120_000)
            sync_api.expect(status).to_contain_text(f"Reached {true_label} in")
            page.locator("#accuracy-plot svg.accuracy-plot").wait_for()
            # The flip sets show the held-out images the report counts (the edited image is never among them).
            sync_api.expect(status).to_contain_text("changed their prediction")
            n_fixed, n_broken = map(int, re.findall(r"(\d+) fixed, (\d+) broken", status.inner_text())[-1])
            sync_api.expect(page.locator("#fixed-gallery .thumbnail-item")).to_have_count(n_fixed)
            sync_api.expect(page.locator("#broken-gallery .thumbnail-item")).to_have_count(n_broken)
            sync_api.expect(page.locator("#views figure")).to_have_count(16)
            sync_api.expect(page.locator("#topk")).to_contain_text(true_label)
            page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
            if os.environ.get("EDITLAB_SCREENSHOT"):
                page.screenshot(path=os.environ["EDITLAB_SCREENSHOT"], full_page=True)

            page.locator("#undo").click()
            sync_api.expect(status).to_contain_text("Undid edit 1", timeout=120_000)
            sync_api.expect(info).to_contain_text("misclassified")

            outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
            assert requested and not outside, f"the page reached outside the app: {outside[:5]}"
            assert len(lab.registry) == 1
            page.close()  # closing the tab ends the session: its workspace is freed
            deadline = time.time() + 30
            while len(lab.registry) and time.time() < deadline:
                time.sleep(0.2)
            assert len(lab.registry) == 0
        finally:
            browser.close()


PROGRESS_WATCH = """() => { window.progressSeen = [];
  new MutationObserver(() => document.querySelectorAll('.progress-text').forEach(
      e => window.progressSeen.push(e.textContent))).observe(document.body,
      {subtree: true, childList: true, characterData: true}); }"""


def test_measure_tab_runs_with_progress_table_plot_and_downloads(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    from app.ui import EDITOR_LABELS
    from editcore import lesson_editors

    url, lab = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("tab", name="Measure: many edits").click()
            # It opens on the stored results of its default settings, and the training histories.
            sync_api.expect(page.locator("#measure-status")).to_contain_text("Stored results")
            sync_api.expect(page.locator("#measure-table table tr")).to_have_count(5)  # header + 2 models x 2 editors
            sync_api.expect(page.locator("#training-history svg.history-panel")).to_have_count(6)

            editors, models = page.locator("#measure-editors"), page.locator("#measure-models")
            for editor in lesson_editors(lab.models):  # the two checked by default
                editors.get_by_label(EDITOR_LABELS[editor], exact=True).uncheck()
            editors.get_by_label("Gradient descent").check()
            models.get_by_label(re.compile("editable-trained")).uncheck()
            page.locator("#measure-n input[type=number]").fill("10")
            page.locator("#measure-n input[type=number]").press("Enter")
            page.locator("#measure-seed input").fill("7")
            page.evaluate(PROGRESS_WATCH)
            page.locator("#measure-run").click()
            status = page.locator("#measure-status")
            sync_api.expect(status).to_contain_text("Done: 1 model × editor row(s), 1 measured now", timeout=300_000)
            assert any("/10 edits" in text for text in page.evaluate("window.progressSeen")), "no progress bar seen"
            table = page.locator("#measure-table")
            sync_api.expect(table).to_contain_text("Gradient descent")
            sync_api.expect(table.locator("tr")).to_have_count(2)
            sync_api.expect(page.locator("#measure-plot svg.drawdown-strip circle")).to_have_count(10)
            sync_api.expect(page.locator("#measure-command")).to_contain_text("--editor gd --protocol other --n-edits 10 "
                                                                              "--seed 7")
            link = page.locator("#measure-files a[href*='summary']").first
            summary = page.request.get(link.get_attribute("href")).text()
            assert summary.startswith("model,editor,") and "\nbaseline,gd," in summary
        finally:
            browser.close()
