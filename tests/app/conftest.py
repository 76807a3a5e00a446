"""Fixtures of the app tests: an empty user store (results come from the shipped assets/store), AppTest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def _user_store(tmp_path_factory):
    """Every app test writes into a fresh store; the repository's store/ is never touched."""
    old = os.environ.get("IARMEM_STORE")
    os.environ["IARMEM_STORE"] = str(tmp_path_factory.mktemp("store"))
    yield Path(os.environ["IARMEM_STORE"])
    if old is None:
        os.environ.pop("IARMEM_STORE", None)
    else:
        os.environ["IARMEM_STORE"] = old


@pytest.fixture
def app(monkeypatch):
    """A fresh AppTest of app.py (not yet run); edits are not measured automatically (no background jobs
    outlive a test; the browser test measures one end to end)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("IARMEM_LIVE", "0")
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
