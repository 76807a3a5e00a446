"""The `ray` backend: the blocks of a job run on actors of a Ray cluster; the driver merges them in order.

One actor per GPU (or per `gpus_per_worker` of a GPU, to pack small models) loads the model once
(`task.setup()`) and keeps it across the blocks it is given; each actor has up to two blocks in flight so it
never waits for the driver. Payloads come back to the driver, which merges them strictly in block order
(a block that arrives early waits in a bounded reorder buffer), reports progress and checkpoints the merged
state at block boundaries. The driver is the only writer of the result and of the checkpoints.

Worker loss (a killed actor, a dead node, Ray's memory monitor): the block goes back to the queue and runs
again on another actor (up to `max_block_retries` times); a replacement actor is started and joins once Ray
can place it. A block that raises an error of our code (bad data, out of memory) fails the job with that
error. Cancel: the job's cancel check between waits raises `Cancelled`; queued blocks are cancelled
(`ray.cancel`) and the actors killed (`ray.kill`), which stops the blocks they were running.

Connecting: `address` None reads $RAY_ADDRESS (set inside a Ray job and by `ray start`); with neither, a
private local Ray instance is started bound to 127.0.0.1 (a workstation with several GPUs). "auto" is a
cluster started on this node with `ray start`. Ray Client addresses (ray://) are refused: it is deprecated in
favour of the Jobs API, which `iarmem_core.backends.ray_jobs` uses (http://HEAD:8265). `ray.init()` runs in
one long-lived thread of the process (Ray ties its connection to the thread that made it: a Streamlit
script thread ends with every rerun). Usage statistics are off (RAY_USAGE_STATS_ENABLED=0) unless set.
Token authentication (RAY_AUTH_MODE=token, Ray's default for new clusters) needs the cluster's token in
$RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token) of every process that connects.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from iarmem_core.backends import worker_device
from iarmem_core.backends.base import (
    Backend,
    BackendError,
    BlockTask,
    Checkpointer,
    Merge,
    Progress,
    Save,
    block_ranges,
)
from iarmem_core.store import HOST

STALL_S = float(os.environ.get("IARMEM_RAY_STALL_S", "900"))  # no live worker for this long: fail the job
WAIT_S = 0.25  # the driver's wait between cancel checks

_CONNECT_MU = threading.Lock()
_CONNECTED: dict = {}  # what the connecting thread reported (address, local)


def _check_address(address: str | None) -> str | None:
    """The address to connect a driver to ($RAY_ADDRESS when None; None: start a local instance)."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            return None
    address = address.strip()
    if address.startswith("ray://"):
        raise BackendError(
            f"--ray-address {address}: Ray Client (ray://) is deprecated; give the Jobs API address "
            f"http://HEAD:8265 to submit the job to the cluster, or HEAD:6379 / auto when this process runs on a "
            f"node of the cluster"
        )
    if address.startswith(("http://", "https://")):
        raise BackendError(
            f"{address} is a Jobs API address: submit the job with it (the CLI does with --ray-address "
            f"{address}; see iarmem_core.backends.ray_jobs); a driver connects with HEAD:6379 or auto"
        )
    return address or None


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Connect this process to Ray once (from a long-lived thread); returns {"address", "local"}.

    `address` None: $RAY_ADDRESS, else start a private local instance on 127.0.0.1 (with `num_cpus` /
    `num_gpus` logical resources when given)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    addr = _check_address(address)
    with _CONNECT_MU:
        if ray.is_initialized():
            return dict(_CONNECTED) or {"address": addr, "local": False}
        box: queue.Queue = queue.Queue()

        def hold() -> None:
            try:
                if addr is None:
                    ray.init(
                        num_cpus=num_cpus,
                        num_gpus=num_gpus,
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        log_to_driver=True,
                        configure_logging=False,
                    )
                else:
                    ray.init(address=addr, log_to_driver=True, configure_logging=False)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.put(e)
                return
            box.put(None)
            threading.Event().wait()  # keep the connecting thread alive for the life of the process

        threading.Thread(target=hold, name="iarmem-ray-connection", daemon=True).start()
        err = box.get()
        if err is not None:
            where = addr or "a new local instance"
            raise BackendError(
                f"could not connect to Ray at {where}: {type(err).__name__}: {err}. Check the address (HEAD:6379, "
                f"or auto on a node of the cluster), that this Ray version matches the cluster's, and with token "
                f"authentication that RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) holds the cluster's token"
            ) from err
        _CONNECTED.update({"address": addr or "local", "local": addr is None})
        return dict(_CONNECTED)


