"""Long jobs with progress, cancel and resume, shared by the CLI (`run_job`) and the app (`start_job`).

A job is (kind, spec, fn). Its key is `store.key(kind, spec)`. `fn(ctx)` does the work and returns
`(arrays, meta)`, which the runner saves as the job's result in the store. Inside, fn

- reports `ctx.progress(fraction, message)`,
- calls `ctx.check()` at safe points (raises `Cancelled` once a cancel was requested),
- starts from `ctx.resume_state` (`(arrays, meta)` of the last checkpoint, or None) and
- saves `ctx.checkpoint(arrays, meta)` now and then (stored atomically as the key's partial state).

One job per key runs at a time, across threads and processes: the runner holds an flock on
`jobs/<key>.lock` (which also records pid, host and a heartbeat). The kernel drops the flock when the process
dies, so a job killed with SIGKILL leaves a lock that the next start simply takes over, resuming from the
checkpoint. Status (state, progress, message, error, times, heartbeat) is `jobs/<key>.json`, written
atomically, readable from any thread or process with `job_status(key)`. A cancel request from another
process is the file `jobs/<key>.cancel`.

States: queued, running, done, failed, cancelled. A status file left at queued/running by a dead process
reads as failed with `interrupted: True` (and `resumable: True` when a checkpoint exists), unless the
result was published before the process died: then it reads as done, and the first read records that and
removes the checkpoint the dead run left behind. A store that cannot be written refuses to start a job
(ReadOnlyStoreError) before anything runs.

Inside a job, `run_batches(ctx, n, batch_size, work, ...)` is the one loop over items that every job uses:
cancel checks between batches, out-of-memory halving (the same items are retried with half the batch),
progress, and checkpoints throttled to at most one every `CHECKPOINT_EVERY_S` seconds and never more than
a tenth of the time; a resumed job starts at the offset its checkpoint recorded.

Example:
    >>> def fn(ctx):
    ...     total = 0 if ctx.resume_state is None else int(ctx.resume_state[1]["total"])
    ...     for i in range(3):
    ...         ctx.check(); total += i; ctx.progress((i + 1) / 3, f"step {i}")
    ...     return {"total": np.array([total])}, {"total": total}
    >>> st = ResultStore("/tmp/iarmem-doc-store")
    >>> arrays, meta = run_job("doc-example", {"n": 3}, fn, store=st, force=True)
    >>> meta["total"]
    3
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from iarmem_core.store import HOST, ResultStore, StoreError, atomic_write_json, get_store

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
HEARTBEAT_S = 2.0  # how often a running job refreshes its heartbeat
STATUS_EVERY_S = 0.2  # progress is written to disk at most this often (the in-process handle is always current)
CANCEL_POLL_S = 0.25  # how often ctx.cancelled looks for a cancel request file from another process
# run_batches saves partial state at most this often (and <= 10% of the time); $IARMEM_CHECKPOINT_EVERY_S overrides
CHECKPOINT_EVERY_S = float(os.environ.get("IARMEM_CHECKPOINT_EVERY_S") or 5.0)


class Cancelled(Exception):
    """Raised by ctx.check() when the job was asked to stop; the runner keeps the partial state."""


class JobBusyError(RuntimeError):
    """The job runs in another process and the caller asked not to wait."""


JobFn = Callable[["JobContext"], tuple[Mapping[str, np.ndarray], Mapping]]


# ----------------------------------------------------------------------------------------------------------
# on-disk lock and status


def _paths(store: ResultStore, key: str) -> tuple[Path, Path, Path]:
    store._check_key(key)
    d = store.jobs_dir
    return d / f"{key}.json", d / f"{key}.lock", d / f"{key}.cancel"


class _Lock:
    """flock on jobs/<key>.lock, held for the whole run; its content says who holds it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.info: dict = {}

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self.info = {"pid": os.getpid(), "host": HOST, "acquired": time.time()}
        self.beat()
        return True

    def beat(self) -> None:
        """Rewrite pid, host and heartbeat in place through the held descriptor. (The file is never deleted:
        deleting a lock file that others may have open would let two runners lock two different inodes.)
        Best effort: the flock, not the content, is the lock, so a full disk does not stop the job here."""
        if self.fd is not None:
            data = json.dumps({**self.info, "heartbeat": time.time()}).encode()
            try:
                os.lseek(self.fd, 0, os.SEEK_SET)
                os.ftruncate(self.fd, 0)
                os.write(self.fd, data)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


