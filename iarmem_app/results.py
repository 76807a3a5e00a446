"""Results for the app: the user's store first, then the shipped read-only store; jobs started and polled.

A stored result never changes under its key, so loaded results are cached per key for every session.
Every load verifies the files' sha256; a damaged copy in the user's store is never served: the intact copy
shipped with iarmem is served instead, with a warning that says so (`load_with`).
Heavy work is a job of iarmem_core.jobs: starting one twice (a rerun, a second tab) returns the running
job, and the page polls its status file in a fragment until it is done. With the sidebar's "Run jobs on: Ray
cluster", a job that has a CLI command is submitted through the Ray Jobs API instead (HTTP only: this process
never connects to Ray itself); its driver on the cluster writes the same status file into the shared store,
and until it does (or where the store is not shared) the job's state and progress come from Ray.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import streamlit as st

from iarmem_app import config, state
from iarmem_app.ui import md_escape
from iarmem_core import jobs, unitmem
from iarmem_core import store as store_mod
from iarmem_core.store import ResultStore

ACTIVE = ("queued", "running")
log = logging.getLogger("iarmem.app")
_DAMAGED: dict[tuple[str, str], tuple[str, str]] = {}  # (store root, key) -> (live version, problem)
_DAMAGED_MU = threading.Lock()


def user_store() -> ResultStore:
    """The writable store ($IARMEM_STORE, else <repo>/store), shared with the CLI."""
    return store_mod.get_store()


@st.cache_resource
def shipped_store() -> ResultStore:
    return ResultStore(config.SHIPPED_STORE, read_only=True)


def _damaged(s: ResultStore, key: str) -> str | None:
    """The problem of the live copy of `key` in `s` if it was found damaged (and not replaced since)."""
    with _DAMAGED_MU:
        got = _DAMAGED.get((str(s.root), key))
    return got[1] if got is not None and got[0] == version(s, key) else None


def locate(key: str) -> ResultStore | None:
    """The store holding a complete, not known to be damaged, result under `key` (the user's first), or None."""
    for s in (user_store(), shipped_store()):
        if s.exists(key) and _damaged(s, key) is None:
            return s
    return None


def load_with(key: str, loader: Callable[[str, str, str], object]):
    """`loader(store root, key, version)` on the first store whose copy of `key` is intact (the user's first).

    A copy that fails to load as damaged (CorruptEntryError: a sha256 mismatch, a missing file, a key that
    does not match) is remembered and skipped, with a warning on the page, and the next store's copy is
    served; None when no store has an intact copy (the last damage is then raised)."""
    last: store_mod.CorruptEntryError | None = None
    for s in (user_store(), shipped_store()):
        if not s.exists(key):
            continue
        v = version(s, key)
        problem = _damaged(s, key)
        if problem is None:
            try:
                return loader(str(s.root), key, v)
            except store_mod.CorruptEntryError as e:
                log.warning("damaged result %s in %s: %s", key, s.root, e)
                with _DAMAGED_MU:
                    _DAMAGED[(str(s.root), key)] = (v, str(e))
                problem = str(e)
        last = store_mod.CorruptEntryError(problem)
        if not s.read_only and shipped_store().exists(key):
            st.warning(
                md_escape(
                    f"Your copy of result {key} in {s.root} is damaged, so it is not used: {problem} "
                    "Showing the intact copy shipped with iarmem instead."
                ),
                icon=":material/warning:",
            )
    if last is not None:
        raise last
    return None


@st.cache_resource(max_entries=16, show_spinner=False)
def _load(root: str, key: str, version: str) -> tuple[dict[str, np.ndarray], dict]:
    s = user_store() if Path(root) == user_store().root else shipped_store()
    arrays, meta = s.load(key)
    for a in arrays.values():
        a.setflags(write=False)  # shared by every session
    return arrays, meta


def version(s: ResultStore, key: str) -> str:
    """The live version of a result (a recomputation under the same key makes a new one)."""
    try:
        return (s.result_dir(key) / "CURRENT").read_text().strip()
    except OSError:
        return ""


def load(key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of the result under `key` from the user's store or the shipped one; None if neither has
    it. A damaged copy in the user's store gives way to the shipped one (see `load_with`)."""
    return load_with(key, _load)


def source_label(key: str) -> str:
    s = locate(key)
    if s is None:
        return "not computed yet"
    return "shipped with iarmem (assets/store)" if s.read_only else f"your store ({s.root})"


# ---- UnitMem -------------------------------------------------------------------------------------------
def unitmem_result(adapter, image_set, cfg) -> tuple[str, unitmem.UnitMemResult | None]:
    """(store key, the result from the user's or the shipped store, or None)."""
    key = unitmem.result_key(adapter, image_set, cfg, user_store())
    got = load(key)
    if got is None:
        return key, None
    meta = dict(got[1])
    meta["store_key"] = key
    return key, unitmem.UnitMemResult(got[0], meta)


# ---- where jobs run ------------------------------------------------------------------------------------
def backend_choice() -> tuple[str, str]:
    """(backend, Jobs API address) of the sidebar ("local" or "ray")."""
    return state.get("backend"), str(state.get("ray_address") or "").strip()


def where_text() -> str:
    """Where a job started now would run, in words (the sidebar shows it)."""
    from iarmem_core.backends import ray_jobs

    backend, address = backend_choice()
    if backend != "ray":
        return f"Jobs run in this app's process (pid {os.getpid()} on {store_mod.HOST})."
    if not ray_jobs.is_jobs_address(address):
        return "Give the Ray head's Jobs API address, e.g. http://HEAD:8265 (until then jobs run here)."
    return (
        f"Jobs go to the Ray cluster at {address}; results land in {cluster_store()}, which the cluster must "
        f"share (README: Running on a cluster). Jobs without a CLI command still run here."
    )


def cluster_store() -> str:
    """The store path the cluster's driver writes to: $IARMEM_CLUSTER_STORE, else the user's store."""
    return os.environ.get("IARMEM_CLUSTER_STORE") or str(user_store().root.resolve())


def submit_to_ray(key: str, command: str) -> None:
    """Submit the CLI `command` (python -m iarmem_core unitmem ...) of job `key` to the sidebar's Ray cluster."""
    from iarmem_core.backends import ray_jobs

    _, address = backend_choice()
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "iarmem_core"]:
        argv = argv[3:]
    argv = [a for a in argv if a != "--json"] + ["--json", "--store", cluster_store()]
    ray_jobs.submit(address, argv, key=key, store=user_store())
    _RAY_STATE.pop(key, None)


_RAY_STATE: dict[str, tuple[float, dict]] = {}  # key -> (time, status from Ray), refreshed every 2 s


def _ray_status(key: str, store_status: dict) -> dict | None:
    """The status of a submission of `key` that the store does not show yet (pending on Ray, or a store the
    cluster does not share): from Ray's job state and the driver's structured log lines."""
    from iarmem_core.backends import ray_jobs

    rec = ray_jobs.submission_of(user_store(), key)
    if rec is None:
        return None
    t_store = max(float(store_status.get("started") or 0), float(store_status.get("finished") or 0))
    if store_status.get("state") in ACTIVE or t_store >= float(rec.get("submitted") or 0):
        return None  # the store already shows this submission's run
    now = time.monotonic()
    hit = _RAY_STATE.get(key)
    if hit is not None and now - hit[0] < 2.0:
        return hit[1]
    where = f"Ray cluster at {rec['address']} (job {rec['submission_id']})"
    try:
        ray_state = ray_jobs.state(rec["address"], rec["submission_id"])
        line = ray_jobs.last_status(ray_jobs.logs(rec["address"], rec["submission_id"])) or {}
    except Exception as e:  # noqa: BLE001 - the cluster may be gone; say so
        out = {"key": key, "state": "failed", "error": f"the Ray cluster does not answer: {e}", "where": where}
        _RAY_STATE[key] = (now, out)
        return out
    if ray_state in ("PENDING", "RUNNING"):
        out = {
            "key": key,
            "state": "queued" if ray_state == "PENDING" else "running",
            "progress": float(line.get("progress") or 0.0),
            "message": f"{line.get('message') or ray_state.lower()} (on Ray)",
            "where": where,
        }
    elif ray_state == "SUCCEEDED" and user_store().exists(key):
        ray_jobs.record_path(user_store(), key).unlink(missing_ok=True)  # over, and the store shows it
        out = None
    elif ray_state == "SUCCEEDED":  # the store the cluster wrote is not this one
        out = {"key": key, "state": "done", "progress": 1.0, "where": where, "message": "done on the cluster"}
    else:
        err = line.get("error") or f"the Ray job ended {ray_state}; see `ray job logs {rec['submission_id']}`"
        out = {"key": key, "state": "cancelled" if ray_state == "STOPPED" else "failed", "error": err, "where": where}
    _RAY_STATE[key] = (now, out)
    return out


# ---- jobs ----------------------------------------------------------------------------------------------
def status(key: str) -> dict:
    st_ = jobs.job_status(key, user_store())
    return _ray_status(key, st_) or st_


def cancel(key: str) -> None:
    """Cancel job `key` wherever it runs: the cancel file (the driver stops at its next check), then, for a
    job submitted to Ray, stop_job (its driver records the cancel; Ray ends its actors)."""
    from iarmem_core.backends import ray_jobs

    jobs.cancel_job(key, user_store())
    rec = ray_jobs.submission_of(user_store(), key)
    if rec is not None:
        try:
            ray_jobs.stop(rec["address"], rec["submission_id"])
        except Exception:  # noqa: BLE001 - the cancel file still stops a driver that sees the store
            pass
        _RAY_STATE.pop(key, None)


def is_active(key: str) -> bool:
    return status(key).get("state") in ACTIVE


def job_panel(
    key: str,
    what: str,
    start: Callable[[], object],
    start_label: str,
    *,
    done: bool,
    widget_key: str,
    allow_rerun: bool = False,
    live: Callable[[], None] | None = None,
    command: str | None = None,
) -> None:
    """Start button, or a polled progress bar with a cancel button while the job `key` runs.

    `start()` starts the job (jobs.start_job returns the running one if it already runs anywhere).
    `done`: a result is available, so the button offers a recomputation only when `allow_rerun`.
    `live()` draws partial results under the progress bar at every poll.
    `command`: the job's CLI command; with the sidebar's Ray backend the job is submitted to the cluster.
    """
    st_ = status(key)
    if st_.get("state") in ACTIVE:
        _poll(key, what, widget_key, live)
        return
    if st_.get("state") == "failed":
        err = str(st_.get("error") or "").rstrip(".")
        then = (
            ""
            if st_.get("interrupted")
            else (f" Start it again to {'resume from its checkpoint' if st_.get('resumable') else 'run it'}.")
        )
        st.error(md_escape(f"The {what} job stopped: {err}.{then}"))
    elif st_.get("state") == "cancelled":
        st.warning(
            f"The {what} job was cancelled at {100 * float(st_.get('progress') or 0):.0f}%. "
            + (
                "Starting it again resumes from its last checkpoint."
                if st_.get("resumable", True)
                else "No checkpoint had been saved yet, so starting it again begins from the start."
            )
        )
    if done and not allow_rerun:
        return
    from iarmem_core.backends import ray_jobs

    backend, address = backend_choice()
    remote = backend == "ray" and command is not None and ray_jobs.is_jobs_address(address)
    where = f"Submits the job to the Ray cluster at {address}." if remote else "Runs the job in this app's process."
    if st.button(start_label, key=f"{widget_key}_start", type="primary", help=where):
        if remote:
            try:
                submit_to_ray(key, command)
            except Exception as e:  # noqa: BLE001 - a BackendError names the address and the fix
                st.error(f"Could not submit the {what} job to Ray: {e}")
                return
        else:
            start()
        _poll(key, what, widget_key, live)


def shown_progress(key: str, frac: float, active: bool) -> float:
    """The fraction the bar shows: never below what this session showed before for the same running job (a
    job's sub-steps may restart their own count), reset once the job is over."""
    seen = st.session_state.setdefault("_job_progress", {})
    if not active:
        seen.pop(key, None)
        return frac
    seen[key] = max(float(frac), float(seen.get(key, 0.0)))
    return seen[key]


def _poll(key: str, what: str, widget_key: str, live: Callable[[], None] | None = None) -> None:
    @st.fragment(run_every=1.0)
    def poll() -> None:
        s = status(key)
        active = s.get("state") in ACTIVE
        frac = shown_progress(key, min(max(float(s.get("progress") or 0.0), 0.0), 1.0), active)
        st.progress(frac, text=f"{what}: {100 * frac:.0f}% {s.get('message') or ''}")
        if s.get("where"):
            st.caption(f"Runs on {s['where']}")
        if s.get("state") == "done":
            st.rerun(scope="app")
        elif not active:
            st.rerun(scope="app")  # failed or cancelled: the panel says so
        if st.button("Cancel", key=f"{widget_key}_cancel"):
            cancel(key)
            st.toast(f"Cancelling the {what} job; it stops at its next checkpoint.")
        if live is not None:
            live()

    poll()


def start_unitmem(adapter, image_set, cfg) -> None:
    unitmem.start_unitmem(adapter, image_set, cfg, store=user_store())
