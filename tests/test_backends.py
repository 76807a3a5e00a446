"""Backends without Ray: the merge properties of UnitMem's blocks, the local backend's block loop (order, OOM,
resume), fixed scoring blocks, the CLI options and the run-job spec, the Jobs API helpers' parsing, and the
app's view of a job submitted to Ray. (The ray backend itself: tests/test_ray.py.)"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from iarmem_core import backends, data, jobs, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.backends import ray_jobs
from iarmem_core.cli import build_parser, run_job
from iarmem_core.cli import common as cli_common
from iarmem_core.cli import main as cli_main
from iarmem_core.extraction import memorization_scores
from iarmem_core.extraction.scores import SCORE_BLOCK
from iarmem_core.store import ResultStore, arrays_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def var():
    return load_adapter("test-var", seed=3)


def test_the_local_default_never_imports_ray():
    code = (
        "import sys\n"
        "from iarmem_core import backends, unitmem, extraction, jobs\n"
        "from iarmem_core.cli import build_parser\n"
        "build_parser()\n"
        "class T:\n"
        "    def setup(self): return 10\n"
        "    def run(self, s, i, j): return s * i\n"
        "got = []\n"
        "backends.map_blocks(None, T(), 7, 3, merge=lambda i, j, v: got.append((i, j, v)))\n"
        "assert got == [(0, 3, 0), (3, 6, 30), (6, 7, 60)], got\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_block_ranges_are_aligned_and_cover_the_rest():
    assert backends.block_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert backends.block_ranges(10, 4, start=5) == [(4, 8), (8, 10)]  # a mid-block start redoes its block
    assert backends.block_ranges(8, 4, start=8) == []
    assert backends.get_backend("local") is backends.LOCAL
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get_backend("dask")


# ---- UnitMem's merges: max / argmax (lowest index on ties) / tie counts / float64 sums / top-K / class sums -----
def _synthetic_pass(var, mu_NLGU: np.ndarray, cfg: unitmem.UnitMemConfig) -> unitmem.UnitMemPass:
    """A pass whose per-image statistics are the given mu (images are passed as their indices)."""
    p = unitmem.UnitMemPass(var, mu_NLGU.shape[0], cfg)
    G, T = len(p.plan.groups), var.n_tokens

    def fake_mu(images, labels, keys):
        idx = images.reshape(-1).long().numpy()
        mu_LBGU = torch.from_numpy(np.ascontiguousarray(mu_NLGU[idx].transpose(1, 0, 2, 3)))
        return mu_LBGU, torch.zeros((len(idx), T), dtype=torch.uint8), torch.zeros((len(idx), G), dtype=torch.long)

    p._mu = fake_mu
    return p


def _stats(p, idx: np.ndarray, labels: np.ndarray, start: int):
    x = torch.as_tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1)
    return p.block_stats(x, torch.as_tensor(labels[idx]), [str(i) for i in idx], start)


@pytest.mark.parametrize("rest", ["mean", "class"])
def test_block_merges_equal_the_whole_set_reduction(var, rest):
    rng = np.random.default_rng(0)
    cfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none", block_images=3, top_images=4, rest=rest)
    probe = unitmem.UnitMemPass(var, 11, cfg)
    L, G, U = len(probe.blocks), len(probe.plan.groups), probe.n_units
    n = 11  # 4 blocks of 3, the last one short
    # few distinct values: many exact ties, within and across blocks
    mu = rng.integers(0, 4, size=(n, L, G, U)).astype(np.float32) * np.float32(0.37)
    labels = rng.integers(0, var.num_classes, size=n)
    p = _synthetic_pass(var, mu, cfg)
    p.set_labels(labels)
    blocks = backends.block_ranges(n, 3)
    stats = {s: _stats(p, np.arange(s, e), labels, s) for s, e in reversed(blocks)}  # computed out of order
    with pytest.raises(ValueError, match="in order"):
        p.merge(stats[3])
    for s, _ in blocks:
        p.merge(stats[s])
    out = p.finish()
    st = p.state
    ref_max = mu.max(0)
    np.testing.assert_array_equal(out["mu_max_LGU"], ref_max)
    np.testing.assert_array_equal(out["argmax_LGU"], mu.argmax(0))  # numpy: the first (lowest) index on ties
    np.testing.assert_array_equal(out["argmax_ties_LGU"], (mu == ref_max).sum(0))
    ref_sum = np.zeros((L, G, U), np.float64)
    for i in range(n):  # image after image, in index order
        ref_sum += mu[i].astype(np.float64)
    np.testing.assert_array_equal(st.sum_LGU.numpy(), ref_sum)
    # top-K of the scale groups by (value descending, index ascending)
    sids = p.plan.scale_group_ids
    v = mu[:, :, sids, :]  # [N, L, S, U]
    order = np.lexsort((np.broadcast_to(np.arange(n)[:, None, None, None], v.shape), -v), axis=0)[:4]
    np.testing.assert_array_equal(out["top_images_LKSU"], order.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(out["top_mu_LKSU"], np.take_along_axis(v, order, 0).transpose(1, 0, 2, 3))
    if rest == "class":
        for c in np.unique(labels):
            ref_c = np.zeros((L, G, U), np.float64)
            for i in np.flatnonzero(labels == c):
                ref_c += mu[i].astype(np.float64)
            np.testing.assert_array_equal(st.class_sum_CLGU[c].numpy(), ref_c)
        np.testing.assert_array_equal(st.class_count_C.numpy(), np.bincount(labels, minlength=var.num_classes))
    else:
        want_rest = ((ref_sum - ref_max.astype(np.float64)) / (n - 1)).astype(np.float32)
        np.testing.assert_array_equal(out["mu_rest_LGU"], want_rest)


def test_merging_in_order_any_grouping_of_blocks_is_bit_identical(var):
    """The same blocks fed as whole-set steps, as one block per step, and as blocks from a fresh worker pass."""
    rng = np.random.default_rng(1)
    cfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none", block_images=4, top_images=3)
    probe = unitmem.UnitMemPass(var, 10, cfg)
    shape = (10, len(probe.blocks), len(probe.plan.groups), probe.n_units)
    mu = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, var.num_classes, size=10)
    a = _synthetic_pass(var, mu, cfg)
    a.step(
        torch.arange(10, dtype=torch.float32).view(-1, 1, 1, 1), torch.as_tensor(labels), [str(i) for i in range(10)]
    )
    want = a.finish()
    b = _synthetic_pass(var, mu, cfg)
    worker = _synthetic_pass(var, mu, cfg)  # another pass computes the blocks (as a Ray actor would)
    for s, e in backends.block_ranges(10, 4):
        b.merge(_stats(worker, np.arange(s, e), labels, s))
    got = b.finish()
    assert arrays_sha256(got) == arrays_sha256(want)


# ---- the local backend's block loop ------------------------------------------------------------------------------
class _Squares:
    """A block task: the squares of the block's items; optionally out of memory for calls of several blocks."""

    def __init__(self, oom_above: int | None = None, log: list | None = None):
        self.oom_above, self.log = oom_above, log if log is not None else []

    def setup(self):
        return "state"

    def run(self, state, start, stop):
        assert state == "state"
        self.log.append(start)
        return np.arange(start, stop) ** 2


