"""The `local` backend: the blocks run in this process, in the job's own thread (the default; no Ray)."""

from __future__ import annotations

import os
import time

from iarmem_core import jobs
from iarmem_core.backends.base import Backend, BlockTask, Merge, Progress, Save
from iarmem_core.store import HOST


class LocalBackend(Backend):
    """Blocks run one after another in the calling thread, through `jobs.run_batches` (cancel checks, OOM
    halving down to one block, throttled checkpoints, resume at the checkpoint's block)."""

    name = "local"

    def describe(self) -> str:
        return f"this process (pid {os.getpid()} on {HOST})"

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
        """Run the blocks of [start, n) here; a call of `run_batches` covers batch_size // block whole blocks,
        computed first and merged only once all succeeded (an out-of-memory retry never merges twice)."""
        block = max(1, int(block))
        n_blocks = -(-int(n) // block)
        state = task.setup()
        item = lambda b: min(int(n), b * block)  # noqa: E731 - block index -> item index
        per_call = max(1, int(batch_size or block) // block)
        own_events: list = []
        t0 = time.perf_counter()

        def work(bi: int, bj: int) -> None:
            outs = [task.run(state, item(b), item(b + 1)) for b in range(bi, bj)]
            for b, out in zip(range(bi, bj), outs):
                merge(item(b), item(b + 1), out)

        try:
            jobs.run_batches(
                ctx,
                n_blocks,
                per_call,
                work,
                start=int(start) // block,
                events=own_events,
                what=f"{what} of {block}",
                save=(lambda bj: save(item(bj))) if save is not None else None,
                progress=(lambda bj: progress(item(bj))) if progress is not None else None,
            )
        except jobs.OutOfMemory as e:
            raise jobs.OutOfMemory(
                f"out of memory on one {what} of {block} items: a block is the unit of the fixed reduction order "
                f"and is never split. Use a smaller block (UnitMem: --block-images), dtype bf16, a smaller model "
                f"or another device. ({e})"
            ) from e.__cause__
        if events is not None:
            events.extend(
                {**ev, "at": item(ev["at"]), "from": ev["from"] * block, "to": ev["to"] * block} for ev in own_events
            )
        return {
            "backend": self.name,
            "where": self.describe(),
            "workers": 1,
            "block": block,
            "blocks_s": round(time.perf_counter() - t0, 4),
        }
