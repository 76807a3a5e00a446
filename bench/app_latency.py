"""App latency measured in a real browser (Debian's Chromium via Playwright); prints one JSON object.

- cold_start_s: `streamlit run app.py` started (a fresh process, empty user store, so the shipped results
  are read) until the memorization heatmap is drawn in the page. Target < 10 s on 2 CPU cores.
- edit_to_samples_s: the edit's factor changed on the intervention page (one slider step) until the new
  side-by-side samples for 8 demo images are shown and the page is idle; median of `--repeats`. Target < 2 s.
  (On the demo models each new edit also starts its measurement in the background, as for a user.)
- "Idle" is `tests/support/browser.settle`: the page's own script state (``data-test-script-state`` of the
  app root) says "notRunning" and no element is stale, whatever the toolbar shows.
- threshold_recount_s: the extraction threshold moved (Home/End on the slider) until the counts change and
  the page is idle; median of `--repeats`. Target < 0.5 s. Needs iarmem_core.extraction; the attack runs
  first when no result is stored or shipped.

    python -m bench.app_latency [--repeats 5]     (from the repository root: it drives tests/support/browser.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

from iarmem_app import config
from tests.support import browser

REPO = Path(__file__).resolve().parent.parent


def _wait_change(page, locator, before: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if locator.inner_text(timeout=1000) != before:
                return
        except Exception:  # the element is being redrawn
            pass
        time.sleep(0.01)
    raise TimeoutError("the page did not change")


QUERY = {"device": ""}  # "&device=cuda" when --device is given (the app's sidebar device, from the URL)


def cold_start(page, store: Path, log: Path) -> tuple[float, object, str]:
    t0 = time.perf_counter()
    proc, url = browser.start_server(store, log)
    page.goto(url + ("?" + QUERY["device"][1:] if QUERY["device"] else ""))
    page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(state="attached", timeout=120_000)
    return time.perf_counter() - t0, proc, url


def edit_to_samples(page, url: str, repeats: int) -> list[float]:
    page.goto(url + "/intervention?iv_labels=0,1,2,3,4,5,6,7" + QUERY["device"])
    line = page.get_by_text(re.compile("Mean absolute pixel change"))
    line.wait_for(timeout=120_000)
    browser.settle(page)
    thumb = page.get_by_role("slider", name="Factor")
    out = []
    for i in range(repeats):
        before = line.inner_text()
        thumb.focus()
        t0 = time.perf_counter()
        page.keyboard.press("ArrowLeft" if i % 2 == 0 else "ArrowRight")
        _wait_change(page, line, before)
        browser.settle(page, quiet_s=0.05)
        out.append(time.perf_counter() - t0)
        # the other direction goes back to a cached pair: always move to a new factor
        if i % 2 == 1:
            thumb.focus()
            page.keyboard.press("ArrowLeft")
            browser.settle(page)
    return out


def threshold_recount(page, url: str, repeats: int) -> list[float] | None:
    try:
        import iarmem_core.extraction  # noqa: F401
    except ImportError:
        return None
    page.goto(url + "/extraction" + ("?" + QUERY["device"][1:] if QUERY["device"] else ""))
    page.get_by_role("heading", name=re.compile("^Extraction")).wait_for(timeout=120_000)
    browser.settle(page)
    run = page.get_by_role("button", name="Run the extraction attack")
    if run.count():
        run.click()
    page.get_by_text("Reconstruction (left) vs generation (right)").wait_for(timeout=1_200_000)
    browser.settle(page)
    metric = page.get_by_test_id("stMetricValue").first
    thumb = page.get_by_role("slider", name=re.compile("^Threshold"))
    out = []
    for i in range(repeats):
        before = metric.inner_text()
        thumb.focus()
        t0 = time.perf_counter()
        page.keyboard.press("Home" if i % 2 == 0 else "End")
        _wait_change(page, metric, before)
        browser.settle(page, quiet_s=0.05)
        out.append(time.perf_counter() - t0)
    return out


def _edit_flops(model: str, n: int, out_s: float, device: str) -> dict:
    """One slider step regenerates the edited model's n samples (the unedited ones are cached): the model
    FLOPs of that workload (generation with the model's sampling CFG, decode) against this machine's peak
    (timed here, in the bench process; the app server shares the machine). An upper bound on the fraction:
    the step's wall time also holds the page update."""
    from iarmem_core import flops, intervention
    from iarmem_core.adapters import resolve_device

    cfg = float(intervention.sampling_kwargs(flops.meta_adapter(model)).get("cfg", 0.0))
    work = flops.generate_flops(model, n, cfg=cfg) + flops.decode_flops(model, n)
    return {**flops.fraction(work, out_s, flops.measure_peak(resolve_device(device))), "cfg": cfg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto", help="the app's device (auto, cpu, cuda), set through the URL")
    args = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    if args.device != "auto":
        QUERY["device"] = f"&device={args.device}"
    store = Path(tempfile.mkdtemp(prefix="iarmem-bench-store-"))
    log = store.parent / f"{store.name}.log"
    proc = None
    with browser.chromium() as page:
        try:
            cold, proc, url = cold_start(page, store, log)
            edits = edit_to_samples(page, url, args.repeats)
            recount = threshold_recount(page, url, args.repeats)
            err = browser.exception_text(page)
        finally:
            if proc is not None:
                browser.stop_server(proc)
    out = {
        "cold_start_s": round(cold, 3),
        "edit_to_samples_s": round(statistics.median(edits), 3),
        "threshold_recount_s": None if recount is None else round(statistics.median(recount), 3),
        "edit_to_samples_all_s": [round(v, 3) for v in edits],
        "threshold_recount_all_s": None if recount is None else [round(v, 3) for v in recount],
        "targets_s": {"cold_start_s": 10, "edit_to_samples_s": 2, "threshold_recount_s": 0.5},
        "model": config.default_model(),
        "n_samples": 8,
        "cpus": os.cpu_count(),
        "load_avg_1m_start": round(load0, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "page_exception": err,
        "notes": "cold start includes server start, first page render and reading the shipped result; "
        "timings are wall clock in Chromium until the page is idle",
        "device": args.device,
        "flops_edit_step": _edit_flops(config.default_model(), 8, out_s=statistics.median(edits), device=args.device),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
