"""Results for the app: the user's store first, then the shipped read-only store; jobs started and polled.

A stored result never changes under its key, so loaded results are cached per key for every session.
Heavy work is a job of iarmem_core.jobs: starting one twice (a rerun, a second tab) returns the running
job, and the page polls its status file in a fragment until it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import streamlit as st

from iarmem_app import config
from iarmem_core import jobs, unitmem
from iarmem_core import store as store_mod
from iarmem_core.store import ResultStore

ACTIVE = ("queued", "running")


def user_store() -> ResultStore:
    """The writable store ($IARMEM_STORE, else <repo>/store), shared with the CLI."""
    return store_mod.get_store()


@st.cache_resource
def shipped_store() -> ResultStore:
    return ResultStore(config.SHIPPED_STORE, read_only=True)


def locate(key: str) -> ResultStore | None:
    """The store holding a complete result under `key` (the user's first), or None."""
    for s in (user_store(), shipped_store()):
        if s.exists(key):
            return s
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
    """(arrays, meta) of the result under `key` from the user's store or the shipped one; None if neither has it."""
    s = locate(key)
    return None if s is None else _load(str(s.root), key, version(s, key))


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


# ---- jobs ----------------------------------------------------------------------------------------------
def status(key: str) -> dict:
    return jobs.job_status(key, user_store())


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
) -> None:
    """Start button, or a polled progress bar with a cancel button while the job `key` runs.

    `start()` starts the job (jobs.start_job returns the running one if it already runs anywhere).
    `done`: a result is available, so the button offers a recomputation only when `allow_rerun`.
    `live()` draws partial results under the progress bar at every poll.
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
        st.error(f"The {what} job stopped: {err}.{then}")
    elif st_.get("state") == "cancelled":
        st.warning(
            f"The {what} job was cancelled at {100 * float(st_.get('progress') or 0):.0f}%. "
            "Starting it again resumes from its last checkpoint."
        )
    if done and not allow_rerun:
        return
    if st.button(start_label, key=f"{widget_key}_start", type="primary"):
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
        if s.get("state") == "done":
            st.rerun(scope="app")
        elif not active:
            st.rerun(scope="app")  # failed or cancelled: the panel says so
        if st.button("Cancel", key=f"{widget_key}_cancel"):
            jobs.cancel_job(key, user_store())
            st.toast(f"Cancelling the {what} job; it stops at its next checkpoint.")
        if live is not None:
            live()

    poll()


def start_unitmem(adapter, image_set, cfg) -> None:
    unitmem.start_unitmem(adapter, image_set, cfg, store=user_store())
