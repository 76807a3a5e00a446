"""Hostile and unlucky stores: read-only file systems, full disks, copied or crafted entries.

The read-only file system and the full disk are real (a read-only bind mount and a small tmpfs in a private
mount namespace, tests/support/sandbox.py); the crafted entries are made here. Each case checks what is
served (never a damaged, misplaced or path-escaping entry), what the message says, and that nothing stored
is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from iarmem_core import jobs
from iarmem_core.store import CorruptEntryError, ResultStore
from tests.support import sandbox

needs_ns = pytest.mark.skipif(sandbox.namespaces_available() is not None, reason=str(sandbox.namespaces_available()))


@pytest.fixture
def st(tmp_path):
    return ResultStore(tmp_path / "store")


def _one(st: ResultStore, n: int = 5, tag: str = "a") -> str:
    k = st.key("toy", {"tag": tag})
    st.save(k, {"x": np.arange(n, dtype=np.float64)}, {"tag": tag}, kind="toy", spec={"tag": tag})
    return k


# ---------------------------------------------------------------------------------------------------------
# entries that are not what they claim


def test_result_copied_under_another_key_is_not_served(st):
    a, b = _one(st, tag="a"), st.key("toy", {"tag": "b"})
    shutil.copytree(st.result_dir(a), st.result_dir(b))  # a complete, sha256-valid entry, but keyed as b
    assert st.exists(b)
    with pytest.raises(CorruptEntryError, match=rf"records the key '{a}'.*copied or moved here"):
        st.load(b)
    assert st.load(a)[0]["x"].tolist() == [0, 1, 2, 3, 4]  # the original is untouched
    rows = {r["key"]: r for r in st.list()}
    assert "error" in rows[b] and "error" not in rows[a]
    ro = {r["key"] for r in ResultStore(st.root, read_only=True).list()}
    assert ro == {a}  # a read-only listing leaves the misplaced entry out


@pytest.mark.parametrize(
    "current",
    [
        "../{other}/{vname}",
        "{own}/../../{other}/{vname}",  # starts like a version folder, ends in another entry's
        "{own}/../..",
        "/etc",
        "v-../../x",
        "{own}\n../x",
    ],
)
def test_current_never_names_a_path(st, current):
    a = _one(st, tag="a")
    other = _one(st, tag="other")
    vname = (st.result_dir(other) / "CURRENT").read_text().strip()
    own = (st.result_dir(a) / "CURRENT").read_text().strip()
    (st.result_dir(a) / "CURRENT").write_text(current.format(other=other, vname=vname, own=own))
    with pytest.raises(CorruptEntryError, match=r"CURRENT names"):
        st.load(a)
    assert st.load(other)[0]["x"].tolist() == [0, 1, 2, 3, 4]


def test_version_folder_that_is_a_link_is_not_followed(st, tmp_path):
    a = _one(st, tag="a")
    slot = st.result_dir(a)
    vname = (slot / "CURRENT").read_text().strip()
    (slot / vname).rename(tmp_path / "elsewhere")
    (slot / vname).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CorruptEntryError, match=r"not a version folder"):
        st.load(a)


def test_array_names_in_info_json_must_be_plain_names(st, tmp_path):
    secret = tmp_path / "secret.npy"
    np.save(secret, np.array([42]))
    a = _one(st, tag="a")
    vdir = st.result_dir(a) / (st.result_dir(a) / "CURRENT").read_text().strip()
    info = json.loads((vdir / "info.json").read_text())
    rel = "../../../../secret"  # vdir -> slot -> results -> store -> tmp_path
    assert (vdir / f"{rel}.npy").resolve() == secret.resolve()
    info["arrays"][rel] = {"shape": [1], "dtype": "<i8", "bytes": 8, "sha256": "0" * 64}
    (vdir / "info.json").write_text(json.dumps(info))
    with pytest.raises(CorruptEntryError, match=r"not plain names"):
        st.load(a, verify=False)  # refused even without the sha256 check


def test_damaged_entries_are_never_served(st):
    a = _one(st, n=1000, tag="a")
    vdir = st.result_dir(a) / (st.result_dir(a) / "CURRENT").read_text().strip()
    f = vdir / "x.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptEntryError, match=r"x\.npy does not match its sha256.*left in place"):
        st.load(a)
    assert f.exists()  # left for the user to inspect


# ---------------------------------------------------------------------------------------------------------
# read-only file systems and full disks (real ones, in a private mount namespace)

_READONLY_CHECK = """
import json, sys
import numpy as np
from iarmem_core import jobs
from iarmem_core.store import ResultStore, ReadOnlyStoreError
root, key = sys.argv[1], sys.argv[2]
st = ResultStore(root)  # not asked to be read-only: it finds out
out = {"read_only": st.read_only, "reason": st.read_only_reason}
out["x"] = st.load(key)[0]["x"].tolist()
out["listed"] = [r["key"] for r in st.list()]
out["status"] = jobs.job_status(key, st)["state"]
calls = []
def fn(ctx):
    calls.append(1)
    return {"x": np.zeros(1)}, {}
