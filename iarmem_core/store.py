"""Results on disk, keyed by a hash of everything that determines them; atomic, never half-written.

A result is a dict of numpy arrays plus a JSON-able meta dict. Its key is `<kind>-<hash>` where the hash
covers the kind, the caller's spec (model identity, data selection, options) and the code version, so a
result computed by other code or on other data is never silently reused.

Layout under the root (`$IARMEM_STORE`, else `<repo>/store/`):

    results/<key>/CURRENT          name of the live version folder, switched with os.replace
    results/<key>/v-<id>/          <name>.npy per array (no pickles), meta.json, info.json (kind, spec,
                                   sha256 of every file)
    partial/<key>/...              the same for a resumable job's checkpoint state
    jobs/<key>.json|.lock|.cancel  job status, lock and cancel request (see jobs.py)
    manifest.json                  kind, spec, created and sizes of every result (derived; rebuilt if damaged)
    tmp/                           folders being written; a crash leaves them here, never in results/

A version folder is written completely in tmp/, fsynced, renamed into its slot, and only then made live by
replacing CURRENT: killed at any moment, a reader sees the old result or the new one, never a mix.

What is read is checked: CURRENT must name a version folder of the form `v-<digits>-<8 hex>` (no path
component, no link), info.json must record the key it is served under (a result copied under another key
is refused), array names must be plain names, and every file must match its sha256. A store whose root
cannot be written (a read-only file system, a folder without write permission) opens read-only by itself;
a full disk is a StoreFullError that says so, and nothing stored is changed.

Example:
    >>> st = ResultStore("/tmp/iarmem-doc-store")
    >>> k = st.key("unitmem", {"model": "demo-var", "n": 500})
    >>> _ = st.save(k, {"unitmem_GU": np.zeros((10, 4))}, {"note": "example"})
    >>> st.load(k)[0]["unitmem_GU"].shape
    (10, 4)
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from iarmem_core import __version__

STORE_FORMAT = 1
REPO = Path(__file__).resolve().parent.parent
_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}-[0-9a-f]{24}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"^v-[0-9]{1,24}-[0-9a-f]{8}$")
_FULL_RE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a short write (no errno)
_RO_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
HOST = socket.gethostname()
_HOST_ID = hashlib.sha256(HOST.encode()).hexdigest()[:8]


class StoreError(RuntimeError):
    """A store problem, with a message naming the entry, what is wrong and what to do."""


class ResultNotFound(StoreError, LookupError):
    """No complete result under this key."""


class CorruptEntryError(StoreError):
    """A stored entry that cannot be read; it is left in place for the user to inspect or delete."""


class StoreFullError(StoreError, OSError):
    """The disk of the store is full (or a file-size limit was hit); nothing stored was changed."""


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError that means 'no space': ENOSPC, EDQUOT, EFBIG, or numpy's short-write message."""
    return isinstance(e, OSError) and (
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or bool(_FULL_RE.search(str(e)))
    )


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def disk_full_error(path: str | os.PathLike, what: str, needed: int | None = None) -> StoreFullError:
    """A StoreFullError for `what` written under `path`, with the free space and what to do."""
    p = Path(path)
    free = _free_bytes(p)
    need = f" (about {needed:,} bytes needed" + (f", {free:,} free)" if free is not None else ")") if needed else ""
    if not need and free is not None:
        need = f" ({free:,} bytes free)"
    e = StoreFullError(
        f"disk full: could not write {what} under {p}{need}. Nothing stored was changed. Free some space on "
        f"that disk, or point the store at a larger one ($IARMEM_STORE or --store)"
    )
    e.errno = errno.ENOSPC
    return e


def default_root() -> Path:
    """$IARMEM_STORE, else <repo>/store."""
    return Path(os.environ.get("IARMEM_STORE") or REPO / "store")


def code_version(version: str | None = None) -> str:
    """The code version that goes into every key: the package version, plus a caller's per-kind version
    (bump it when an algorithm's output changes)."""
    return f"iarmem-{__version__}" + (f"+{version}" if version else "")


