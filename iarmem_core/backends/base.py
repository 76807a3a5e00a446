"""The backend interface: where the blocks of a job run, and the one rule they follow (merge in block order).

A job that is split over workers is a `BlockTask` over n items (images of the selection) cut into aligned
blocks of `block` consecutive items: block k is items [k * block, min(n, (k + 1) * block)). A worker calls
`task.setup()` once (load the model and open the data: the state it keeps across blocks) and then
`task.run(state, start, stop)` for each block it is given; the payload comes back to the driver, which
`merge(start, stop, payload)`s the payloads strictly in block order. Because a block is always computed
whole, on its own, and merged in a fixed order, the result is bit-identical whatever backend, worker count,
batch size or resume point produced it (same device type, no out-of-memory fallback below a block).

The backend is an Infra part: it knows nothing of UnitMem or scoring, it only runs the task objects the
analysis gives it (they must pickle: the `ray` backend ships them to other processes and machines).

    backend.map_blocks(ctx, task, n, block, start=..., merge=..., save=..., progress=...)

- `ctx`: the job context (cancel checks, progress, checkpoints) or None;
- `start`: the first item not merged yet (a resumed job: its checkpoint's count, a block boundary);
- `save(j) -> (arrays, meta)`: the merged state after item j, checkpointed at block boundaries at most every
  `jobs.CHECKPOINT_EVERY_S` seconds (and never more than a tenth of the time), so a resume skips the blocks
  that were merged;
- `progress(j) -> (fraction, message)` after each merge.

It returns a small report (backend, workers, devices, blocks, retries) that the job may put in its meta.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

Merge = Callable[[int, int, Any], None]
Save = Callable[[int], tuple[Mapping[str, np.ndarray], Mapping]]
Progress = Callable[[int], tuple[float, str]]


class BackendError(RuntimeError):
    """A backend problem (no cluster at the address, a block that failed on every retry, ...); the message
    says what to do."""


@runtime_checkable
class BlockTask(Protocol):
    """Work of one kind over the blocks of a selection (picklable; see the module docstring)."""

    def setup(self) -> Any:
        """Load what the blocks need (model, data) on this worker; called once per worker."""

    def run(self, state: Any, start: int, stop: int) -> Any:
        """The payload of the block [start, stop) (picklable, on the CPU)."""


class Backend:
    """Where a job's blocks run. Subclasses: `LocalBackend` (this process) and `RayBackend` (a Ray cluster)."""

    name = "base"

    def describe(self) -> str:
        """Where a job runs, in words (the app's sidebar and the job status show it)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The backend's settings (never part of a store key)."""
        return {"backend": self.name}

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
        raise NotImplementedError


def block_ranges(n: int, block: int, start: int = 0) -> list[tuple[int, int]]:
    """The aligned blocks [b, min(n, b + block)) from the block that holds item `start` to the end."""
    block = max(1, int(block))
    first = (int(start) // block) * block
    return [(b, min(int(n), b + block)) for b in range(first, int(n), block)]


class Checkpointer:
    """The checkpoint throttle of `jobs.run_batches`: at most every CHECKPOINT_EVERY_S seconds and never more
    than a tenth of the time (a large state is saved less often); never after the last item."""

    def __init__(self, ctx, n: int, save: Save | None):
        from iarmem_core.jobs import CHECKPOINT_EVERY_S

        self.ctx, self.n, self.save, self.every = ctx, n, save, CHECKPOINT_EVERY_S
        self.last, self.cost = time.monotonic(), 0.0

    def maybe(self, j: int) -> None:
        if self.ctx is None or self.save is None or j >= self.n:
            return
        if time.monotonic() - self.last >= max(self.every, 10 * self.cost):
            t = time.monotonic()
            self.ctx.checkpoint(*self.save(j))
            self.last = time.monotonic()
            self.cost = self.last - t
