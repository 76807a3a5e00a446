"""Shared fixtures. Tests that need ../shared/golden skip with a reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("IARMEM_GOLDEN", ROOT.parent / "shared" / "golden"))

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, whose OpenMP sync cost explodes on a busy machine.

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def golden_dir(family: str) -> Path:
    d = GOLDEN / family
    if not (d / "golden.pt").exists():
        pytest.skip(
            f"golden data not found at {d} (it ships in ../shared/golden beside the checkout; "
            f"set IARMEM_GOLDEN to point elsewhere)"
        )
    return d


@pytest.fixture
def golden_var() -> Path:
    return golden_dir("var")


@pytest.fixture
def golden_rar() -> Path:
    return golden_dir("rar")


@pytest.fixture
def golden_llamagen() -> Path:
    return golden_dir("llamagen")
