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
DEMO_MODELS = ("demo-var-ctl", "demo-var", "demo-rar")  # the talk opens on the positive control (UX.md 1)
# what each model of the demo world is, shown at the top of every page (the card holds the details)
WORLD_ROLES = {
    "demo-var-ctl": (
        "positive control",
        "demo-var with 20 block canaries trained into 96 designated units only: memorization localized by "
        "construction (assets/demo-var-ctl/card.json lists the units). What a working pipeline must find.",
    ),
    "demo-var": (
        "natural memorization (VAR)",
        "Fashion-MNIST with natural, mislabeled and out-of-distribution items planted at 8x and 32x and a "
        "never-trained twin of each: nobody chose where the copies live. The null control and the per-image "
        "localization tell memorization from atypicality.",
    ),
    "demo-rar": (
        "natural memorization (RAR)",
        "the same world as demo-var, generated token by token: natural, mislabeled and out-of-distribution items "
        "at 8x and 32x, never-trained twins; nobody chose where the copies live.",
    ),
}
DEVICES = ("auto", "cpu", "cuda")
MODEL_MEMORY_ENV = "IARMEM_APP_MODEL_MEMORY_GB"


def model_memory_budget() -> int:
    """Bytes the app's cached models may take together: $IARMEM_APP_MODEL_MEMORY_GB, else half the memory."""
    raw = os.environ.get(MODEL_MEMORY_ENV, "").strip()
    if raw:
        try:
            gb = float(raw)
            if gb > 0 and gb < float("inf"):
                return int(gb * 1e9)
        except ValueError:
            pass
        raise ValueError(f"${MODEL_MEMORY_ENV}={raw!r} is not a positive number of GB (e.g. {MODEL_MEMORY_ENV}=24)")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 10**9
    return int(total // 2)


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


def ray_address() -> str:
    """The Ray Jobs API address the sidebar starts with: $IARMEM_RAY_ADDRESS, else an http:// $RAY_ADDRESS."""
    addr = os.environ.get("IARMEM_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    return addr if addr.startswith(("http://", "https://")) else ""