def lock_held(store: ResultStore, key: str) -> bool:
    """True while some thread or process runs the job `key` (its flock is held)."""
    _, lock_path, _ = _paths(store, key)
    if not lock_path.exists():
        return False
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _created(store: ResultStore, what: str, key: str) -> float | None:
    """`created` of the live result (what="result") or checkpoint (what="partial") under key; None if absent
    or unreadable."""
    try:
        if what == "result":
            if not store.exists(key):
                return None
            info = store.info(key)
        else:
            if not store.has_partial(key):
                return None
            info = store._read_info(store.partial_dir(key), key, "partial state")
        return float(info.get("created") or 0.0)
    except (StoreError, OSError, ValueError, TypeError):
        return None


def clear_stale_partial(store: ResultStore, key: str) -> bool:
    """Remove a checkpoint that is older than the stored result of `key` (left by a run that died between
    publishing its result and cleaning up), if no job runs now; True if one was removed. A checkpoint newer
    than the result (a forced recomputation that was interrupted) is kept."""
    if store.read_only:
        return False
    made, part = _created(store, "result", key), _created(store, "partial", key)
    if made is None or part is None or part > made:
        return False
    lock = _Lock(_paths(store, key)[1])
    try:
        if not lock.try_acquire():
            return False
    except OSError:
        return False
    try:
        store.clear_partial(key)
        return True
    except (StoreError, OSError):
        return False
    finally:
        lock.release()


def _record_done(store: ResultStore, key: str, st: dict) -> dict:
    """The status of a job whose result was published but whose 'done' was never recorded; written back
    (best effort, only while no job runs) together with the removal of the checkpoint it left."""
    done = {
        **st,
        "state": "done",
        "progress": 1.0,
        "error": None,
        "message": "done (the result was stored; the run stopped before it could record this)",
        "finished": st.get("finished") or _created(store, "result", key),
    }
    done.pop("interrupted", None)
    done.pop("resumable", None)
    if store.read_only:
        return done
    status_path, lock_path, _ = _paths(store, key)
    lock = _Lock(lock_path)
    try:
        if lock.try_acquire():
            try:
                if store.has_partial(key) and (_created(store, "partial", key) or 0) <= (done["finished"] or 0):
                    store.clear_partial(key)
                atomic_write_json(status_path, done)
            finally:
                lock.release()
    except (StoreError, OSError):
        pass
    return done


def job_status(key: str, store: ResultStore | None = None) -> dict:
    """Status of job `key` from any thread or process: state, progress, message, error, started, finished,
    heartbeat, pid, host. state "none" if it never ran; "done" if only its result exists, or if its result
    was stored by a run that stopped before recording "done" (the status is then repaired)."""
    store = store or get_store()
    status_path, _, _ = _paths(store, key)
    st = _read_json(status_path)
    if st is None:
        if store.exists(key):
            return {"key": key, "state": "done", "progress": 1.0, "message": "result in store"}
        return {"key": key, "state": "none", "progress": 0.0, "message": ""}
    if st.get("state") == "done" or lock_held(store, key):
        return st
    # the runner may have just finished: re-read before judging it
    st = _read_json(status_path) or st
    if st.get("state") == "done" or lock_held(store, key):
        return st
    active = st.get("state") in ("queued", "running")
    made = _created(store, "result", key)
    if made is not None and (active or made >= float(st.get("started") or 0.0)):
        return _record_done(store, key, st)  # published, then died (or failed while cleaning up)
    if active:
        resumable = store.has_partial(key)
        then = "resume from its last checkpoint." if resumable else "run it (no checkpoint was saved)."
        pct = 100 * float(st.get("progress") or 0)
        error = (
            f"interrupted: the process running this job (pid {st.get('pid')} on {st.get('host')}) "
            f"stopped at {pct:.0f}% without finishing. Start the job again to {then}"
        )
        st = {**st, "state": "failed", "interrupted": True, "resumable": resumable, "error": error}
    return st


