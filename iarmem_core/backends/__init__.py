"""Where a job's work runs: `local` (this process; the default; never imports Ray) or `ray` (a Ray cluster).

A job that can be split hands its blocks to `map_blocks(ctx, task, n, block, ...)`, which runs them on the
backend the job was started with (`jobs.run_job(..., backend=...)`, read from `ctx.backend`; none: local).
See base.py for the contract (aligned blocks, computed whole, merged in block order: bit-identical results
whatever the backend or worker count), local.py and ray_backend.py for the two implementations, and
ray_jobs.py for submitting a whole job to a cluster through the Ray Jobs API.

Example:
    >>> b = get_backend("local")
    >>> b.name
    'local'
"""

from __future__ import annotations

import os

from iarmem_core.backends.base import Backend, BackendError, BlockTask, block_ranges
from iarmem_core.backends.local import LocalBackend

BACKENDS = ("local", "ray")
LOCAL = LocalBackend()


def get_backend(name: str | Backend | None = "local", **options) -> Backend:
    """A backend by name: "local" (options ignored) or "ray" (options: address, workers, gpus_per_worker,
    cpus_per_worker, num_cpus, num_gpus; see RayBackend). A Backend is returned as it is."""
    if isinstance(name, Backend):
        return name
    if name in (None, "", "local"):
        return LOCAL
    if name == "ray":
        from iarmem_core.backends.ray_backend import RayBackend

        return RayBackend(**{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")


def of(ctx) -> Backend:
    """The backend of a job context (local when the job was started without one, or outside a job)."""
    b = getattr(ctx, "backend", None) if ctx is not None else None
    return b if b is not None else LOCAL


def map_blocks(ctx, task: BlockTask, n: int, block: int, **kw) -> dict:
    """Run `task` over the aligned blocks of [kw['start'], n) on the job's backend (see base.Backend.map_blocks)."""
    return of(ctx).map_blocks(ctx, task, n, block, **kw)


def worker_device() -> str:
    """The device a task should load its model on in a worker: "cuda" when this process was given a GPU that
    torch sees, else "cpu"."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "BACKENDS",
    "LOCAL",
    "Backend",
    "BackendError",
    "BlockTask",
    "LocalBackend",
    "block_ranges",
    "get_backend",
    "map_blocks",
    "of",
    "worker_device",
]