def test_local_backend_retries_oom_with_fewer_blocks_and_merges_each_once(monkeypatch):
    task = _Squares()
    calls = {"n": 0}
    real = jobs.run_batches

    def oom_once(ctx, n, bs, work, **kw):
        def work2(i, j):
            calls["n"] += 1
            if j - i > 1 and calls["n"] == 1:
                task.run("state", i * 3, i * 3 + 3)  # computed, then lost to the OOM: never merged
                raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
            work(i, j)

        return real(ctx, n, bs, work2, **kw)

    monkeypatch.setattr(jobs, "run_batches", oom_once)
    merged, events = [], []
    rep = backends.LOCAL.map_blocks(
        None, task, 10, 3, merge=lambda i, j, v: merged.append((i, j, v.tolist())), batch_size=9, events=events
    )
    assert [m[:2] for m in merged] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert merged[-1][2] == [81]
    assert events and events[0]["at"] == 0 and events[0]["from"] == 9 and events[0]["to"] == 3  # in items
    assert rep["backend"] == "local" and rep["block"] == 3


def test_local_backend_one_block_out_of_memory_names_the_block(monkeypatch):
    class Boom(_Squares):
        def run(self, state, start, stop):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(jobs.OutOfMemory, match="one UnitMem block of 4 items"):
        backends.LOCAL.map_blocks(None, Boom(), 8, 4, merge=lambda *a: None, what="UnitMem block")


