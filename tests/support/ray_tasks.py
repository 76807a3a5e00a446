"""Block tasks for the Ray backend's tests: importable by the cluster's workers (PYTHONPATH holds the repo)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class SlowBlocks:
    """Each block sleeps `sleep_s`, leaving a mark when it starts (with the worker's pid) and when it ends."""

    def __init__(self, marks: str | os.PathLike, sleep_s: float):
        self.marks, self.sleep_s = str(marks), float(sleep_s)

    def setup(self) -> None:
        return None

    def run(self, state, start: int, stop: int) -> np.ndarray:
        Path(self.marks, f"start-{start}-{os.getpid()}").touch()
        time.sleep(self.sleep_s)
        Path(self.marks, f"done-{start}").touch()
        return np.arange(start, stop, dtype=np.int64) ** 2
