"""The ray backend on a private cluster: a head and 2 worker nodes (one logical GPU each) in a loopback-only
network namespace (tests/support/ray_cluster.py; one cluster for the module, ~1.5 min on 2 cores).

The scenarios run in one process inside the namespace (tests/support/ray_scenarios.py) and report JSON:
Ray-vs-local bit equality of UnitMem (mean and class rest) and of the candidate scoring with 2 workers; a
cancel that stops running blocks; a job submitted through the Ray Jobs API (token authentication on),
stopped mid-way, submitted again (resumes) and equal to a local run; a worker node killed mid-job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray backend's tests need requirements-ray.txt (ray[default])")

from tests.support.ray_cluster import run_in_namespace  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
SCENARIOS = Path(__file__).resolve().parent / "support" / "ray_scenarios.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_in_namespace(SCENARIOS, tmp_path_factory.mktemp("ray") / "report.json", timeout=840)


def _used_both_workers(ex: dict) -> None:
    assert ex["backend"] == "ray" and ex["workers"] == 2
    assert ex["nodes"] == 2, ex  # one actor per worker node (each has one GPU)
    assert all(w["blocks_sent"] >= 1 for w in ex["worker_info"]), ex["worker_info"]


@pytest.mark.parametrize("name", ["unitmem", "unitmem_class"])
def test_unitmem_on_two_ray_workers_is_bit_identical_to_local(report, name):
    r = report[name]
    assert r["differing_arrays"] == []
    assert r["sha_ray"] == r["sha_local"]
    assert r["key_ray"] == r["key_local"]  # the store key does not depend on the backend
    _used_both_workers(r["execution"])
    assert r["execution"]["lost_workers"] == [] and r["execution"]["retried_blocks"] == []


def test_candidate_scores_on_two_ray_workers_are_bit_identical_to_local(report):
    r = report["scores"]
    assert r["equal"] and r["shape"] == [70, 15]
    assert r["key_ray"] == r["key_local"]
    assert r["execution"]["block"] == 32
    _used_both_workers(r["execution"])


def test_cancel_stops_the_running_blocks(report):
    r = report["cancel"]
    assert len(r["started_blocks"]) == 2  # two blocks (of 30 s each) were running on the two actors
    assert r["error"] == "Cancelled" and r["state"] == "cancelled" and not r["thread_alive"]
    assert r["stop_s"] < 10  # far less than a block
    assert r["done_marks"] == [] and r["merged"] == []  # no running block finished
    assert r["workers_alive_after"] == []  # the actors running them were killed


def test_jobs_api_stop_then_resume_equals_local(report):
    r = report["jobs_api"]
    assert r["record"]  # the submission is recorded beside the job's status
    assert r["checkpointed_before_stop"] and 0 < r["progress_at_stop"] < 1
    assert r["state_after_stop"] == "cancelled", r
    assert r["ray_state_after_stop"] in ("STOPPED", "FAILED")
    assert r["log_status_after_stop"]["state"] == "cancelled"  # the structured log line says so too
    assert r["ray_state"] == "SUCCEEDED", r["log_tail"]
    assert r["status"]["resumed"] is True and r["status"]["backend"] == "ray"
    assert r["status"]["where"].startswith("Ray cluster at 127.0.0.1:")
    assert r["stored"] and r["key_ray"] == r["key"]
    assert r["sha_ray"] == r["sha_local"]
    # `unitmem ... --backend ray --ray-address http://HEAD:8265` submits, follows and prints the driver's JSON
    assert r["cli_submit"] == {"rc": 0, "sha": r["sha_local"], "key": r["key"]}


def test_killed_worker_node_mid_job_gives_the_identical_result(report):
    r = report["kill"]
    assert r["killed_at"] is not None and r["killed_at"] < 0.5
    ex = r["execution"]
    assert len(ex["lost_workers"]) >= 1 and "node" in ex["lost_workers"][0]["error"]
    assert ex["retried_blocks"], ex  # the blocks it held ran again elsewhere
    assert r["sha_ray"] == r["sha_local"]


def test_cluster_ran_in_a_loopback_only_namespace(report):
    if not report["namespace"]:
        pytest.skip("unshare -n is not allowed here: the cluster ran bound to 127.0.0.1 only (see README)")
    assert report["pid_namespace"]  # the kernel ends every Ray process with the namespace