out["stored_job"] = jobs.run_job("toy", {"tag": "a"}, fn, store=st)[0]["x"].tolist()
for what, do in [("save", lambda: st.save(key, {"x": np.zeros(1)})),
                 ("new_job", lambda: jobs.run_job("toy", {"tag": "new"}, fn, store=st)),
                 ("start_job", lambda: jobs.start_job("toy", {"tag": "new"}, fn, store=st))]:
    try:
        do()
        out[what] = "no error"
    except ReadOnlyStoreError as e:
        out[what] = str(e)
out["calls"] = len(calls)
print(json.dumps(out))
"""


@needs_ns
def test_store_on_a_read_only_file_system_is_readable(st):
    a = _one(st, tag="a")
    jobs.run_job("toy", {"tag": "a"}, lambda ctx: None, store=st)  # the result exists: a status-free read
    before = sorted(str(p.relative_to(st.root)) for p in st.root.rglob("*"))
    r = sandbox.run([sys.executable, "-c", _READONLY_CHECK, str(st.root), a], read_only=[st.root], timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["read_only"] and "read-only file system" in out["reason"]
    assert out["x"] == [0, 1, 2, 3, 4] and out["listed"] == [a] and out["status"] == "done"
    assert out["stored_job"] == [0, 1, 2, 3, 4]
    for what in ("save", "new_job", "start_job"):
        assert "is read-only (it cannot be written (read-only file system))" in out[what], out[what]
        assert "$IARMEM_STORE or --store" in out[what]
    assert out["calls"] == 0  # a job that cannot store its result never runs
    assert sorted(str(p.relative_to(st.root)) for p in st.root.rglob("*")) == before


_FULL_CHECK = """
import json, sys
import numpy as np
from iarmem_core.store import ResultStore, StoreFullError, atomic_write_json
st = ResultStore(sys.argv[1])
k = st.key("toy", {"tag": "a"})
st.save(k, {"x": np.arange(5.0)}, {"v": 1})
out = {}
try:
    st.save(k, {"x": np.zeros(1 << 17)}, {"v": 2})  # 1 MiB on a 256 KiB disk
    out["save"] = "no error"
except StoreFullError as e:
    out["save"] = str(e)
try:
    st.save_partial(k, {"s": np.zeros(1 << 17)})
    out["partial"] = "no error"
except StoreFullError as e:
    out["partial"] = str(e)
try:
    atomic_write_json(st.jobs_dir / "big.json", {"pad": "x" * (1 << 20)})
    out["json"] = "no error"
except StoreFullError as e:
    out["json"] = str(e)