def test_resume_skips_the_merged_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(jobs, "CANCEL_POLL_S", 0.0)  # the cancel file is seen at the next check
    store = ResultStore(tmp_path)
    n, block = 20, 4

    def make(log: list, cancel_after: int | None):
        def fn(ctx):
            acc = np.zeros(n, np.int64)
            start = 0
            if ctx.resume_state is not None:
                acc[:] = ctx.resume_state[0]["acc"]
                start = int(ctx.resume_state[1]["done"])
            merged = []

            def merge(i, j, v):
                acc[i:j] = v
                merged.append(i)
                if cancel_after is not None and len(merged) == cancel_after:
                    jobs.cancel_job(ctx.key, store)

            backends.map_blocks(
                ctx, _Squares(log=log), n, block, start=start, merge=merge, save=lambda j: ({"acc": acc}, {"done": j})
            )
            return {"acc": acc}, {}

        return fn

    first: list = []
    with pytest.raises(jobs.Cancelled):
        jobs.run_job("blocks", {"n": n}, make(first, cancel_after=2), store=store)
    key = store.key("blocks", {"n": n})
    done = int(store.load_partial(key)[1]["done"])
    assert done % block == 0 and 0 < done < n
    second: list = []
    arrays, _ = jobs.run_job("blocks", {"n": n}, make(second, cancel_after=None), store=store)
    assert second == list(range(done, n, block))  # only the blocks not merged before
    np.testing.assert_array_equal(arrays["acc"], np.arange(n) ** 2)


def test_scores_use_fixed_blocks_whatever_the_batch_size(var, tmp_path):
    ds = data.select_demo(n=40, seed=5)  # a block of 32 and one of 8
    a, ma = memorization_scores(var, ds, store=ResultStore(tmp_path / "a"), batch_size=7)
    b, mb = memorization_scores(var, ds, store=ResultStore(tmp_path / "b"), batch_size=64)
    np.testing.assert_array_equal(a, b)
    assert ma["store_key"] == mb["store_key"]
    meta = ResultStore(tmp_path / "a").load(ma["store_key"])[1]
    assert meta["reduction"]["block_images"] == SCORE_BLOCK == 32
    assert meta["execution"]["backend"] == "local"


def test_unitmem_job_records_where_it_ran(var, tmp_path):
    ds = data.select_demo(n=30, seed=1)
    cfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none", block_images=8)
    res = unitmem.run_unitmem(var, ds, cfg, store=ResultStore(tmp_path))
    assert res.meta["execution"]["backend"] == "local" and res.meta["execution"]["block"] == 8
    st = jobs.job_status(res.meta["store_key"], ResultStore(tmp_path))
    assert st["backend"] == "local" and st["where"].startswith("this process (pid ")


def test_tasks_pickle_without_the_live_model(var):
    import pickle

    ds = data.select_demo(n=30, seed=1)
    t = unitmem.UnitMemBlocks(var, ds, unitmem.UnitMemConfig(), local_pass=object())
    back = pickle.loads(pickle.dumps(t))
    assert back._adapter is None and back._pass is None
    assert back.load_args == var.load_args and back.identity == var.identity
    var2 = load_adapter("test-var", seed=3)
    del var2.load_args
    with pytest.raises(ValueError, match="load_adapter"):
        pickle.dumps(unitmem.UnitMemBlocks(var2, ds, unitmem.UnitMemConfig()))


# ---- the CLI and the run-job spec ------------------------------------------------------------------------------
def test_backend_options_and_the_command_line_they_leave():
    argv = ["unitmem", "--model", "test-var", "--n", "30", "--augs", "2", "--json", "--detail", "none"]
    a = build_parser().parse_args(argv + ["--backend", "ray", "--ray-address", "http://h:8265", "--ray-workers", "2"])
    assert cli_common.jobs_api_address(a) == "http://h:8265"
    back = cli_common.argv_of(a, drop=cli_common.BACKEND_DESTS)
    assert vars(build_parser().parse_args(back)) == {
        **vars(a),
        "backend": "local",
        "ray_address": None,
        "ray_workers": None,
    }
    assert cli_common.jobs_api_address(build_parser().parse_args(argv)) is None
    b = build_parser().parse_args(argv + ["--backend", "ray", "--ray-address", "127.0.0.1:6379"])
    assert cli_common.jobs_api_address(b) is None and cli_common.get_backend(b).address == "127.0.0.1:6379"


