"""The app in a real browser: Debian's Chromium driven by Playwright against a live `streamlit run app.py`.

Visits every page, clicks a heatmap cell, runs a short extraction (when the attack is in the build), toggles
an edit, and saves screenshots under test-artifacts/browser/ (gitignored). Needs /usr/bin/chromium
(scripts/setup-dev.sh installs it) and the python package playwright; no browser download.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, chromium, exception_text, settle, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: run scripts/setup-dev.sh"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed"),
]


def no_exception(page) -> None:
    assert exception_text(page) is None, exception_text(page)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("browser-store")
    proc, url = start_server(store, tmp_path_factory.mktemp("log") / "streamlit.log")
    yield url
    stop_server(proc)


def test_every_page_in_the_browser(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as page:
        # 1. opens on the memorization page with the heatmap drawn from the shipped result
        page.goto(server)
        page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
        settle(page)
        no_exception(page)
        page.get_by_text("UnitMem per block x").first.wait_for()
        page.screenshot(path=str(SHOTS / "1-memorization.png"))
        # the heatmap's downloads: its numbers as CSV, the chart as PNG
        buttons = page.get_by_test_id("stDownloadButton")
        with page.expect_download(timeout=30_000) as dl:
            buttons.nth(0).locator("button").click()
        rows = Path(dl.value.path()).read_text().splitlines()
        assert rows[0] == "block,group,group_index,unitmem" and len(rows) > 2
        with page.expect_download(timeout=120_000) as dl:
            buttons.nth(1).locator("button").click()
        assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # clicking a heatmap cell selects it (the first cell: block 0, the coarsest group)
        first = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace").first.locator("path.point")
        assert first.count() >= 2
        first.first.click(force=True)
        settle(page)
        page.get_by_role("heading", name=re.compile(r"^Block 0, ")).wait_for(timeout=30_000)
        page.wait_for_url(re.compile(r"mem_block=0"), timeout=30_000)  # the view is in the address
        no_exception(page)
        page.screenshot(path=str(SHOTS / "2-memorization-cell.png"))

        # 2. the model page
        page.get_by_role("link", name="Model", exact=True).click()
        page.get_by_text("How the model sees an image").wait_for(timeout=60_000)
        settle(page)
        no_exception(page)
        page.screenshot(path=str(SHOTS / "3-model.png"))

        # 3. the extraction page: a short attack when the attack is in this build
        page.get_by_role("link", name="Extraction", exact=True).click()
        page.get_by_role("heading", name=re.compile("^Extraction")).wait_for(timeout=60_000)
        settle(page)
        run = page.get_by_role("button", name="Run the extraction attack")
        if run.count():
            run.click()
            page.get_by_text("Reconstruction vs generation").wait_for(timeout=240_000)
            settle(page)
        no_exception(page)
        page.screenshot(path=str(SHOTS / "4-extraction.png"))

        # 4. the intervention page: the edit changes the samples; switched off, nothing changes
        page.get_by_role("link", name="Intervention", exact=True).click()
        change = page.get_by_text(re.compile("Mean absolute pixel change"))
        change.wait_for(timeout=60_000)
        settle(page)
        before = float(re.search(r"([0-9.]+)", change.inner_text().split(":")[1]).group(1))
        assert before > 0
        page.screenshot(path=str(SHOTS / "5-intervention.png"))
        page.get_by_text("Apply the edit").click()
        settle(page)
        page.get_by_text(re.compile(r"Mean absolute pixel change: 0\.0000")).wait_for(timeout=30_000)
        page.wait_for_url(re.compile(r"iv_edit_on=0"), timeout=30_000)
        no_exception(page)
        page.screenshot(path=str(SHOTS / "6-intervention-off.png"))

        # 5. a refresh keeps the view
        page.reload()
        page.get_by_text(re.compile(r"Mean absolute pixel change: 0\.0000")).wait_for(timeout=60_000)