class _BlockWorker:
    """The actor: keeps `task.setup()`'s state (the loaded model) and runs the blocks it is sent."""

    def __init__(self, task: BlockTask, threads: int, gpus: float = 0.0):
        if not gpus:  # Ray leaves CUDA_VISIBLE_DEVICES alone for a CPU actor: hide the node's GPUs from it
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.task, self.state = task, None

    def setup(self) -> dict:
        import ray

        t0 = time.perf_counter()
        self.state = self.task.setup()
        return {
            "pid": os.getpid(),
            "host": HOST,
            "node": ray.get_runtime_context().get_node_id(),
            "device": worker_device(),
            "setup_s": round(time.perf_counter() - t0, 3),
        }

    def run(self, start: int, stop: int):
        return self.task.run(self.state, start, stop)


_REMOTE_CLS = None


def _remote_worker():
    global _REMOTE_CLS
    if _REMOTE_CLS is None:
        import ray

        _REMOTE_CLS = ray.remote(_BlockWorker)
    return _REMOTE_CLS


@dataclass
class _Actor:
    handle: object
    ready: object  # the ObjectRef of setup(); None once set up
    info: dict = field(default_factory=dict)
    inflight: int = 0
    alive: bool = True


@dataclass
class RayBackend(Backend):
    """Blocks on the actors of a Ray cluster (see the module docstring).

    `workers` None: one per GPU of the cluster (per `gpus_per_worker`), or, without GPUs, one per CPU;
    `gpus_per_worker` None: 1 when the cluster has GPUs, else 0 (CPU actors); fractions pack several actors on
    one GPU. `num_cpus` / `num_gpus` size a local instance (no address); logical GPUs let tests place GPU
    actors on CPU machines (the actors then compute on the CPU). `wait_all`: start handing out blocks only once
    all first actors have loaded the model (a steady-state benchmark; by default the first one ready starts)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    max_block_retries: int = 3
    inflight_per_worker: int = 2
    num_cpus: int | None = None
    num_gpus: int | None = None
    wait_all: bool = False  # hand out blocks only once every first actor is set up (benchmarks, tests)

    name = "ray"

    def __post_init__(self) -> None:
        if self.address is not None:
            try:
                _check_address(self.address)
            except BackendError as e:
                raise ValueError(str(e)) from None  # a bad option: the CLI reports it as such
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"--ray-gpus-per-worker must be >= 0, got {self.gpus_per_worker}")

    def describe(self) -> str:
        addr = _CONNECTED.get("address") or self.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
        return f"Ray cluster at {addr}" if addr != "local" else "a local Ray instance (127.0.0.1)"

    def to_dict(self) -> dict:
        return {
            "backend": self.name,
            "address": self.address,
            "workers": self.workers,
            "gpus_per_worker": self.gpus_per_worker,
            "cpus_per_worker": self.cpus_per_worker,
        }

    def connect(self) -> dict:
        return connect(self.address, self.num_cpus, self.num_gpus)

    def plan(self) -> tuple[int, float]:
        """(workers, GPUs per worker) for the cluster as it is now."""
        import ray

        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 1))
        gpw = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        if gpw > 0 and gpus <= 0:
            raise BackendError(f"gpus_per_worker={gpw} but the Ray cluster has no GPUs; use 0 (CPU actors)")
        if self.workers is not None:
            n = int(self.workers)
        elif gpw > 0:
            n = int(gpus // gpw)
        else:
            n = int(cpus // max(self.cpus_per_worker, 1e-9))
        if n < 1:
            raise BackendError(
                f"no room for a worker on the Ray cluster ({res}); lower gpus_per_worker/cpus_per_worker"
            )
        return n, gpw

    def map_blocks(
        self,
        ctx,
        task: BlockTask,
        n: int,
        block: int,
        *,
        start: int = 0,
        merge: Merge,
        save: Save | None = None,
        progress: Progress | None = None,
        batch_size: int | None = None,
        events: list | None = None,
        what: str = "block",
    ) -> dict:
        """Run the blocks of [start, n) on the cluster and merge their payloads here, in block order."""
        import ray
        from ray import exceptions as rex

        lost_errors = (
            rex.RayActorError,
            rex.ActorUnavailableError,
            rex.WorkerCrashedError,
            rex.NodeDiedError,
            rex.ObjectLostError,
            rex.OwnerDiedError,
            rex.OutOfMemoryError,
            rex.LocalRayletDiedError,
        )
        self.connect()
        blocks = block_ranges(n, block, start)
        report = {"backend": self.name, "where": self.describe(), "block": int(block), "workers": 0}
        if not blocks:
            return report
        n_workers, gpw = self.plan()
        n_workers = min(n_workers, len(blocks))
        opts = {"num_gpus": gpw, "num_cpus": self.cpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
        cls = _remote_worker()
        task_ref = ray.put(task)
        threads = max(1, int(self.cpus_per_worker))

        def new_actor() -> _Actor:
            h = cls.options(**opts).remote(task_ref, threads, gpw)
            return _Actor(h, h.setup.remote())

        actors = [new_actor() for _ in range(n_workers)]
        todo: deque[tuple[int, int]] = deque(blocks)
        inflight: dict = {}  # ObjectRef -> (actor, block)
        arrived: dict[int, object] = {}  # block start -> payload, waiting for its turn
        retries: dict[int, int] = {}
        lost, replaced, devices = [], 0, []
        next_start = blocks[0][0]
        window = max(4, 2 * n_workers * self.inflight_per_worker)  # blocks ahead of the merge point
        ckpt = Checkpointer(ctx, n, save)
        last_alive = time.monotonic()
        t_first = None
        if ctx is not None:
            ctx.progress(next_start / max(n, 1), f"{what}s on {n_workers} Ray worker(s): starting them")

        def lose(actor: _Actor, err: BaseException) -> None:
            nonlocal replaced
            if actor.alive:
                actor.alive = False
                lost.append({"worker": actor.info or "not set up", "error": f"{type(err).__name__}: {str(err)[:300]}"})
                try:
                    ray.kill(actor.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                if replaced < n_workers * self.max_block_retries:
                    replaced += 1
                    actors.append(new_actor())

        try:
            while next_start < n:
                if ctx is not None:
                    ctx.check()
                # hand out blocks: up to inflight_per_worker per set-up actor, never far ahead of the merge point
                warming = self.wait_all and any(a.alive and a.ready is not None for a in actors[:n_workers])
                if t_first is None and not warming and any(a.alive and a.ready is None for a in actors):
                    t_first = time.perf_counter()  # blocks start: the workers' setup is over
                gave = not warming
                while gave:  # one block per actor per round, so the first blocks spread over every worker
                    gave = False
                    for a in actors:
                        if not (a.alive and a.ready is None and a.inflight < self.inflight_per_worker and todo):
                            continue
                        if todo[0][0] - next_start >= window * block:
                            break
                        b = todo.popleft()
                        inflight[a.handle.run.remote(*b)] = (a, b)
                        a.inflight += 1
                        a.info["blocks_sent"] = a.info.get("blocks_sent", 0) + 1
                        gave = True
                if not any(a.alive for a in actors):
                    raise BackendError(
                        f"every Ray worker was lost and {replaced} replacements too (last: {lost[-3:]}); check the "
                        f"cluster (`ray status`) and the workers' logs, then start the job again to resume"
                    )
                if any(a.alive and a.ready is None for a in actors):
                    last_alive = time.monotonic()
                elif time.monotonic() - last_alive > STALL_S:
                    raise BackendError(
                        f"no Ray worker could be started for {STALL_S:.0f} s (lost: {lost[-3:]}); check the "
                        f"cluster's free GPUs/CPUs (`ray status`) and the workers' logs"
                    )
                setups = {a.ready: a for a in actors if a.alive and a.ready is not None}
                waiting = list(inflight) + list(setups)
                if not waiting:
                    time.sleep(WAIT_S)
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_S)
                for ref in ready:
                    setup_of = setups.get(ref)
                    if setup_of is not None:
                        try:
                            setup_of.info.update(ray.get(ref))
                            setup_of.ready = None
                            devices.append(setup_of.info)
                        except lost_errors as e:
                            lose(setup_of, e)
                        except rex.RayTaskError as e:
                            raise BackendError(
                                f"a Ray worker could not set up the {what}s: {e.cause!r}. Every node must see the "
                                f"same checkpoints and data paths (a shared filesystem) and run the same iarmem"
                            ) from e.as_instanceof_cause()
                        continue
                    a, b = inflight.pop(ref)
                    a.inflight -= 1
                    try:
                        arrived[b[0]] = ray.get(ref)
                    except lost_errors as e:
                        retries[b[0]] = retries.get(b[0], 0) + 1
                        if retries[b[0]] > self.max_block_retries:
                            raise BackendError(
                                f"{what} {b[0]}..{b[1] - 1} failed on {retries[b[0]]} workers (last: {e}); see the "
                                f"Ray logs of its nodes"
                            ) from e
                        if events is not None:
                            events.append({"at": int(b[0]), "retry": retries[b[0]], "error": type(e).__name__})
                        lose(a, e)
                        todo.appendleft(b)
                        continue
                    except rex.RayTaskError as e:
                        raise e.as_instanceof_cause() from None
                # merge what is next in order
                while next_start in arrived:
                    payload = arrived.pop(next_start)
                    stop = min(n, next_start + block)
                    merge(next_start, stop, payload)
                    next_start = stop
                    if ctx is not None and progress is not None:
                        ctx.progress(*progress(next_start))
                    ckpt.maybe(next_start)
        finally:
            for ref in list(inflight):
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - finished or gone
                    pass
            for a in actors:
                try:
                    ray.kill(a.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        report.update(
            {
                "workers": n_workers,
                "gpus_per_worker": gpw,
                "devices": sorted({d["device"] for d in devices}),
                "nodes": len({d["node"] for d in devices}),
                "lost_workers": lost,
                "worker_info": [a.info for a in actors if a.info],
                "retried_blocks": sorted(retries),
                "blocks_s": None if t_first is None else round(time.perf_counter() - t_first, 4),
            }
        )
        return report