arrays, meta = st.load(k)
out["kept"] = [arrays["x"].tolist(), meta["v"]]
out["tmp"] = [p.name for p in (st.root / "tmp").iterdir()]
out["jobs"] = [p.name for p in st.jobs_dir.iterdir()]
print(json.dumps(out))
"""


@needs_ns
def test_full_disk_is_a_clear_error_and_changes_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = sandbox.run([sys.executable, "-c", _FULL_CHECK, str(disk / "s")], tmpfs={disk: "256k"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for what in ("save", "partial", "json"):
        msg = out[what]
        assert msg.startswith("disk full: could not write") and "requested and" not in msg, msg
        assert "Nothing stored was changed" in msg and " free" in msg, msg
    assert out["kept"] == [[0.0, 1.0, 2.0, 3.0, 4.0], 1]  # the result under the key is the old one, intact
    assert out["tmp"] == [] and out["jobs"] == []  # no half-written leftovers


# ---------------------------------------------------------------------------------------------------------
# the CLI on such stores: one line, a JSON error object with --json, a non-zero exit code, no traceback

CLI = ["-m", "iarmem_core", "unitmem", "--model", "test-var", "--n", "40", "--augs", "1", "--json"]


def _cli(args, **kw):
    """The CLI in a subprocess (inside a mount namespace when `kw` asks for mounts)."""
    if kw:
        return sandbox.run([sys.executable, *CLI, *args], **kw)
    env = {**os.environ, "PYTHONPATH": str(sandbox.REPO)}
    return subprocess.run(
        [sys.executable, *CLI, *args], cwd=sandbox.REPO, capture_output=True, text=True, timeout=300, env=env
    )


def _one_line_error(r, kind: str, *phrases: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and r.stderr.splitlines()[-1] == err[0], r.stderr  # one line, the last one
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(obj) == {"error", "type"} and obj["type"] == kind, obj
    for p in phrases:
        assert p in obj["error"], obj["error"]
    assert err[0] == f"error: {obj['error']}"
    return obj["error"]


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """A store with the test-var UnitMem result of CLI (computed once by the CLI itself)."""
    root = tmp_path_factory.mktemp("cli-store")
    r = _cli(["--store", str(root)])
    assert r.returncode == 0, r.stderr
    return root, json.loads(r.stdout)["store_key"]


def test_cli_on_a_damaged_store(computed, tmp_path):
    root, key = computed
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    st = ResultStore(bad)
    vdir = st.result_dir(key) / (st.result_dir(key) / "CURRENT").read_text().strip()
    f = vdir / "unitmem_LGU.npy"
    f.write_bytes(f.read_bytes()[:-8] + bytes(8))
    msg = _one_line_error(_cli(["--store", str(bad)]), "CorruptEntryError", key, "is damaged", "unitmem_LGU.npy")
    assert "delete it" in msg


@needs_ns
def test_cli_on_a_read_only_store(computed, tmp_path):
    root, key = computed
    ro = tmp_path / "ro"
    shutil.copytree(root, ro)
    ok = _cli(["--store", str(ro)], read_only=[ro])  # a stored result is served from a read-only store
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["store_key"] == key
    _one_line_error(_cli(["--store", str(ro), "--seed", "1"], read_only=[ro]), "ReadOnlyStoreError", "read-only")


@needs_ns
def test_cli_on_a_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = _cli(["--store", str(disk / "s")], tmpfs={disk: "64k"})
    msg = _one_line_error(r, "StoreFullError", "disk full", "Nothing stored was changed")
    assert "requested and" not in msg


@needs_ns
def test_reading_a_slot_it_cannot_write_creates_no_lock_file(tmp_path):
    """A writable store whose result slot is read-only (a copied-in folder): reading takes no lock it would
    have to create, and fails on nothing."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from iarmem_core.store import read_lock
        p = Path(sys.argv[1]) / ".lock"
        with read_lock(p):
            pass
        print("created" if p.exists() else "none")
        """
    )
    (tmp_path / "slot").mkdir()
    r = sandbox.run([sys.executable, "-c", script, str(tmp_path / "slot")], read_only=[tmp_path / "slot"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "none"
