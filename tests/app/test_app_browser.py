"""The app in a real browser: Debian's Chromium driven by Playwright against a live `streamlit run app.py`.

Visits every page, clicks a heatmap cell, runs a short extraction (when the attack is in the build), toggles
an edit; checks counts and labels at a tied threshold, a threshold that does not follow a model switch, the
projector layout (1280x720) and one edit measured end to end; saves screenshots under test-artifacts/browser/
(gitignored). Needs /usr/bin/chromium (scripts/setup-dev.sh installs it) and the python package playwright;
no browser download.
"""

from __future__ import annotations

import importlib.util
import re
import time
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
        page.get_by_text("Reconstruction (left) vs generation (right)").wait_for(timeout=240_000)
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


def _tied_threshold() -> tuple[str, float, int, int]:
    """(model, a threshold equal to some candidates' scores, the count there, candidates), from the shipped
    result of the default model: one where a float64 comparison would have counted more."""
    import numpy as np

    from iarmem_app import config
    from iarmem_core import data, extraction
    from iarmem_core.adapters import load_adapter
    from iarmem_core.store import ResultStore

    name = config.default_model()
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    res = extraction.load_extraction(
        st_, extraction.extraction_key(adapter, sel, extraction.ExtractionConfig(), store=st_)
    )
    v = res.table[res.table.split == "train"][res.similarity].to_numpy()
    for t in (round(float(x), 3) for x in np.arange(0.5, 1.0, 0.005)):
        n32 = int(extraction.is_extracted(v, t).sum())
        if (v.astype(np.float64) > t).sum() != n32 and n32 <= 16:
            return name, t, n32, len(v)
    raise AssertionError("no tied threshold in the shipped result")


def _metric(page, label: str, until: str, timeout_s: float = 60.0) -> dict | str:
    """The value of the metric labelled `label` once it reads `until` (a rerun may still be replacing the page's
    elements); after `timeout_s`, every metric's label and value as seen then, for the assertion to show."""
    end = time.monotonic() + timeout_s
    while True:
        seen = page.evaluate(
            """() => [...document.querySelectorAll('[data-testid=stMetric]')].map(e => [
                 (e.querySelector('[data-testid=stMetricLabel]') || {}).innerText || '',
                 (e.querySelector('[data-testid=stMetricValue]') || {}).innerText || ''])"""
        )
        values = [v.strip() for k, v in seen if k.strip() == label]
        if values and values[0] == until:
            return values[0]
        if time.monotonic() > end:
            return {k.strip(): v.strip() for k, v in seen}
        time.sleep(0.1)


def _labels_extracted(page) -> tuple[int, int]:
    caps = page.get_by_test_id("stImageCaption").all_inner_texts()
    return sum(c.strip().endswith(", extracted") for c in caps), sum("not extracted" in c for c in caps)


def test_tie_and_model_switch_in_the_browser(server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    name, tie, want, n = _tied_threshold()
    with chromium() as page:
        page.goto(f"{server}/extraction?ex_threshold={tie}")
        page.get_by_text("Reconstruction (left) vs generation (right)").wait_for(timeout=120_000)
        settle(page)
        no_exception(page)
        shown = _metric(page, "Extracted", until=f"{want} of {n}")
        assert shown == f"{want} of {n}", shown
        # the gallery shows the extracted candidates, every one labelled extracted: the same comparison
        page.wait_for_function(
            "n => [...document.querySelectorAll('[data-testid=stImageCaption]')].length >= n", arg=want
        )
        assert _labels_extracted(page) == (want, 0)
        page.get_by_text(re.compile("your threshold")).first.wait_for()
        page.screenshot(path=str(SHOTS / "7-extraction-tie.png"))
        # switching the model: the other model's own calibrated threshold, not this one
        page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").first.click()
        page.get_by_role("option", name=re.compile("^demo-rar")).click()
        page.get_by_text(re.compile(r"\(calibrated; compared in float32")).wait_for(timeout=120_000)
        settle(page)
        no_exception(page)
        assert f"{tie:.3f}" not in page.get_by_test_id("stSlider").first.inner_text()
        page.screenshot(path=str(SHOTS / "8-extraction-other-model.png"))


def test_projector_1280x720(server):
    """At 1280x720 the heatmap starts above the fold, metric labels are not cut, the CLI popover shows its
    whole command, and the box plot exports at a slide's width."""
    import io

    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium(1280, 720) as page:
        page.goto(server)
        heat = page.locator(".js-plotly-plot .heatmaplayer").first
        heat.wait_for(state="attached", timeout=120_000)
        settle(page)
        no_exception(page)
        box = heat.bounding_box()
        assert box is not None and box["y"] + 0.5 * box["height"] < 720, box  # most of the heatmap is visible
        page.screenshot(path=str(SHOTS / "9-projector-memorization.png"))
        # the box plot's PNG is wide enough for a slide
        png = page.locator(".st-key-mem_dist_png button")
        png.scroll_into_view_if_needed()
        with page.expect_download(timeout=120_000) as dl:
            png.click()
        assert Image.open(io.BytesIO(Path(dl.value.path()).read_bytes())).size[0] >= 1600
        # the extraction page: every metric label whole, the CLI popover's whole command
        page.goto(f"{server}/extraction")
        page.get_by_text("Reconstruction (left) vs generation (right)").wait_for(timeout=120_000)
        settle(page)
        cut = page.evaluate(
            """() => [...document.querySelectorAll('[data-testid=stMetricLabel] p')]
                 .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)"""
        )
        assert cut == [], cut
        page.screenshot(path=str(SHOTS / "10-projector-extraction.png"))
        page.get_by_role("button", name=re.compile("CLI command")).first.click()
        code = page.get_by_test_id("stPopoverBody").locator("code").first
        code.wait_for(timeout=30_000)
        assert "--json" in code.inner_text()  # the end of the command is there
        assert code.evaluate("e => e.scrollWidth <= e.clientWidth + 1 && e.getBoundingClientRect().right <= 1280")
        page.screenshot(path=str(SHOTS / "11-projector-cli-popover.png"))


def test_an_edit_measured_end_to_end(server):
    """A changed edit: new samples at once, then the numbers in stages (extraction, first estimate, full)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as page:
        page.goto(f"{server}/intervention")
        change = page.get_by_text(re.compile("Mean absolute pixel change"))
        change.wait_for(timeout=120_000)
        settle(page)
        before = change.inner_text()
        page.get_by_role("slider", name="Factor").focus()
        page.keyboard.press("ArrowLeft")  # factor 0.45: an edit no store holds
        page.wait_for_url(re.compile(r"iv_factor=0\.45"), timeout=60_000)
        settle(page)
        assert change.inner_text() != before  # new samples
        # the measurement starts by itself and shows its stages as they come (stale text of the previous
        # run is gone once the page settled)
        page.get_by_text(re.compile(r"edit measurement: \d+%")).wait_for(timeout=60_000)
        page.get_by_text(re.compile("first estimate: quality on 200 of 1000 samples")).wait_for(timeout=300_000)
        page.screenshot(path=str(SHOTS / "12-intervention-first-estimate.png"))
        page.get_by_text(re.compile("full measurement: quality on 1000 samples")).wait_for(timeout=540_000)
        settle(page)
        no_exception(page)
        txt = page.get_by_test_id("stMain").inner_text()
        assert "--factor 0.45" in txt and "first estimate" not in txt
        assert "The top units rank" in txt and "p = " in txt and "95%:" in txt
        assert page.locator(".st-key-iv_margins").count() == 1  # the margin view
        page.screenshot(path=str(SHOTS / "13-intervention-measured.png"), full_page=True)
