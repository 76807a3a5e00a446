"""Drive the app in a real browser (Debian's Chromium through Playwright): the browser test and the bench.

No browser download: Playwright launches the system Chromium (`executable_path`). The server listens on
127.0.0.1 and a free port; `/_stcore/health` says when it is up; `stop_server` ends exactly that process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CHROMIUM = os.environ.get("IARMEM_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    store: str | os.PathLike, log: str | os.PathLike, timeout_s: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on 127.0.0.1 and a free port with IARMEM_STORE=store; (process, url) once healthy."""
    port = free_port()
    env = {**os.environ, "IARMEM_STORE": str(store)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=REPO,
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {Path(log).read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"streamlit did not become healthy in {timeout_s:.0f} s: {Path(log).read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def chromium(width: int = 1500, height: int = 1800):
    """A Playwright page in a fresh headless Chromium profile; closed and removed on exit."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="iarmem-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": width, "height": height},
            )
            try:
                yield ctx.pages[0]
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


_STATE_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app) return ["", "", 0];
  return [app.getAttribute('data-test-script-state') || '', app.getAttribute('data-test-connection-state') || '',
          document.querySelectorAll('[data-stale="true"]').length];
}"""


def script_state(page) -> tuple[str, str, int]:
    """(script state, connection state, stale elements) as the page itself shows them.

    Streamlit's app root carries ``data-test-script-state`` ("initial" before the first run, "running",
    "notRunning", "rerunRequested", ...) and ``data-test-connection-state``; elements of the previous run
    that a running script has not redrawn yet carry ``data-stale="true"``. These are set from the server's
    messages whatever the toolbar shows (the status widget is hidden in some toolbar modes)."""
    state, conn, stale = page.evaluate(_STATE_JS)
    return str(state), str(conn), int(stale)


def running(page) -> bool:
    state, _, stale = script_state(page)
    return state != "notRunning" or stale > 0


def settle(page, timeout_s: float = 90.0, quiet_s: float = 0.3) -> None:
    """Wait until the script has finished a run and stays idle for `quiet_s`: the page says "notRunning" and
    no element is stale (a first load counts as running until its first run finished)."""
    end = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < end:
        if running(page):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the app was still running after {timeout_s:.0f} s (last state {script_state(page)})")


def exception_text(page) -> str | None:
    loc = page.get_by_test_id("stException")
    return loc.first.inner_text() if loc.count() else None
