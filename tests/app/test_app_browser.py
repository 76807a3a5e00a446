"""The app in a real browser: Debian's Chromium driven by Playwright against a live `streamlit run app.py`.

Visits every page, clicks a heatmap cell, runs a short extraction (when the attack is in the build), toggles
an edit, and saves screenshots under test-artifacts/browser/ (gitignored). Needs /usr/bin/chromium
(scripts/setup-dev.sh installs it) and the python package playwright; no browser download.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("IARMEM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: run scripts/setup-dev.sh"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on 127.0.0.1 and a free port; returns (process, url) once healthy."""
    port = free_port()
    env = {**os.environ, "IARMEM_STORE": str(store)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"streamlit did not become healthy in 60 s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def launch(p, width: int = 1500, height: int = 1800):
    profile = tempfile.mkdtemp(prefix="iarmem-chromium-")
    ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                               viewport={"width": width, "height": height})
    return ctx, profile


def settle(page, timeout_s: float = 90) -> None:
    """Wait until the script run is over (no 'running' indicator) and nothing changed for a moment."""
    time.sleep(0.3)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if page.locator("[data-testid='stStatusWidget']").count() == 0:
            time.sleep(0.4)
            if page.locator("[data-testid='stStatusWidget']").count() == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("the app was still running after %.0f s" % timeout_s)


def no_exception(page) -> None:
    assert page.get_by_test_id("stException").count() == 0, page.get_by_test_id("stException").first.inner_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("browser-store")
    proc, url = start_server(store, tmp_path_factory.mktemp("log") / "streamlit.log")
    yield url
    stop_server(proc)


def test_every_page_in_the_browser(server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        ctx, profile = launch(p)
        try:
            page = ctx.pages[0]
            # 1. opens on the memorization page with the heatmap drawn from the shipped result
            page.goto(server)
            page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
            settle(page)
            no_exception(page)
            page.get_by_text("UnitMem per block x").first.wait_for()
            page.screenshot(path=str(SHOTS / "1-memorization.png"))
            # clicking a heatmap cell selects it (the first cell: block 0, the coarsest group)
            first = page.locator(".js-plotly-plot").first.locator(".scatterlayer .trace").first.locator("path.point")
            assert first.count() >= 2
            first.first.click(force=True)
            settle(page)
            page.get_by_role("heading", name=re.compile(r"^Block 0, ")).wait_for(timeout=30_000)
            assert "mem_block=0" in page.url  # the view is in the address
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
            assert "iv_edit_on=0" in page.url
            no_exception(page)
            page.screenshot(path=str(SHOTS / "6-intervention-off.png"))

            # 5. a refresh keeps the view
            page.reload()
            page.get_by_text(re.compile(r"Mean absolute pixel change: 0\.0000")).wait_for(timeout=60_000)
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