def to_jsonable(obj, where: str = "spec", allow_nan: bool = False):
    """obj as plain JSON types (dict/list/str/int/float/bool/None); numpy scalars, tuples, Paths and
    dataclasses are converted; anything else raises a TypeError naming where it sits."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        if not allow_nan and not math.isfinite(f):
            raise ValueError(f"{where}: {f} is not a finite number; a key cannot depend on NaN or infinity")
        return f
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where, allow_nan)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be strings")
            out[k] = to_jsonable(v, f"{where}[{k!r}]", allow_nan)
        return out
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, f"{where}[{i}]", allow_nan) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray) and obj.size <= 64:
        return to_jsonable(obj.tolist(), where, allow_nan)
    raise TypeError(
        f"{where}: a {type(obj).__name__} is not JSON-able; pass plain values (str, numbers, lists, dicts), "
        f"e.g. str(x) for a device or dtype, or a hash for a large array"
    )


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """A sha256 over named arrays (names sorted; each name, dtype, shape and bytes): the same digest for the same
    numbers, whatever wrote them (a local run, a Ray run, a resumed one)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def canonical_json(obj) -> str:
    """Sorted, compact JSON of obj: equal specs give equal strings."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part (temp + fsync + replace)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_file(tmp, data)
        os.replace(tmp, p)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(p.parent, p.name, len(data)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(p.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An exclusive (or shared) flock on `path`, released on exit and by the kernel when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def read_lock(path: Path) -> Iterator[None]:
    """A shared flock on `path` for a reader: created if it can be, else taken only if the file exists
    (a folder the reader may not write)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in _RO_ERRNOS:
            raise
        with existing_file_lock(path, shared=True):
            yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextmanager
