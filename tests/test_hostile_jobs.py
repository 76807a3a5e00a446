"""Jobs killed at the worst moments, and interrupted ones: what their status says and what they leave.

Run as a script (`python tests/test_hostile_jobs.py STORE_ROOT MOMENT`), this file is the worker that dies at
MOMENT: right after its result is published (before the checkpoint is cleared and "done" is recorded), or
after the checkpoint is cleared (before "done").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from iarmem_core import jobs
from iarmem_core.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"n": 6}


def stepping(n: int, log: list | None = None, fail_at: int | None = None, exc: BaseException | None = None):
    """acc[i] = i**2; a checkpoint after every step; raises `exc` before step `fail_at`."""

    def fn(ctx):
        acc, start = (np.zeros(n), 0) if ctx.resume_state is None else (ctx.resume_state[0]["acc"].copy(), 0)
        if ctx.resume_state is not None:
            start = int(ctx.resume_state[1]["next"])
        for i in range(start, n):
            if fail_at is not None and i == fail_at:
                raise exc
            acc[i] = i * i
            if log is not None:
                log.append(i)
            ctx.checkpoint({"acc": acc}, {"next": i + 1})
        return {"acc": acc}, {"n": n}

    return fn


def _die_in_worker(tmp_path, moment: str) -> tuple[ResultStore, str]:
    st = ResultStore(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, str(tmp_path), moment], env=env, capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()  # it died where it was told to
    return st, st.key("toy", SPEC)


@pytest.mark.parametrize("moment", ["after_publish", "after_clear"])
def test_job_that_died_after_publishing_reads_as_done(tmp_path, moment):
    st, key = _die_in_worker(tmp_path, moment)
    raw = jobs._read_json(jobs._paths(st, key)[0])
    assert raw["state"] == "running" and st.exists(key)  # as the dead worker left it
    assert st.has_partial(key) == (moment == "after_publish")  # the checkpoint a crash before cleanup leaves
    status = jobs.job_status(key, st)
    assert status["state"] == "done" and status["progress"] == 1.0 and not status.get("error")
    assert "stopped before it could record" in status["message"]
    # the first read repaired the status file and removed the stale checkpoint
    assert jobs._read_json(jobs._paths(st, key)[0])["state"] == "done"
    assert not st.has_partial(key)
    # a rerun neither recomputes nor reads as failed
    calls = []
    arrays, _ = jobs.run_job("toy", SPEC, lambda ctx: calls.append(1), store=st)
    assert calls == [] and arrays["acc"].tolist() == [i * i for i in range(6)]
    h = jobs.start_job("toy", SPEC, lambda ctx: calls.append(1), store=st)
    assert h.state == "done" and calls == []


def test_stale_checkpoint_is_removed_by_a_rerun_but_a_newer_one_is_kept(tmp_path):
    st = ResultStore(tmp_path)
    key = st.key("toy", SPEC)
    jobs.run_job("toy", SPEC, stepping(6), store=st)
    st.save_partial(key, {"acc": np.zeros(6)}, {"next": 2})  # a forced recomputation, interrupted: newer
    assert not jobs.clear_stale_partial(st, key) and st.has_partial(key)
    jobs.run_job("toy", SPEC, stepping(6), store=st)
    assert st.has_partial(key)  # still there: it is the resume point of that recomputation
    time.sleep(0.01)
    st.save(key, {"acc": np.arange(6.0) ** 2}, {"n": 6}, kind="toy", spec=SPEC)  # a result newer than it
    jobs.run_job("toy", SPEC, stepping(6), store=st)  # a plain run: the stale checkpoint goes
    assert not st.has_partial(key)


def test_ctrl_c_says_whether_a_checkpoint_was_kept(tmp_path):
    st = ResultStore(tmp_path)
    with pytest.raises(KeyboardInterrupt) as e:
        jobs.run_job("toy", {"n": 1}, stepping(6, fail_at=0, exc=KeyboardInterrupt()), store=st)
    key = st.key("toy", {"n": 1})
    msg = str(e.value)
    assert "no checkpoint had been saved yet" in msg and "checkpoint kept" not in msg
    status = jobs.job_status(key, st)
    assert (
        status["state"] == "cancelled" and status["resumable"] is False and "checkpoint kept" not in status["message"]
    )
    with pytest.raises(KeyboardInterrupt) as e:
        jobs.run_job("toy", {"n": 2}, stepping(6, fail_at=3, exc=KeyboardInterrupt()), store=st)
    assert "checkpoint kept: starting it again resumes" in str(e.value)
    status = jobs.job_status(st.key("toy", {"n": 2}), st)
    assert status["resumable"] is True and "checkpoint kept" in status["message"]
    log = []
    arrays, _ = jobs.run_job("toy", {"n": 2}, stepping(6, log=log), store=st)  # resumes where it stopped
    assert log == [3, 4, 5] and arrays["acc"].tolist() == [i * i for i in range(6)]


def test_cancel_before_any_checkpoint_says_so(tmp_path):
    st = ResultStore(tmp_path)
    with pytest.raises(jobs.Cancelled, match="no checkpoint had been saved yet"):
        jobs.run_job("toy", {"n": 3}, stepping(6, fail_at=0, exc=jobs.Cancelled("stop")), store=st)


def test_cli_ctrl_c_is_one_line_with_the_checkpoint_state(tmp_path, monkeypatch, capsys):
    from iarmem_core import cli
    from iarmem_core.cli import unitmem as cmd

    def run(args):
        jobs.run_job("toy", {"n": 4}, stepping(6, fail_at=0, exc=KeyboardInterrupt()), store=ResultStore(tmp_path))

    monkeypatch.setattr(cmd, "run", run)
    assert cli.main(["unitmem", "--json"]) == 130
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert obj["type"] == "KeyboardInterrupt" and "no checkpoint had been saved yet" in obj["error"]
    assert err.count("\n") == 1 and err.startswith("error: job toy-") and "Traceback" not in err


def test_cli_job_cancelled_from_elsewhere_is_one_line(tmp_path, monkeypatch, capsys):
    from iarmem_core import cli
    from iarmem_core.cli import unitmem as cmd

    def run(args):
        jobs.run_job("toy", {"n": 5}, stepping(6, fail_at=2, exc=jobs.Cancelled("stop")), store=ResultStore(tmp_path))

    monkeypatch.setattr(cmd, "run", run)
    assert cli.main(["unitmem", "--json"]) == 130
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert obj["type"] == "Cancelled" and "checkpoint kept: starting it again resumes" in obj["error"]
    assert err.count("\n") == 1 and "Traceback" not in err


if __name__ == "__main__":  # the worker of test_job_that_died_after_publishing_reads_as_done
    root, moment = sys.argv[1], sys.argv[2]
    store = ResultStore(root)
    if moment == "after_publish":
        store.clear_partial = lambda key: os._exit(9)  # dies between publish and cleanup
    else:
        real = store.clear_partial

        def clear_then_die(key):
            real(key)
            os._exit(9)  # dies before "done" is recorded

        store.clear_partial = clear_then_die
    jobs.run_job("toy", SPEC, stepping(6), store=store)
