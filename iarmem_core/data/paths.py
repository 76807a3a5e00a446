"""Typed paths resolve inside configured roots only (symlinks followed first)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class PathNotAllowedError(ValueError):
    """A data path that resolves outside the allowed roots."""


def resolve_inside(path: str | os.PathLike, allowed_roots: Sequence[str | os.PathLike] | None) -> Path:
    """`path` resolved (symlinks followed); with allowed_roots, PathNotAllowedError unless inside one."""
    p = Path(path).expanduser().resolve()
    if allowed_roots is None:
        return p
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(p == r or p.is_relative_to(r) for r in roots):
        raise PathNotAllowedError(
            f"{path} resolves to {p}, which is outside the allowed data folders "
            f"({', '.join(map(str, roots)) or 'none configured'}). Put the data under one of them, or add "
            f"its folder to the allowed roots."
        )
    return p
