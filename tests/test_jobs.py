"""Jobs: progress, cancel + resume, one run per key (threads and processes), failures, SIGKILL + resume.

Run as a script (`python tests/test_jobs.py STORE_ROOT`), this file is the worker process of the SIGKILL test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iarmem_core import jobs
from iarmem_core.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent

N_STEPS = 10


def stepping_job(n_steps: int = N_STEPS, sleep_s: float = 0.0, log: list | None = None, gate=None):
    """A job whose result depends only on n_steps: acc[i] = i * sin(i); checkpoints after every step."""

    def fn(ctx: jobs.JobContext):
        if ctx.resume_state is None:
            acc, start = np.zeros(n_steps), 0
        else:
            acc, start = ctx.resume_state[0]["acc"].copy(), int(ctx.resume_state[1]["next"])
        for i in range(start, n_steps):
            ctx.check()
            if gate is not None:
                gate(i)
            acc[i] = i * np.sin(i)
            if log is not None:
                log.append(i)
            ctx.checkpoint({"acc": acc}, {"next": i + 1})
            ctx.progress((i + 1) / n_steps, f"step {i + 1}/{n_steps}")
            time.sleep(sleep_s)
        return {"acc": acc}, {"n_steps": n_steps, "resumed_from": start}

    return fn


EXPECTED = np.array([i * np.sin(i) for i in range(N_STEPS)])


def _wait_for(cond, what: str, limit_s: float = 20.0):
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_run_job_reports_progress_and_reuses_the_result(tmp_path):
    st = ResultStore(tmp_path)
    seen, log = [], []
    arrays, meta = jobs.run_job(
        "toy", {"n": N_STEPS}, stepping_job(log=log), store=st, on_progress=lambda f, m: seen.append((f, m))
    )
    assert np.allclose(arrays["acc"], EXPECTED) and meta == {"n_steps": N_STEPS, "resumed_from": 0}
    assert [f for f, _ in seen] == [(i + 1) / N_STEPS for i in range(N_STEPS)] and seen[-1][1] == "step 10/10"
    key = st.key("toy", {"n": N_STEPS})
    status = jobs.job_status(key, st)
    assert status["state"] == "done" and status["progress"] == 1.0 and status["finished"] >= status["started"]
    assert not st.has_partial(key) and st.list()[0]["spec"] == {"n": N_STEPS}
    again, _ = jobs.run_job("toy", {"n": N_STEPS}, stepping_job(log=log), store=st)
    assert log == list(range(N_STEPS)) and np.array_equal(again["acc"], arrays["acc"])  # not recomputed
    h = jobs.start_job("toy", {"n": N_STEPS}, stepping_job(log=log), store=st)
    assert h.done and not h.local and np.array_equal(h.result()[0]["acc"], arrays["acc"])


def test_cancel_then_resume_equals_uninterrupted_run(tmp_path):
    st = ResultStore(tmp_path / "a")
    key = st.key("toy", {"n": N_STEPS})
    log = []

    def cancel_at_40(f, _msg):
        if f >= 0.4:
            jobs.cancel_job(key, st)

    h = jobs.start_job("toy", {"n": N_STEPS}, stepping_job(log=log), store=st, on_progress=cancel_at_40)
    assert h.wait(20)
    assert h.state == "cancelled" and log == [0, 1, 2, 3] and not st.exists(key)
    assert st.load_partial(key)[1] == {"next": 4}
    h2 = jobs.start_job("toy", {"n": N_STEPS}, stepping_job(log=log), store=st)
    assert h2 is not h and h2.wait(20) and h2.state == "done"
    assert log == list(range(N_STEPS))  # steps 4..9 ran once more, 0..3 were not repeated
    resumed, meta = h2.result()
    assert meta["resumed_from"] == 4 and h2.status()["resumed"] is True
    plain, _ = jobs.run_job("toy", {"n": N_STEPS}, stepping_job(), store=ResultStore(tmp_path / "b"))
    assert np.array_equal(resumed["acc"], plain["acc"]) and np.allclose(plain["acc"], EXPECTED)


def test_duplicate_start_returns_the_running_handle(tmp_path):
    st = ResultStore(tmp_path)
    release = threading.Event()
    calls = []

    def fn(ctx):
        calls.append(1)
        ctx.progress(0.5, "waiting")
        release.wait(20)
        return {"x": np.arange(3)}, {}

    handles = []
    starter = threading.Thread(target=lambda: handles.append(jobs.start_job("toy", {"dup": 1}, fn, store=st)))
    starter.start()
    starter.join()  # the starter (a browser session) is gone; the job keeps running
    h = handles[0]
    _wait_for(lambda: h.state == "running", "the job to start")
    assert jobs.start_job("toy", {"dup": 1}, fn, store=st) is h
    assert jobs.start_job("toy", {"dup": 1}, fn, store=st, force=True) is h
    with_other_spec = jobs.start_job("toy", {"dup": 2}, lambda ctx: ({}, {}), store=st)
    assert with_other_spec is not h and with_other_spec.wait(20)
    with pytest.raises(jobs.JobBusyError, match="already running"):
        jobs.run_job("toy", {"dup": 1}, fn, store=st, wait=False)
    waited = []  # a CLI run of the same job waits for the running one instead of computing it again
    cli = threading.Thread(target=lambda: waited.append(jobs.run_job("toy", {"dup": 1}, fn, store=st)))
    cli.start()
    release.set()
    cli.join(30)
    assert h.wait(20) and h.state == "done" and calls == [1]
    assert np.array_equal(h.result()[0]["x"], np.arange(3)) and np.array_equal(waited[0][0]["x"], np.arange(3))


def test_failure_is_recorded_and_a_rerun_works(tmp_path):
    st = ResultStore(tmp_path)

    def boom(ctx):
        ctx.progress(0.3, "about to fail")
        raise ValueError("boom: the model has 16 blocks, the spec says 30")

    h = jobs.start_job("toy", {"f": 1}, boom, store=st)
    assert h.wait(20)
    status = jobs.job_status(h.key, st)
    assert status["state"] == "failed" and status["error"].startswith("ValueError: boom")
    assert "raise ValueError" in status["traceback"] and status["progress"] == 0.3
    assert not st.exists(h.key)
    with pytest.raises(RuntimeError, match="failed: ValueError: boom"):
        h.result()
    with pytest.raises(ValueError, match="boom"):
        jobs.run_job("toy", {"f": 1}, boom, store=st)
    arrays, _ = jobs.run_job("toy", {"f": 1}, lambda ctx: ({"ok": np.ones(1)}, {}), store=st)
    assert arrays["ok"][0] == 1 and jobs.job_status(h.key, st)["state"] == "done"
    with pytest.raises(TypeError, match="must return"):
        jobs.run_job("toy", {"f": 2}, lambda ctx: np.ones(2), store=st)


def test_status_is_visible_from_another_thread(tmp_path):
    st = ResultStore(tmp_path)
    at_half, release = threading.Event(), threading.Event()

    def fn(ctx):
        ctx.progress(0.1, "first")
        ctx.progress(0.5, "half way")  # throttled write: must still reach the disk while the job waits
        at_half.set()
        release.wait(20)
        return {"x": np.zeros(1)}, {}

    h = jobs.start_job("toy", {"s": 1}, fn, store=st)
    key = h.key
    seen = {}

    def poll():
        _wait_for(at_half.is_set, "the job to reach half way")
        _wait_for(lambda: jobs.job_status(key, st).get("progress") == 0.5, "the status file to show 0.5")
        seen.update(jobs.job_status(key, st))

    t = threading.Thread(target=poll)
    t.start()
    t.join(30)
    assert seen["state"] == "running" and seen["message"] == "half way" and seen["pid"] == os.getpid()
    assert jobs.lock_held(st, key)
    release.set()
    assert h.wait(20) and jobs.job_status(key, st)["state"] == "done" and not jobs.lock_held(st, key)


def test_sigkilled_process_is_taken_over_and_resumes(tmp_path):
    st = ResultStore(tmp_path)
    key = st.key("toy", {"n": 40})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env)
    try:
        _wait_for(lambda: (st.load_partial(key) or ({}, {"next": 0}))[1]["next"] >= 5, "the worker's checkpoints")
        # while it runs, a start from this process follows it instead of starting a duplicate
        calls = []
        other = jobs.start_job("toy", {"n": 40}, lambda ctx: calls.append(1), store=st)
        assert not other.local and other.state == "running" and other.status()["pid"] == proc.pid and not calls
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = st.load_partial(key)[1]["next"]
    status = jobs.job_status(key, st)
    assert status["state"] == "failed" and status["interrupted"] and status["resumable"]
    assert f"pid {proc.pid}" in status["error"] and not jobs.lock_held(st, key)
    log = []
    arrays, meta = jobs.run_job("toy", {"n": 40}, stepping_job(40, log=log), store=st)
    assert meta["resumed_from"] == done_before and log == list(range(done_before, 40))
    assert np.allclose(arrays["acc"], [i * np.sin(i) for i in range(40)])
    assert jobs.job_status(key, st)["state"] == "done"


if __name__ == "__main__":  # worker of test_sigkilled_process_is_taken_over_and_resumes
    jobs.run_job("toy", {"n": 40}, stepping_job(40, sleep_s=0.05), store=ResultStore(sys.argv[1]))