# ----------------------------------------------------------------------------------------------------------
# context and handle


class JobContext:
    """What a job function sees: progress, cancellation, resume state and checkpoints."""

    def __init__(self, handle: JobHandle, resume_state: tuple[dict, dict] | None):
        self._h = handle
        self.key = handle.key
        self.kind = handle.kind
        self.spec = handle.spec
        self.store = handle.store
        self.resume_state = resume_state
        self.backend = handle.backend  # where split work runs (iarmem_core.backends; None: this process)
        self._last_poll = 0.0

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1] with a short message."""
        self._h._progress(min(max(float(fraction), 0.0), 1.0), str(message))

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested (from this process or, via the cancel file, another)."""
        if self._h._cancel.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            if self._h._cancel_path.exists():
                self._h._cancel.set()
        return self._h._cancel.is_set()

    def check(self) -> None:
        """Raise Cancelled if a cancel was requested; call it at points where stopping is safe."""
        if self.cancelled:
            raise Cancelled(f"job {self.key} cancelled")

    def checkpoint(self, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
        """Save the state to resume from (atomically replaces the previous checkpoint)."""
        self.store.save_partial(self.key, arrays, meta or {})
        self._h._set(checkpointed=time.time())


class JobHandle:
    """A job started with start_job: poll `status()`, `cancel()`, `wait()`, `result()`.

    `local` is True when this process runs the job; a handle to a job running in another process reads
    its status from disk and cancels it through the cancel file."""

    def __init__(self, store: ResultStore, key: str, kind: str, spec: Mapping | None, local: bool):
        self.store, self.key, self.kind, self.spec, self.local = store, key, kind, spec, local
        self.status_path, self.lock_path, self._cancel_path = _paths(store, key)
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._mu = threading.Lock()
        self._status: dict = {}
        self._last_write = 0.0
        self._dirty = False  # progress held back by the write throttle; the beat thread flushes it
        self._on_progress: Callable[[float, str], None] | None = None
        self.backend = None  # an iarmem_core.backends.Backend for map_blocks, or None (local)
        self.thread: threading.Thread | None = None
        self.exception: BaseException | None = None

    def __repr__(self) -> str:
        return f"JobHandle({self.key!r}, state={self.state!r}, local={self.local})"

    # -- reading ---------------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The current status dict (in-process copy for a local job, the status file otherwise)."""
        if self.local:
            with self._mu:
                return dict(self._status)
        return job_status(self.key, self.store)

    @property
    def state(self) -> str:
        return self.status().get("state", "none")

    @property
    def progress(self) -> float:
        return float(self.status().get("progress") or 0.0)

    @property
    def done(self) -> bool:
        """True once the job is over (done, failed or cancelled)."""
        return self.state in TERMINAL

    def wait(self, timeout: float | None = None, poll_s: float = 0.1) -> bool:
        """Block until the job is over or `timeout` passes; True if it is over."""
        if self.local:
            return self._finished.wait(timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(poll_s)
        return True

    def result(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) from the store once done; raises if the job failed, was cancelled or is not over."""
        st = self.status()
        state = st.get("state")
        if state == "done":
            return self.store.load(self.key)
        if state == "cancelled":
            raise Cancelled(f"job {self.key} was cancelled at {100 * float(st.get('progress') or 0):.0f}%")
        if state == "failed":
            raise RuntimeError(f"job {self.key} failed: {st.get('error')}")
        raise RuntimeError(f"job {self.key} is {state}; wait() for it first")

    def cancel(self) -> None:
        """Ask the job to stop at its next ctx.check(); its checkpoint (if one was saved) is kept, so it can
        resume."""
        self._cancel.set()
        if self.local and self.state in TERMINAL:
            return
        atomic_write_json(self._cancel_path, {"requested": time.time(), "by_pid": os.getpid()})

    # -- writing (runner side) -------------------------------------------------------------------------------

    def _set(self, force: bool = True, **fields) -> None:
        with self._mu:
            self._status.update(fields)
            now = time.monotonic()
            if force or now - self._last_write >= STATUS_EVERY_S:
                self._last_write = now
                self._dirty = False
                atomic_write_json(self.status_path, self._status)
            else:
                self._dirty = True

    def _flush(self) -> None:
        if self._dirty:
            self._set(force=True)

    def _set_final(self, **fields) -> None:
        """Record a terminal status; if the disk refuses (full), the in-process status still holds it."""
        try:
            self._set(**fields)
        except (OSError, StoreError) as e:
            with self._mu:
                self._status["status_write_error"] = f"{type(e).__name__}: {e}"

    def _progress(self, fraction: float, message: str) -> None:
        self._set(force=False, progress=fraction, message=message)
        if self._on_progress is not None:
            self._on_progress(fraction, message)


# ----------------------------------------------------------------------------------------------------------
# running

_REGISTRY: dict[tuple[str, str], JobHandle] = {}  # (store root, key) -> the handle of a job this process runs
_REGISTRY_MU = threading.Lock()


def _run(handle: JobHandle, fn: JobFn, lock: _Lock, version: str | None) -> None:
    """Run fn under the held lock and record the outcome; never raises (the outcome is in the status)."""
    stop_beat = threading.Event()

    def beat() -> None:
        last = time.monotonic()
        while not stop_beat.wait(STATUS_EVERY_S):
            try:
                handle._flush()  # progress held back by the throttle reaches the disk within STATUS_EVERY_S
                if time.monotonic() - last >= HEARTBEAT_S:
                    last = time.monotonic()
                    handle._set(heartbeat=time.time())
                    lock.beat()
            except (OSError, StoreError):  # a full disk: the job itself reports it when it next writes
                pass

    beater = threading.Thread(target=beat, name=f"iarmem-heartbeat-{handle.key}", daemon=True)
    try:
        # a cancel request left from an earlier run must not stop this one
        handle._cancel_path.unlink(missing_ok=True)
        # a damaged checkpoint fails the job with a clear message (it is never discarded silently)
        resume = handle.store.load_partial(handle.key)
        now = time.time()
        handle._set(
            state="running",
            started=now,
            heartbeat=now,
            resumed=resume is not None,
            message="resuming from checkpoint" if resume else "started",
        )
        beater.start()
        out = fn(JobContext(handle, resume))
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Mapping)):
            raise TypeError(f"job function for {handle.kind} must return (arrays: dict, meta: dict), got {type(out)}")
        handle._set(message="saving result")
        handle.store.save(handle.key, out[0], out[1], kind=handle.kind, spec=handle.spec, version=version)
        handle.store.clear_partial(handle.key)
        handle._set(state="done", progress=1.0, message="done", finished=time.time())
    except Cancelled:
        kept = _has_checkpoint(handle)
        handle._set_final(state="cancelled", message=f"cancelled ({_kept(kept)})", resumable=kept, finished=time.time())
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C in the CLI: a cancel, re-raised by run_job
        kept = _has_checkpoint(handle)
        msg = f"interrupted ({type(e).__name__}) at {100 * handle.progress:.0f}%; {_kept(kept)}"
        if isinstance(e, KeyboardInterrupt):
            e.args = (f"job {handle.key} {msg}",)  # what the CLI prints
        handle.exception = e
        handle._set_final(state="cancelled", message=msg, resumable=kept, finished=time.time())
    except BaseException as e:  # the status must say why, whatever it was
        handle.exception = e
        handle._set_final(
            state="failed",
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(limit=20),
            message="failed",
            resumable=_has_checkpoint(handle),
            finished=time.time(),
        )
    finally:
        stop_beat.set()
        if beater.is_alive():
            beater.join()
        lock.release()  # after the terminal status is on disk, so readers never see running + no lock
        handle._finished.set()


def _has_checkpoint(handle: JobHandle) -> bool:
    try:
        return handle.store.has_partial(handle.key)
    except OSError:
        return False


def _kept(kept: bool) -> str:
    return (
        "checkpoint kept: starting it again resumes from there"
        if kept
        else "no checkpoint had been saved yet: starting it again begins from the start"
    )


def _prepare(kind: str, spec: Mapping, store: ResultStore | None, version: str | None):
    store = store or get_store()
    key = store.key(kind, spec, version)
    return store, key


def _check_writable(store: ResultStore, kind: str, key: str) -> None:
    """A job needs a writable store (status, lock, checkpoints, the result): refuse before anything runs."""
    if store.read_only:
        store._writable(f"running the {kind} job {key}")


def _local_handle(store, key, kind, spec, on_progress, backend=None) -> JobHandle:
    """A handle for a run in this process (the caller holds the lock); writes the queued status."""
    h = JobHandle(store, key, kind, spec, local=True)
    h._on_progress = on_progress
    h.backend = backend
    h._status = {
        "key": key,
        "kind": kind,
        "state": "queued",
        "progress": 0.0,
        "message": "queued",
        "pid": os.getpid(),
        "host": HOST,
        "error": None,
        "started": None,
        "finished": None,
        "backend": getattr(backend, "name", "local"),
        "where": backend.describe() if backend is not None else f"this process (pid {os.getpid()} on {HOST})",
    }
    h._set()
    return h


def start_job(
    kind: str,
    spec: Mapping,
    fn: JobFn,
    store: ResultStore | None = None,
    version: str | None = None,
    force: bool = False,
    on_progress: Callable[[float, str], None] | None = None,
    backend=None,
) -> JobHandle:
    """Start job (kind, spec, fn) in a background thread of this process and return its handle.

    If the same key already runs here, its existing handle is returned; if it runs in another process, a
    handle that follows it through the status file; if its result is stored (and not `force`), a handle
    that is done at once. The thread is a daemon: it keeps running when the browser session that started
    it goes away, and dies with the server process (the job then resumes from its checkpoint).
    `backend` (an iarmem_core.backends.Backend, None: local) is where the job's blocks run (ctx.backend)."""
    store, key = _prepare(kind, spec, store, version)
    reg_key = (str(store.root), key)
    with _REGISTRY_MU:
        h = _REGISTRY.get(reg_key)
        if h is not None and not h._finished.is_set():
            return h
        if not force and store.exists(key):
            clear_stale_partial(store, key)
            return JobHandle(store, key, kind, spec, local=False)
        _check_writable(store, kind, key)
        lock = _Lock(_paths(store, key)[1])
        if not lock.try_acquire():
            return JobHandle(store, key, kind, spec, local=False)
        h = _local_handle(store, key, kind, spec, on_progress, backend)
        h.thread = threading.Thread(target=_run, args=(h, fn, lock, version), name=f"iarmem-job-{key}", daemon=True)
        _REGISTRY[reg_key] = h
        h.thread.start()
    return h


def run_job(
    kind: str,
    spec: Mapping,
    fn: JobFn,
    store: ResultStore | None = None,
    version: str | None = None,
    force: bool = False,
    on_progress: Callable[[float, str], None] | None = None,
    wait: bool = True,
    backend=None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Run job (kind, spec, fn) in this thread (the CLI) and return its (arrays, meta).

    A stored result is returned without running (unless `force`). If the job runs elsewhere (another
    process or thread), wait for it (`wait=True`) or raise JobBusyError. Cancelled (Ctrl-C included) and
    failures are recorded in the status and re-raised; the checkpoint is kept for a later resume.
    `backend` (an iarmem_core.backends.Backend, None: local) is where the job's blocks run (ctx.backend)."""
    store, key = _prepare(kind, spec, store, version)
    if not force and store.exists(key):
        out = store.load(key)
        clear_stale_partial(store, key)
        return out
    _check_writable(store, kind, key)
    lock = _Lock(_paths(store, key)[1])
    while not lock.try_acquire():
        st = job_status(key, store)
        if not wait:
            raise JobBusyError(
                f"job {key} is already running (pid {st.get('pid')} on {st.get('host')}, "
                f"{100 * float(st.get('progress') or 0):.0f}%); wait for it or cancel it first"
            )
        other = JobHandle(store, key, kind, spec, local=False)
        other.wait()
        if not other.status().get("interrupted"):
            return other.result()
        # the other runner died: take over and resume from its checkpoint
    h = _local_handle(store, key, kind, spec, on_progress, backend)
    _run(h, fn, lock, version)
    if h.exception is not None:
        raise h.exception
    if h.state == "cancelled":
        raise Cancelled(f"job {key} cancelled; {_kept(bool(h.status().get('resumable')))}")
    return store.load(key)


def cancel_job(key: str, store: ResultStore | None = None) -> None:
    """Ask job `key` to stop, wherever it runs (it stops at its next ctx.check())."""
    store = store or get_store()
    with _REGISTRY_MU:
        h = _REGISTRY.get((str(store.root), key))
    if h is not None:
        h.cancel()
    else:
        atomic_write_json(_paths(store, key)[2], {"requested": time.time(), "by_pid": os.getpid()})


# ----------------------------------------------------------------------------------------------------------
# the batch loop shared by every job


def is_oom(e: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class OutOfMemory(RuntimeError):
    """Even a batch of one does not fit; the message says what to do."""


def run_batches(
    ctx: JobContext | None,
    n: int,
    batch_size: int,
    work: Callable[[int, int], None],
    *,
    start: int = 0,
    save: Callable[[int], tuple[Mapping[str, np.ndarray], Mapping]] | None = None,
    progress: Callable[[int], tuple[float, str]] | None = None,
    events: list | None = None,
    align: int = 1,
    what: str = "batch",
) -> int:
    """Run ``work(i, j)`` over the items [start, n) in batches; returns the last batch size used.

    - `work` must write its results only once it succeeded: on out-of-memory the same items are retried
      with half the batch (each halving appended to `events` as {"at", "from", "to", "error"}); a batch of
      one that still does not fit raises `OutOfMemory` with the original error.
    - `align`: batch ends fall on multiples of `align` (the batch size is rounded up to one), so the items
      of a batch, and with them a batch-dependent computation, are the same whatever `batch_size` is.
    - With a job context: `ctx.check()` before every batch (a cancel stops between batches),
      `progress(j) -> (fraction, message)` after each, and `save(j) -> (arrays, meta)` checkpoints the state
      after item j, at most every CHECKPOINT_EVERY_S seconds and never more than 10% of the time (a large
      state is saved less often). The last batch is never checkpointed (the result follows).
    """
    align = max(1, int(align))
    bs = max(1, int(batch_size))
    bs = -(-bs // align) * align
    i = int(start)
    last_save, save_cost = time.monotonic(), 0.0
    while i < n:
        if ctx is not None:
            ctx.check()
        j = min(n, i + bs)
        if align > 1 and bs >= align:
            j = min(n, (j // align) * align) if j % align and j < n else j
            j = max(j, i + 1)
        try:
            work(i, j)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if j - i == 1:
                raise OutOfMemory(
                    f"out of memory on a {what} of 1 item (item {i}): the model does not fit on this device. "
                    f"Use a smaller model, dtype bf16, or another device (--device cpu). Original error: "
                    f"{str(e).splitlines()[0][:200]}"
                ) from e
            new = max(1, (j - i) // 2)
            if events is not None:
                events.append({"at": int(i), "from": int(j - i), "to": int(new), "error": str(e).splitlines()[0][:200]})
            bs = new
            continue
        i = j
        if ctx is not None and progress is not None:
            ctx.progress(*progress(j))
        if ctx is not None and save is not None and j < n:
            if time.monotonic() - last_save >= max(CHECKPOINT_EVERY_S, 10 * save_cost):
                t = time.monotonic()
                ctx.checkpoint(*save(j))
                last_save = time.monotonic()
                save_cost = last_save - t
    return bs
