"""Result store: keys, round trips, atomicity under crashes (simulated and SIGKILL), corruption handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iarmem_core import store as store_mod
from iarmem_core.store import CorruptEntryError, ResultNotFound, ResultStore

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"model": {"name": "demo-var", "ckpt": "ab12"}, "data": {"source": "demo", "n": 500}, "augs": 10}


@pytest.fixture
def st(tmp_path):
    return ResultStore(tmp_path / "store")


def _arrays(v: float = 1.0):
    return {
        "unitmem_GU": np.full((3, 4), v, np.float32),
        "argmax_GU": np.arange(12, dtype=np.int64).reshape(3, 4),
        "ids": np.array(["train/0001", "heldout/0002"]),
        "flags": np.array([True, False]),
    }


def test_key_depends_on_everything_that_determines_a_result(st, monkeypatch):
    k = st.key("unitmem", SPEC)
    assert k.startswith("unitmem-") and k == st.key("unitmem", json.loads(json.dumps(SPEC)))
    reordered = {
        "augs": 10,
        "data": {"n": 500, "source": "demo"},
        "model": {"ckpt": "ab12", "name": "demo-var"},
    }
    assert st.key("unitmem", reordered) == k  # dict order does not matter
    assert st.key("unitmem", {**SPEC, "augs": 11}) != k
    assert st.key("unitmem", {**SPEC, "data": {"source": "demo", "n": 501}}) != k
    assert st.key("extract", SPEC) != k
    assert st.key("unitmem", SPEC, version="2") != k  # per-kind algorithm version
    monkeypatch.setattr(store_mod, "__version__", "99.0")  # other code never reuses this result
    assert st.key("unitmem", SPEC) != k
    assert st.key("unitmem", {"t": (1, 2), "p": Path("/x"), "n": np.int64(3)}) == st.key(
        "unitmem", {"t": [1, 2], "p": "/x", "n": 3}
    )
    with pytest.raises(TypeError, match=r"spec\['dev'\].*not JSON-able"):
        st.key("unitmem", {"dev": object()})
    with pytest.raises(ValueError, match="not a finite number"):
        st.key("unitmem", {"x": float("nan")})
    with pytest.raises(ValueError, match="kind"):
        st.key("Bad Kind", SPEC)


def test_save_load_round_trip_and_manifest(st):
    k = st.key("unitmem", SPEC)
    assert not st.exists(k)
    with pytest.raises(ResultNotFound, match=k):
        st.load(k)
    st.save(k, _arrays(), {"n_images": 500, "note": "x"}, kind="unitmem", spec=SPEC)
    arrays, meta = st.load(k)
    for name, a in _arrays().items():
        assert arrays[name].dtype == a.dtype and np.array_equal(arrays[name], a)
    assert meta == {"n_images": 500, "note": "x"}
    mm, _ = st.load(k, mmap=True)
    assert isinstance(mm["unitmem_GU"], np.memmap) and np.array_equal(mm["unitmem_GU"], _arrays()["unitmem_GU"])
    (row,) = st.list()
    assert row["key"] == k and row["kind"] == "unitmem" and row["spec"] == SPEC
    assert row["arrays"]["unitmem_GU"] == {"shape": [3, 4], "dtype": "<f4", "bytes": 48}
    assert st.info(k)["code_version"] == store_mod.code_version()
    with pytest.raises(ValueError, match="does not match key"):
        st.save(k, _arrays(), {}, kind="unitmem", spec={**SPEC, "augs": 3})


def test_crash_before_publish_leaves_nothing_visible(st, monkeypatch):
    k = st.key("unitmem", SPEC)

    def killed(*a, **kw):
        raise KeyboardInterrupt("simulated kill between the temp write and the rename")

    monkeypatch.setattr(ResultStore, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        st.save(k, _arrays(), {})
    assert not st.exists(k) and st.list() == []
    with pytest.raises(ResultNotFound):
        st.load(k)
    monkeypatch.undo()
    # an overwrite that dies the same way keeps the old result whole
    st.save(k, _arrays(1.0), {"v": 1})
    monkeypatch.setattr(ResultStore, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        st.save(k, _arrays(2.0), {"v": 2})
    monkeypatch.undo()
    arrays, meta = st.load(k)
    assert meta == {"v": 1} and (arrays["unitmem_GU"] == 1.0).all()
    # the next write cleans the orphan version folder up
    st.save(k, _arrays(3.0), {"v": 3})
    assert len([p for p in st.result_dir(k).iterdir() if p.name.startswith("v-")]) == 1
    assert st.load(k)[1] == {"v": 3}


def test_crash_while_writing_arrays(st, monkeypatch):
    k = st.key("unitmem", SPEC)
    st.save(k, _arrays(1.0), {"v": 1})
    real = np.lib.format.write_array
    calls = []

    def dies_on_second(f, a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(f, a, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", dies_on_second)
    with pytest.raises(OSError, match="disk full"):
        st.save(k, _arrays(2.0), {"v": 2})
    monkeypatch.undo()
    assert st.load(k)[1] == {"v": 1}
    assert list((st.root / "tmp").iterdir()) == []


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from iarmem_core.store import ResultStore
    st = ResultStore(sys.argv[1])
    k = st.key("stress", {"x": 1})
    i = 0
    while True:
        i += 1
        a = np.full(300_000, i, np.int64)  # 2.4 MB per array: writes take long enough to be killed mid-way
        st.save(k, {"a": a, "b": a.copy()}, {"i": i})
        st.save_partial(k, {"s": a[:1000]}, {"i": i})
        print(i, flush=True)
    """
)


