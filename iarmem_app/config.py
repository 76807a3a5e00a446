"""App settings: allowed folders, the models offered first, the shipped store (no streamlit). The analysis
defaults are the core's (`unitmem.default_config`, ...), shared with the CLI."""

from __future__ import annotations

import os
from pathlib import Path

from iarmem_core import store as store_mod
from iarmem_core.registry import list_models

REPO = Path(__file__).resolve().parent.parent
SHIPPED_STORE = REPO / "assets" / "store"  # precomputed results, read-only (scripts/precompute_demo_results.py)
N_IMAGES = 500  # the data selection D' of the app and the CLI default (--n 500)
DEMO_MODELS = ("demo-var", "demo-rar")
DEVICES = ("auto", "cpu", "cuda")


def live_measurement() -> bool:
    """Measure every edit as soon as it changes on demo and test models (off with IARMEM_LIVE=0, e.g. for
    scripted tests that must not leave background jobs running)."""
    return os.environ.get("IARMEM_LIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def allowed_roots() -> list[Path]:
    """Folders that typed paths must resolve inside: $IARMEM_ALLOWED_ROOTS (os.pathsep-separated), else
    the repository, the home folder and the result store."""
    env = os.environ.get("IARMEM_ALLOWED_ROOTS")
    if env:
        return [Path(p).expanduser().resolve() for p in env.split(os.pathsep) if p.strip()]
    return [REPO.resolve(), Path.home().resolve(), store_mod.default_root().expanduser().resolve()]


def quick_models() -> list[str]:
    """The models offered first in the sidebar: the bundled demos."""
    return list(DEMO_MODELS)


def default_model() -> str:
    return quick_models()[0]


def other_models() -> list[str]:
    """Every other registry model (released and test configs) for the 'another model' choice."""
    quick = set(quick_models())
    return [m for m in list_models() if m not in quick]