def existing_file_lock(path: Path, shared: bool = True) -> Iterator[None]:
    """A flock on `path` if that file exists and can be opened; otherwise nothing (read-only stores)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReadOnlyStoreError(StoreError):
    """A write was asked of a store opened read-only."""


class ResultStore:
    """Results (dict of numpy arrays + JSON meta) on disk under `root`, keyed by `key(kind, spec)`.

    `read_only=True` opens a store that is only read (a shipped results folder, a mounted dataset, a shared
    folder without write permission): nothing is created, cleaned or locked (a lock file that exists is
    still honoured, so a concurrent writer is never torn), and every write raises ReadOnlyStoreError.
    A root that cannot be written (read-only file system, no permission) opens read-only by itself;
    `read_only_reason` then says why.
    """

    def __init__(self, root: str | os.PathLike | None = None, read_only: bool = False):
        self.root = Path(root) if root is not None else default_root()
        self.root = self.root.expanduser().absolute()
        self.read_only = bool(read_only)
        self.read_only_reason: str | None = "opened read-only" if self.read_only else None
        if self.read_only:
            return
        try:
            for sub in ("results", "partial", "jobs", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            if not os.access(self.root / "tmp", os.W_OK):
                ro = bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
                raise OSError(errno.EROFS if ro else errno.EACCES, "cannot write", str(self.root / "tmp"))
        except OSError as e:
            if e.errno not in _RO_ERRNOS:
                raise
            self.read_only = True
            self.read_only_reason = f"it cannot be written ({os.strerror(e.errno).lower()})"
            return
        self._cleanup_tmp()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r}{', read_only=True' if self.read_only else ''})"

    def _writable(self, what: str) -> None:
        if self.read_only:
            why = self.read_only_reason or "opened read-only"
            raise ReadOnlyStoreError(
                f"{what}: the store at {self.root} is read-only ({why}); its results can be read, not written. "
                f"Write to a store you can write: set $IARMEM_STORE or --store to a writable folder"
            )

    # -- keys -----------------------------------------------------------------------------------------------

    def key(self, kind: str, spec: Mapping, version: str | None = None) -> str:
        """`<kind>-<24 hex>`: a hash of kind, the JSON-able spec and the code version (+ per-kind version)."""
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise ValueError(f"kind {kind!r}: expected lower-case letters, digits, '_', '.', '-' (e.g. 'unitmem')")
        if not isinstance(spec, Mapping):
            raise TypeError(f"spec must be a dict of JSON-able values, got a {type(spec).__name__}")
        doc = {
            "format": STORE_FORMAT,
            "kind": kind,
            "spec": to_jsonable(spec),
            "code_version": code_version(version),
        }
        return f"{kind}-{hashlib.sha256(canonical_json(doc).encode()).hexdigest()[:24]}"

    def _check_key(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"{key!r} is not a store key (expected '<kind>-<24 hex>' as returned by ResultStore.key)")
        return key

    def result_dir(self, key: str) -> Path:
        return self.root / "results" / self._check_key(key)

    def partial_dir(self, key: str) -> Path:
        return self.root / "partial" / self._check_key(key)

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    # -- results --------------------------------------------------------------------------------------------

    def save(
        self,
        key: str,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping | None = None,
        *,
        kind: str | None = None,
        spec: Mapping | None = None,
        version: str | None = None,
    ) -> Path:
        """Write a result atomically (an older one under the key is replaced once the new one is complete).

        `kind`/`spec`/`version` (as passed to `key`) are recorded in info.json and the manifest; when
        given, they must hash to `key`. Returns the live version folder."""
        self._check_key(key)
        self._writable(f"saving {key}")
        if spec is not None:
            k2 = self.key(kind or key.rsplit("-", 1)[0], spec, version)
            if k2 != key:
                raise ValueError(
                    f"spec does not match key {key}: it hashes to {k2}. Pass the same kind, spec and "
                    f"version to key() and save()"
                )
        info = {
            "key": key,
            "kind": key.rsplit("-", 1)[0],
            "spec": to_jsonable(spec) if spec is not None else None,
            "code_version": code_version(version),
        }
        path = self._write_slot(self.result_dir(key), arrays, meta, info)
        self._manifest_update(key, self._read_info(self.result_dir(key), key, "result"))
        return path

    def exists(self, key: str) -> bool:
        """True when a complete result is live under `key` (it is not verified here; load does that)."""
        return (self.result_dir(key) / "CURRENT").exists()

    def load(self, key: str, verify: bool = True, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta) of the result under `key`; ResultNotFound if none, CorruptEntryError if damaged.
        verify=True checks each file's sha256; mmap=True maps arrays read-only instead of reading them."""
        return self._read_slot(self.result_dir(key), key, "result", verify, mmap)

    def info(self, key: str) -> dict:
        """info.json of a result: key, kind, spec, code_version, created, arrays (shape, dtype, bytes)."""
        return self._read_info(self.result_dir(key), key, "result")

    def delete(self, key: str) -> bool:
        """Remove a result (explicit user action only); True if there was one."""
        self._writable(f"deleting {key}")
        found = self._remove_slot(self.result_dir(key))
        with self._manifest_lock():
            m = self._read_manifest_unlocked()
            if m["entries"].pop(key, None) is not None:
                self._write_manifest_unlocked(m)
        return found

    # -- partial state of resumable jobs --------------------------------------------------------------------

    def save_partial(self, key: str, state_arrays: Mapping[str, np.ndarray], state_meta: Mapping | None = None) -> None:
        """Atomically replace the checkpoint state of the job `key`."""
        self._writable(f"checkpointing {key}")
        self._write_slot(self.partial_dir(key), state_arrays, state_meta, {"key": key, "partial": True})

    def load_partial(self, key: str, verify: bool = True) -> tuple[dict[str, np.ndarray], dict] | None:
        """(state_arrays, state_meta) of the last checkpoint, or None; CorruptEntryError if damaged."""
        try:
            return self._read_slot(self.partial_dir(key), key, "partial state", verify, False)
        except ResultNotFound:
            return None

    def has_partial(self, key: str) -> bool:
        return (self.partial_dir(key) / "CURRENT").exists()

    def clear_partial(self, key: str) -> None:
        """Drop the checkpoint state of `key` (after its result was saved, or to start over)."""
        self._writable(f"clearing the checkpoint of {key}")
        self._remove_slot(self.partial_dir(key))

    # -- manifest -------------------------------------------------------------------------------------------

    def list(self, kind: str | None = None) -> list[dict]:
        """Manifest rows (key, kind, spec, created, bytes, arrays), newest first; rebuilt if out of date.

        A read-only store reads the rows from the results' info.json files (nothing is written)."""
        if self.read_only:
            rows = []
            res = self.root / "results"
            for slot in sorted(res.iterdir()) if res.is_dir() else []:
                if (kind is None or slot.name.rsplit("-", 1)[0] == kind) and (slot / "CURRENT").exists():
                    try:
                        info = self._read_info(slot, slot.name, "result")
                    except StoreError:
                        continue
                    rows.append({"key": slot.name, **self._manifest_row(info)})
            return sorted(rows, key=lambda r: r.get("created", 0), reverse=True)
        with self._manifest_lock():
            m = self._read_manifest_unlocked()
            live = {p.name for p in (self.root / "results").iterdir() if (p / "CURRENT").exists()}
            if set(m["entries"]) != live:  # a crash between publish and manifest update, or a manual delete
                m = self._rebuild_manifest_unlocked()
        rows = [{"key": k, **v} for k, v in m["entries"].items() if kind is None or v.get("kind") == kind]
        return sorted(rows, key=lambda r: r.get("created", 0), reverse=True)

    def rebuild_manifest(self) -> dict:
        """Recreate manifest.json from the results' info.json files (the results are the truth)."""
        self._writable("rebuilding the manifest")
        with self._manifest_lock():
            return self._rebuild_manifest_unlocked()

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        with file_lock(self.root / ".manifest.lock"):
            yield

    def _read_manifest_unlocked(self) -> dict:
        path = self.root / "manifest.json"
        if not path.exists():
            return self._rebuild_manifest_unlocked()
        try:
            m = json.loads(path.read_text())
            if not isinstance(m, dict) or not isinstance(m.get("entries"), dict):
                raise ValueError("no 'entries' mapping")
            return m
        except (ValueError, OSError, UnicodeDecodeError):
            # keep the damaged file for inspection; the manifest is derived data, so rebuild it
            os.replace(path, path.with_name(f"manifest.json.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
            return self._rebuild_manifest_unlocked()

    def _rebuild_manifest_unlocked(self) -> dict:
        entries = {}
        for slot in sorted((self.root / "results").iterdir()):
            if not (slot / "CURRENT").exists():
                continue
            try:
                entries[slot.name] = self._manifest_row(self._read_info(slot, slot.name, "result"))
            except StoreError as e:
                entries[slot.name] = {"kind": slot.name.rsplit("-", 1)[0], "error": str(e)}
        m = {"format": STORE_FORMAT, "entries": entries}
        self._write_manifest_unlocked(m)
        return m

    def _write_manifest_unlocked(self, m: dict) -> None:
        atomic_write_json(self.root / "manifest.json", m)

    @staticmethod
    def _manifest_row(info: dict) -> dict:
        arrays = {n: {"shape": a["shape"], "dtype": a["dtype"], "bytes": a["bytes"]} for n, a in info["arrays"].items()}
        return {
            "kind": info.get("kind"),
            "spec": info.get("spec"),
            "code_version": info.get("code_version"),
            "created": info.get("created"),
            "bytes": sum(a["bytes"] for a in arrays.values()),
            "arrays": arrays,
        }

    def _manifest_update(self, key: str, info: dict) -> None:
        with self._manifest_lock():
            m = self._read_manifest_unlocked()
            m["entries"][key] = self._manifest_row(info)
            self._write_manifest_unlocked(m)

    # -- slots: a folder whose CURRENT names the live, complete version folder ------------------------------

    def _write_slot(self, slot: Path, arrays: Mapping[str, np.ndarray], meta: Mapping | None, info: dict) -> Path:
        # 1. validate everything before touching the disk: bad input never replaces a stored entry
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays must be a dict of name -> numpy array, got a {type(arrays).__name__}")
        arrs = {}
        for name, a in arrays.items():
            if not isinstance(name, str) or not _NAME_RE.match(name) or name in ("meta", "info"):
                raise ValueError(f"array name {name!r}: use letters, digits, '_', '.', '-' (not 'meta' or 'info')")
            a = np.asarray(a)
            if a.dtype.hasobject:
                raise TypeError(f"array {name!r} has dtype object; store numbers or fixed-width strings (no pickles)")
            arrs[name] = np.ascontiguousarray(a)
        meta_json = json.dumps(to_jsonable(dict(meta or {}), "meta", allow_nan=True), indent=1, sort_keys=True)

        # 2. write a complete version folder in tmp/ and fsync it
        tmp = self._tmp_path("w")
        try:
            tmp.mkdir(parents=True)
            return self._write_version(tmp, slot, arrs, meta_json, info)
        except OSError as e:
            if is_disk_full(e) and not isinstance(e, StoreFullError):
                needed = sum(a.nbytes for a in arrs.values()) + len(meta_json)
                raise disk_full_error(
                    self.root, f"{info.get('key')} ({'checkpoint' if info.get('partial') else 'result'})", needed
                ) from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _write_version(self, tmp: Path, slot: Path, arrs: dict, meta_json: str, info: dict) -> Path:
        """Write arrays, meta.json and info.json into `tmp`, fsync, move it into `slot` and publish it."""
        meta_arrays = {}
        for name, a in arrs.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            meta_arrays[name] = {
                "shape": list(a.shape),
                "dtype": a.dtype.str,
                "bytes": int(a.nbytes),
                "sha256": _sha256_file(tmp / f"{name}.npy"),
            }
        _write_file(tmp / "meta.json", (meta_json + "\n").encode())
        info = {
            **info,
            "format": STORE_FORMAT,
            "created": time.time(),
            "arrays": meta_arrays,
            "meta_sha256": hashlib.sha256((meta_json + "\n").encode()).hexdigest(),
        }
        _write_file(tmp / "info.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)

        # 3. move it into the slot, make it live by replacing CURRENT (atomic), then drop older versions
        slot.mkdir(parents=True, exist_ok=True)
        with file_lock(slot / ".lock"):
            vname = f"v-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
            os.rename(tmp, slot / vname)
            _fsync_dir(slot)
            self._publish(slot, vname)
            for old in slot.iterdir():
                if old.is_dir() and old.name.startswith("v-") and old.name != vname:
                    shutil.rmtree(old, ignore_errors=True)
        return slot / vname

    def _publish(self, slot: Path, vname: str) -> None:
        """Make version `vname` live: write CURRENT.tmp, fsync, os.replace onto CURRENT, fsync the folder."""
        atomic_write_bytes(slot / "CURRENT", (vname + "\n").encode())

    def _live_version(self, slot: Path, key: str, what: str) -> Path:
        cur = slot / "CURRENT"
        try:
            vname = cur.read_text().strip()
        except FileNotFoundError:
            raise ResultNotFound(f"no {what} stored under {key} (looked in {slot})") from None
        if not _VERSION_RE.match(vname):  # never a path: no '/', no '..'
            raise self._corrupt(slot, key, what, f"CURRENT names {vname[:80]!r}, which is not a version folder name")
        vdir = slot / vname
        if vdir.is_symlink() or not vdir.is_dir():
            raise self._corrupt(slot, key, what, f"CURRENT names {vname!r}, which is not a version folder there")
        return vdir

    def _read_info(self, slot: Path, key: str, what: str, vdir: Path | None = None) -> dict:
        vdir = vdir or self._live_version(slot, key, what)
        try:
            info = json.loads((vdir / "info.json").read_text())
            if not isinstance(info, dict) or not isinstance(info.get("arrays"), dict):
                raise ValueError("no 'arrays' mapping")
        except (OSError, ValueError) as e:
            raise self._corrupt(slot, key, what, f"info.json unreadable ({type(e).__name__}: {e})") from e
        if info.get("key") != key:
            raise self._corrupt(
                slot,
                key,
                what,
                f"info.json records the key {str(info.get('key'))[:80]!r}: this entry was copied or moved here "
                f"from another key, so it is not served",
            )
        bad = [n for n in info["arrays"] if not isinstance(n, str) or not _NAME_RE.match(n) or n in ("meta", "info")]
        if bad:
            raise self._corrupt(slot, key, what, f"info.json lists array names that are not plain names: {bad[:3]!r}")
        return info

    def _read_slot(self, slot: Path, key: str, what: str, verify: bool, mmap: bool) -> tuple[dict, dict]:
        # a shared lock keeps a concurrent writer from removing this version folder while it is read
        if self.read_only:
            lock = existing_file_lock(slot / ".lock", shared=True)
        else:
            lock = read_lock(slot / ".lock") if slot.is_dir() else nullcontext()
        with lock:
            vdir = self._live_version(slot, key, what)
            return self._read_version(slot, key, what, vdir, verify, mmap)

    def _read_version(self, slot: Path, key: str, what: str, vdir: Path, verify: bool, mmap: bool) -> tuple[dict, dict]:
        info = self._read_info(slot, key, what, vdir)
        arrays = {}
        for name, a in info["arrays"].items():
            f = vdir / f"{name}.npy"
            if not f.exists():
                raise self._corrupt(slot, key, what, f"{f.name} is missing")
            if verify and _sha256_file(f) != a.get("sha256"):
                raise self._corrupt(slot, key, what, f"{f.name} does not match its sha256 in info.json")
            try:
                arr = np.load(f, allow_pickle=False, mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as e:
                raise self._corrupt(slot, key, what, f"{f.name} unreadable ({type(e).__name__}: {e})") from e
            if list(arr.shape) != a["shape"] or arr.dtype.str != a["dtype"]:
                raise self._corrupt(
                    slot,
                    key,
                    what,
                    f"{f.name} has shape {list(arr.shape)} {arr.dtype.str}, info.json says {a['shape']} {a['dtype']}",
                )
            arrays[name] = arr
        try:
            raw = (vdir / "meta.json").read_bytes()
            if verify and hashlib.sha256(raw).hexdigest() != info.get("meta_sha256"):
                raise ValueError("does not match its sha256 in info.json")
            meta = json.loads(raw)
        except (OSError, ValueError) as e:
            raise self._corrupt(slot, key, what, f"meta.json unreadable ({type(e).__name__}: {e})") from e
        return arrays, meta

    @staticmethod
    def _corrupt(slot: Path, key: str, what: str, problem: str) -> CorruptEntryError:
        return CorruptEntryError(
            f"the {what} stored under {key} is damaged: {problem}. It was left in place at {slot}. Inspect "
            f"it, then delete it (ResultStore.delete(key) for a result, clear_partial(key) for partial "
            f"state, or remove the folder) and run the job again."
        )

    def _tmp_path(self, tag: str) -> Path:
        """tmp/<tag>-<host id>-<pid>-<random>: the owner is known, so leftovers of dead processes can go."""
        return self.root / "tmp" / f"{tag}-{_HOST_ID}-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def _remove_slot(self, slot: Path) -> bool:
        if not slot.exists():
            return False
        # rename first so that a half-deleted folder is never read as an entry
        trash = self._tmp_path("trash")
        with file_lock(slot / ".lock"):
            os.rename(slot, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _cleanup_tmp(self) -> None:
        """Remove tmp/ folders of dead processes on this host (interrupted writes; never live entries)."""
        for p in (self.root / "tmp").iterdir():
            try:
                _tag, host_id, pid, _ = p.name.split("-", 3)
                pid = int(pid)
            except ValueError:
                continue
            if host_id == _HOST_ID and pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_DEFAULT: dict[str, ResultStore] = {}


def get_store(root: str | os.PathLike | None = None) -> ResultStore:
    """A ResultStore for `root` (default: $IARMEM_STORE or <repo>/store), shared within the process."""
    r = str(Path(root).expanduser().absolute() if root is not None else default_root().absolute())
    if r not in _DEFAULT:
        _DEFAULT[r] = ResultStore(r)
    return _DEFAULT[r]
