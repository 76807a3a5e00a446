"""App settings: allowed folders, the models offered first, the default analysis configs (no streamlit)."""

from __future__ import annotations

import os
from pathlib import Path

from iarmem_core import store as store_mod
from iarmem_core import unitmem
from iarmem_core.registry import get_spec, list_models

REPO = Path(__file__).resolve().parent.parent
SHIPPED_STORE = REPO / "assets" / "store"  # precomputed results, read-only (scripts/precompute_demo_results.py)
N_IMAGES = 500  # the data selection D' of the app and the CLI default (--n 500)
DEMO_MODELS = ("demo-var", "demo-rar")
DEVICES = ("auto", "cpu", "cuda")


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


def unitmem_config(model: str, seed: int = 0, detail: bool = False) -> unitmem.UnitMemConfig:
    """The app's UnitMem passes (the CLI defaults otherwise: 10 views, mean rest).

    Overview (the heatmap, the units, the edit): one group per scale, plus each row of the token grid for
    next-token models; small enough to ship. Detail (the token-grid view): every position as well.
    """
    var = get_spec(model).family == "var"
    kinds = ("scale",) if var else ("scale", "row")
    if detail:
        kinds = kinds + ("position",)
    return unitmem.UnitMemConfig(group_kinds=kinds, seed=seed)


def unitmem_cli_detail(model: str, detail: bool = False) -> str:
    """The `unitmem` CLI options that give `unitmem_config(model, detail=detail)`."""
    var = get_spec(model).family == "var"
    if detail:
        return "" if var else " --detail row,position"
    return " --detail none" if var else " --detail row"