def test_ray_client_addresses_are_refused_with_the_fix(capsys):
    rc = cli_main(["unitmem", "--model", "test-var", "--n", "30", "--backend", "ray", "--ray-address", "ray://h:10001"])
    assert rc == 2
    assert "Ray Client (ray://) is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("not json at all", "neither a JSON object nor a file"),
        ("{oops", "not valid JSON"),
        ('{"argv": "unitmem"}', 'needs "argv"'),
        ('{"argv": ["models"]}', "no blocks to distribute"),
    ],
)
def test_run_job_refuses_a_bad_spec(spec, msg, capsys):
    assert cli_main(["run-job", spec]) == 2
    assert msg in capsys.readouterr().err


def test_entrypoint_round_trips_through_the_shell(tmp_path):
    argv = ["unitmem", "--model", "test-var", "--store", str(tmp_path / "a b's store"), "--json"]
    entry = ray_jobs.entrypoint(argv, key="unitmem-0123456789abcdef01234567", backend={"workers": 2})
    parts = shlex.split(entry)
    assert parts[:4] == [ray_jobs.PYTHON, "-m", "iarmem_core", "run-job"]
    spec = run_job.read_spec(parts[4])
    assert spec["argv"] == argv and spec["key"] == "unitmem-0123456789abcdef01234567"
    assert run_job.driver_argv(spec) == argv + ["--backend", "ray", "--ray-workers", "2"]
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    assert run_job.read_spec(str(f)) == spec


def test_structured_log_lines_parse_back():
    text = "\n".join(
        [
            "starting",
            ray_jobs.status_line(progress=0.25, message="8/32 images"),
            "[unitmem]  25% noise",
            '{"store_key": "unitmem-x", "n_images": 32}',
            ray_jobs.status_line(state="done", progress=1.0),
            "(raylet) something",
        ]
    )
    assert ray_jobs.last_status(text) == {"state": "done", "progress": 1.0}
    assert ray_jobs.last_json(text) == {"store_key": "unitmem-x", "n_images": 32}
    assert ray_jobs.last_status("nothing here") is None
    assert ray_jobs.is_jobs_address("http://h:8265") and not ray_jobs.is_jobs_address("h:6379")


# ---- the app's view of a job submitted to Ray --------------------------------------------------------------------
def test_app_status_of_a_submitted_job_comes_from_ray_until_the_store_shows_it(tmp_path, monkeypatch):
    from iarmem_app import results
    from iarmem_core.store import atomic_write_json

    store = ResultStore(tmp_path)
    monkeypatch.setattr(results, "user_store", lambda: store)
    key = store.key("unitmem", {"x": 1})
    assert results.status(key)["state"] == "none"
    atomic_write_json(
        ray_jobs.record_path(store, key),
        {"address": "http://head:8265", "submission_id": "iarmem-x", "submitted": 1e12, "argv": ["unitmem"]},
    )
    seen = {"state": "PENDING", "logs": ""}
    monkeypatch.setattr(ray_jobs, "state", lambda addr, sid: seen["state"])
    monkeypatch.setattr(ray_jobs, "logs", lambda addr, sid: seen["logs"])
    st = results.status(key)
    assert st["state"] == "queued" and "iarmem-x" in st["where"]
    results._RAY_STATE.clear()
    seen.update(state="RUNNING", logs=ray_jobs.status_line(progress=0.5, message="16/32 images"))
    st = results.status(key)
    assert st["state"] == "running" and st["progress"] == 0.5 and "16/32" in st["message"]
    results._RAY_STATE.clear()
    seen.update(state="FAILED", logs=ray_jobs.status_line(state="failed", error="ValueError: bad data"))
    st = results.status(key)
    assert st["state"] == "failed" and st["error"] == "ValueError: bad data"
