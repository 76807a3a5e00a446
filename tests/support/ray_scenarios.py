"""The Ray backend's scenarios on one private loopback cluster (a head + 2 worker nodes with a logical GPU each).

Run by tests/test_ray.py inside a loopback-only network namespace: `python tests/support/ray_scenarios.py OUT`.
Writes a JSON report to OUT; the tests assert on it:

- unitmem / unitmem_class: the same UnitMem pass locally and on 2 Ray workers (arrays_sha256, store keys);
- scores: the candidate scoring (memscore job) locally and on 2 Ray workers;
- cancel: a job of slow blocks cancelled through the cancel file while its blocks run;
- jobs_api: `run-job` submitted through the Ray Jobs API (token authentication on): stopped mid-way
  (cancel file + stop_job), submitted again (resumes from its checkpoint), result equal to a local run;
- kill: a worker node SIGKILLed mid-job; the job finishes with the identical result.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from iarmem_core import backends, data, jobs, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.backends import ray_jobs
from iarmem_core.backends.ray_backend import RayBackend
from iarmem_core.cli import main as cli_main
from iarmem_core.extraction import memorization_scores
from iarmem_core.store import ResultStore, arrays_sha256
from tests.support.ray_cluster import LoopbackCluster
from tests.support.ray_tasks import SlowBlocks

torch.set_num_threads(1)  # as the actors (one CPU each)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def unitmem_pair(ad, ds, cfg, tmp: Path, rb, name: str) -> dict:
    t = time.perf_counter()
    loc = unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(tmp / f"{name}-local"))
    t_loc = time.perf_counter() - t
    t = time.perf_counter()
    ray_ = unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(tmp / f"{name}-ray"), backend=rb)
    t_ray = time.perf_counter() - t
    diff = [k for k in loc.arrays if not np.array_equal(loc.arrays[k], ray_.arrays[k])]
    return {
        "sha_local": arrays_sha256(loc.arrays),
        "sha_ray": arrays_sha256(ray_.arrays),
        "differing_arrays": diff,
        "key_local": loc.meta["store_key"],
        "key_ray": ray_.meta["store_key"],
        "execution": ray_.meta["execution"],
        "seconds": {"local": round(t_loc, 2), "ray": round(t_ray, 2)},
    }


def scenario_cancel(tmp: Path, rb) -> dict:
    store, marks = ResultStore(tmp / "cancel"), tmp / "marks"
    marks.mkdir()
    n, block = 20, 2
    got: list = []

    def fn(ctx):
        rep = backends.map_blocks(
            ctx, SlowBlocks(marks, 30.0), n, block, merge=lambda i, j, v: got.append(i), what="slow block"
        )
        return {"x": np.zeros(1)}, {"execution": rep}

    key = store.key("raytest", {"cancel": 1})
    box: dict = {}

    def run() -> None:
        try:
            jobs.run_job("raytest", {"cancel": 1}, fn, store=store, backend=rb)
        except BaseException as e:  # noqa: BLE001
            box["error"] = type(e).__name__

    th = threading.Thread(target=run)
    th.start()
    end = time.monotonic() + 120
    while time.monotonic() < end and len(list(marks.glob("start-*"))) < 2:
        time.sleep(0.1)
    started = sorted(p.name for p in marks.glob("start-*"))
    t0 = time.monotonic()
    jobs.cancel_job(key, store)
    th.join(60)
    stop_s = time.monotonic() - t0
    pids = {int(p.split("-")[-1]) for p in started}
    t1 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t1 < 15:
        time.sleep(0.2)
    return {
        "started_blocks": started,
        "done_marks": sorted(p.name for p in marks.glob("done-*")),
        "merged": got,
        "stop_s": round(stop_s, 2),
        "error": box.get("error"),
        "state": jobs.job_status(key, store)["state"],
        "workers_alive_after": [p for p in pids if _alive(p)],
        "thread_alive": th.is_alive(),
    }


def _cli_json(argv: list[str]) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(argv)
    assert rc == 0, (rc, buf.getvalue())
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def scenario_jobs_api(tmp: Path, c: LoopbackCluster) -> dict:
    store = ResultStore(tmp / "jobs-store")
    base = ["unitmem", "--model", "test-var", "--seed", "3", "--n", "240", "--augs", "1", "--augmentation", "none"]
    base += ["--block-images", "2", "--top-images", "3", "--json"]
    ref = _cli_json(base + ["--store", str(tmp / "jobs-local")])
    key = ref["store_key"]
    argv = base + ["--store", str(store.root)]
    out: dict = {"key": key, "sha_local": ref["arrays_sha256"]}
    fast_ckpt = {"env_vars": {"IARMEM_CHECKPOINT_EVERY_S": "0.3"}}
    sid = ray_jobs.submit(c.dashboard, argv, key=key, store=store, backend={"workers": 1}, runtime_env=fast_ckpt)
    out["record"] = ray_jobs.submission_of(store, key) is not None
    # stop it once it has checkpointed (the driver saves at most every jobs.CHECKPOINT_EVERY_S)
    end = time.monotonic() + 180
    while time.monotonic() < end and not store.has_partial(key):
        if ray_jobs.state(c.dashboard, sid) in ray_jobs.TERMINAL:
            break
        time.sleep(0.3)
    out["checkpointed_before_stop"] = store.has_partial(key)
    out["progress_at_stop"] = jobs.job_status(key, store).get("progress")
    out["where"] = jobs.job_status(key, store).get("where")
    t0 = time.monotonic()
    jobs.cancel_job(key, store)
    ray_jobs.stop(c.dashboard, sid)
    while time.monotonic() - t0 < 60 and ray_jobs.state(c.dashboard, sid) not in ray_jobs.TERMINAL:
        time.sleep(0.3)
    out["stop_s"] = round(time.monotonic() - t0, 2)
    st = jobs.job_status(key, store)
    out["state_after_stop"], out["ray_state_after_stop"] = st["state"], ray_jobs.state(c.dashboard, sid)
    out["log_status_after_stop"] = ray_jobs.last_status(ray_jobs.logs(c.dashboard, sid))
    # submit again: it resumes from the checkpoint and finishes
    sid2 = ray_jobs.submit(c.dashboard, argv, key=key, store=store, backend={"workers": 1})
    state, text = ray_jobs.follow(c.dashboard, sid2, poll_s=0.5, timeout=240)
    out["ray_state"] = state
    out["status"] = {k: jobs.job_status(key, store).get(k) for k in ("state", "resumed", "backend", "where")}
    printed = ray_jobs.last_json(text) or {}
    out["sha_ray"] = printed.get("arrays_sha256")
    out["key_ray"] = printed.get("store_key")
    out["stored"] = store.exists(key)
    out["log_tail"] = text[-1500:] if state != "SUCCEEDED" else ""
    if store.exists(key):
        out["execution"] = store.load(key)[1].get("execution")
    # the CLI's own submission (--ray-address http://...): the driver finds the stored result, the CLI prints it
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(argv + ["--backend", "ray", "--ray-address", c.dashboard])
    printed = ray_jobs.last_json(buf.getvalue()) or {}
    out["cli_submit"] = {"rc": rc, "sha": printed.get("arrays_sha256"), "key": printed.get("store_key")}
    return out


def scenario_kill(ad, ds, cfg, tmp: Path, c: LoopbackCluster, rb) -> dict:
    loc = unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(tmp / "kill-local"))
    killed: dict = {}

    def on_progress(frac: float, msg: str) -> None:
        if frac > 0 and not killed:
            killed["at"] = frac
            c.kill_node(1)

    t = time.perf_counter()
    res = unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(tmp / "kill-ray"), backend=rb, on_progress=on_progress)
    return {
        "killed_at": killed.get("at"),
        "sha_local": arrays_sha256(loc.arrays),
        "sha_ray": arrays_sha256(res.arrays),
        "execution": res.meta["execution"],
        "seconds": round(time.perf_counter() - t, 2),
    }


def main(out_path: str) -> None:
    report: dict = {"pid_namespace": os.getpid() < 10}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="iarmem-ray-scenarios-"))
    with LoopbackCluster(n_workers=2, cpus=1, gpus=1) as c:
        report["start_s"] = round(time.perf_counter() - t0, 2)
        os.environ["RAY_ADDRESS"] = c.address
        rb = RayBackend(workers=2, gpus_per_worker=1, wait_all=True)
        ad = load_adapter("test-var", seed=3)
        ds = data.select_demo(n=30, seed=1)  # 8 blocks of 4, the last one short
        cfg = unitmem.UnitMemConfig(n_augs=2, augmentation="shift", block_images=4, top_images=3)
        report["unitmem"] = unitmem_pair(ad, ds, cfg, tmp, rb, "um")
        ccfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none", block_images=4, top_images=2, rest="class")
        report["unitmem_class"] = unitmem_pair(ad, ds, ccfg, tmp, rb, "umc")
        sds = data.select_demo(n=70, seed=2)  # 3 blocks of 32, the last one short
        acc_l, _ = memorization_scores(ad, sds, store=ResultStore(tmp / "sc-local"), batch_size=16)
        acc_r, m_r = memorization_scores(ad, sds, store=ResultStore(tmp / "sc-ray"), batch_size=16, backend=rb)
        report["scores"] = {
            "equal": bool(np.array_equal(acc_l, acc_r)),
            "shape": list(acc_l.shape),
            "key_local": ResultStore(tmp / "sc-local").list(kind="memscore")[0]["key"],
            "key_ray": m_r["store_key"],
            "execution": ResultStore(tmp / "sc-ray").load(m_r["store_key"])[1]["execution"],
        }
        report["t_after_equality_s"] = round(time.perf_counter() - t0, 2)
        report["cancel"] = scenario_cancel(tmp, rb)
        report["t_after_cancel_s"] = round(time.perf_counter() - t0, 2)
        report["jobs_api"] = scenario_jobs_api(tmp, c)
        report["t_after_jobs_api_s"] = round(time.perf_counter() - t0, 2)
        kds = data.select_demo(n=40, seed=4)
        kcfg = unitmem.UnitMemConfig(n_augs=2, augmentation="shift", block_images=2, top_images=3)
        report["kill"] = scenario_kill(ad, kds, kcfg, tmp, c, rb)
    report["total_s"] = round(time.perf_counter() - t0, 2)
    Path(out_path).write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