def test_sigkill_during_writes_never_leaves_a_torn_result(tmp_path):
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.6, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st = ResultStore(root)  # a new process view; also removes the dead writer's tmp folders
        k = st.key("stress", {"x": 1})
        arrays, meta = st.load(k, verify=True)
        assert (arrays["a"] == meta["i"]).all() and (arrays["b"] == meta["i"]).all()
        state, smeta = st.load_partial(k)
        assert (state["s"] == smeta["i"]).all()
        assert list((root / "tmp").iterdir()) == []


def test_corrupt_manifest_is_rebuilt_and_kept(st):
    keys = [st.key("unitmem", {**SPEC, "augs": i}) for i in range(3)]
    for i, k in enumerate(keys):
        st.save(k, _arrays(i), {"i": i}, kind="unitmem", spec={**SPEC, "augs": i})
    (st.root / "manifest.json").write_text('{"entries": {"trunc')
    rows = st.list()
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert {r["spec"]["augs"] for r in rows} == {0, 1, 2}
    kept = list(st.root.glob("manifest.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"entries": {"trunc'
    json.loads((st.root / "manifest.json").read_text())
    # a manifest that misses a live result (crash after publish) is brought up to date
    m = json.loads((st.root / "manifest.json").read_text())
    del m["entries"][keys[0]]
    (st.root / "manifest.json").write_text(json.dumps(m))
    assert len(st.list()) == 3


def test_corrupt_entry_is_reported_and_left_in_place(st):
    k = st.key("unitmem", SPEC)
    st.save(k, _arrays(), {"v": 1})
    vdir = st._live_version(st.result_dir(k), k, "result")
    f = vdir / "unitmem_GU.npy"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CorruptEntryError, match=r"damaged: unitmem_GU.npy does not match its sha256.*left in place"):
        st.load(k)
    with pytest.raises(CorruptEntryError, match="unreadable"):
        st.load(k, verify=False)
    assert f.exists() and st.exists(k) and [r["key"] for r in st.list()] == [k]
    (st.result_dir(k) / "CURRENT").write_text("v-gone\n")
    with pytest.raises(CorruptEntryError, match="not a version folder"):
        st.load(k)
    assert vdir.exists()
    assert st.delete(k) and not st.exists(k) and st.list() == []


def test_bad_input_never_loses_a_stored_result(st):
    k = st.key("unitmem", SPEC)
    st.save(k, _arrays(1.0), {"v": 1})
    with pytest.raises(TypeError, match="dtype object"):
        st.save(k, {"x": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="array name"):
        st.save(k, {"../evil": np.zeros(2)}, {})
    with pytest.raises(TypeError, match="not JSON-able"):
        st.save(k, _arrays(2.0), {"bad": object()})
    with pytest.raises(ValueError, match="not a store key"):
        st.load("../../etc")
    arrays, meta = st.load(k)
    assert meta == {"v": 1} and (arrays["unitmem_GU"] == 1.0).all()


def test_partial_state_round_trip(st):
    k = st.key("unitmem", SPEC)
    assert st.load_partial(k) is None and not st.has_partial(k)
    st.save_partial(k, {"sum_GU": np.ones((2, 2))}, {"next_image": 64})
    st.save_partial(k, {"sum_GU": np.full((2, 2), 2.0)}, {"next_image": 128})
    state, meta = st.load_partial(k)
    assert meta == {"next_image": 128} and (state["sum_GU"] == 2.0).all()
    assert len([p for p in st.partial_dir(k).iterdir() if p.name.startswith("v-")]) == 1
    assert not st.exists(k)  # partial state is not a result
    st.clear_partial(k)
    assert st.load_partial(k) is None


def test_readers_never_see_a_torn_result_while_it_is_overwritten(st):
    k = st.key("unitmem", SPEC)
    st.save(k, {"a": np.zeros(20_000), "b": np.zeros(20_000)}, {"i": 0})
    stop, errors, reads = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                arrays, meta = st.load(k)
                assert (arrays["a"] == meta["i"]).all() and (arrays["b"] == meta["i"]).all()
                reads.append(meta["i"])
            except Exception as e:  # collected, asserted below
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 16):
        st.save(k, {"a": np.full(20_000, i), "b": np.full(20_000, i)}, {"i": i})
    stop.set()
    t.join()
    assert errors == [] and len(reads) > 0
