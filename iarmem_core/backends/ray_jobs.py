"""Whole jobs on a Ray cluster through the Ray Jobs API (the app and the CLI on a laptop or a login node).

`submit(address, argv, key=..., store=...)` starts `python -m iarmem_core run-job SPEC` on the cluster's head
(address: the dashboard, http://HEAD:8265); that driver runs the CLI command `argv` with `--backend ray`, so
its blocks run on the cluster's GPU actors and its result lands in the store named by `--store` in argv
(a shared filesystem that the submitter sees too). The submission is recorded beside the job's status
(`jobs/<key>.ray.json`), so any process that sees the store can follow it (`submission_of`) and stop it.

Progress: the store's status file (jobs.job_status) when the submitter sees the store; else the driver's
structured log lines (`IARMEM_STATUS {json}`, `last_status(logs)`). Cancel: `jobs.cancel_job(key)` (the
driver stops at its next check and kills its actors), then `stop(address, submission_id)` (SIGTERM to the
driver, which records the job as cancelled; Ray then ends its actors). Only HTTP is used here: no
`ray.init()` in the submitting process (a Streamlit script thread must never own a Ray connection).

Token authentication: with RAY_AUTH_MODE=token on the cluster, the submitting process needs the token in
$RAY_AUTH_TOKEN (or the file $RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token); Ray's client sends it.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from iarmem_core.backends.base import BackendError
from iarmem_core.store import ResultStore, atomic_write_json

STATUS_PREFIX = "IARMEM_STATUS "
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PYTHON = os.environ.get("IARMEM_RAY_PYTHON", "python")  # the cluster's python that has iarmem installed


def is_jobs_address(address: str | None) -> bool:
    """True for a Jobs API address (http:// or https://, the dashboard of the head)."""
    return bool(address) and str(address).strip().startswith(("http://", "https://"))


def _client(address: str):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise BackendError(
            "the ray backend needs Ray with its Jobs API: pip install -r requirements-ray.txt (ray[default])"
        ) from e
    if not is_jobs_address(address):
        raise BackendError(
            f"{address!r} is not a Jobs API address: give the head's dashboard address, e.g. http://HEAD:8265"
        )
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - one clear message for every connection problem
        raise BackendError(
            f"no Ray Jobs API at {address}: {type(e).__name__}: {str(e)[:300]}. Check the address (the head's "
            f"dashboard, port 8265 by default, reachable from here: e.g. an SSH tunnel from a laptop) and, with "
            f"token authentication, that RAY_AUTH_TOKEN holds the cluster's token"
        ) from e


def entrypoint(argv: Sequence[str], key: str | None = None, backend: dict | None = None) -> str:
    """The shell command the cluster runs: `python -m iarmem_core run-job '<spec json>'`."""
    spec = {"argv": [str(a) for a in argv], "key": key, "backend": backend or {}}
    return f"{PYTHON} -m iarmem_core run-job {shlex.quote(json.dumps(spec))}"


def record_path(store: ResultStore, key: str) -> Path:
    store._check_key(key)
    return store.jobs_dir / f"{key}.ray.json"


def submit(
    address: str,
    argv: Sequence[str],
    *,
    key: str | None = None,
    store: ResultStore | None = None,
    backend: dict | None = None,
    runtime_env: dict | None = None,
) -> str:
    """Submit the CLI command `argv` (e.g. ["unitmem", "--model", ..., "--store", "/shared/store"]) as a Ray
    job; returns its submission id. With `key` and `store` the submission is recorded in the store."""
    client = _client(address)
    sid = f"iarmem-{key or argv[0]}-{uuid.uuid4().hex[:8]}"
    try:
        client.submit_job(
            entrypoint=entrypoint(argv, key, backend),
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"iarmem_key": key or "", "iarmem_command": str(argv[0])},
        )
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"the Ray Jobs API at {address} refused the job: {type(e).__name__}: {e}") from e
    if key is not None and store is not None:
        atomic_write_json(
            record_path(store, key),
            {"address": address, "submission_id": sid, "submitted": time.time(), "argv": list(argv)},
        )
    return sid


def submission_of(store: ResultStore, key: str) -> dict | None:
    """The recorded Ray submission of job `key` ({address, submission_id, submitted, argv}), or None."""
    try:
        d = json.loads(record_path(store, key).read_text())
        return d if isinstance(d, dict) and d.get("submission_id") else None
    except (OSError, ValueError):
        return None


def state(address: str, submission_id: str) -> str:
    """The Ray job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address).get_job_status(submission_id)).split(".")[-1]


def logs(address: str, submission_id: str) -> str:
    return _client(address).get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL); False if it was already over."""
    try:
        return bool(_client(address).stop_job(submission_id))
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"could not stop Ray job {submission_id} at {address}: {e}") from e


def status_line(**fields) -> str:
    """One structured status line of the driver: `IARMEM_STATUS {json}`."""
    return STATUS_PREFIX + json.dumps(fields, default=str)


def last_status(text: str) -> dict | None:
    """The last `IARMEM_STATUS` object in a job's logs (progress when the store cannot be seen), or None."""
    for line in reversed(text.splitlines()):
        i = line.find(STATUS_PREFIX)
        if i >= 0:
            try:
                d = json.loads(line[i + len(STATUS_PREFIX) :])
                return d if isinstance(d, dict) else None
            except ValueError:
                continue
    return None


def last_json(text: str) -> dict | None:
    """The last line of a job's logs that is a JSON object (the command's --json output), or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                d = json.loads(line)
                return d if isinstance(d, dict) else None
            except ValueError:
                continue
    return None


def follow(
    address: str,
    submission_id: str,
    on_status: Callable[[dict], None] | None = None,
    poll_s: float = 1.0,
    timeout: float | None = None,
) -> tuple[str, str]:
    """Wait for the job to end, calling `on_status` with each new structured status; returns (state, logs).
    Ctrl-C stops the Ray job (and is re-raised)."""
    end = None if timeout is None else time.monotonic() + timeout
    last = None
    try:
        while True:
            st = state(address, submission_id)
            text = logs(address, submission_id)
            cur = last_status(text)
            if cur is not None and cur != last and on_status is not None:
                on_status(cur)
            last = cur
            if st in TERMINAL:
                return st, text
            if end is not None and time.monotonic() > end:
                return st, text
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stop(address, submission_id)
        raise
