"""Adapters: one IAR interface over VAR, RAR and LlamaGen (see base.py), and `load_adapter`.

Example:
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("test-var")            # random weights, CPU
    >>> toks = m.tokenize(torch.rand(2, 3, 8, 8))
"""

from __future__ import annotations

import importlib
import os

import torch

from iarmem_core.adapters.base import IARAdapter, PositionGroup, UnitSite, resolve_device
from iarmem_core.registry import get_spec

_FAMILY_CLASSES = {
    "var": ("iarmem_core.adapters.var", "VARAdapter"),
    "rar": ("iarmem_core.adapters.rar", "RARAdapter"),
    "llamagen": ("iarmem_core.adapters.llamagen", "LlamaGenAdapter"),
}


def adapter_class(family: str) -> type[IARAdapter]:
    mod, cls = _FAMILY_CLASSES[family]
    return getattr(importlib.import_module(mod), cls)


def load_adapter(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    tokenizer_checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> IARAdapter:
    """Load registry model `name`; `checkpoint` is the transformer file, `tokenizer_checkpoint` the tokenizer's.

    Without files, a demo model loads its bundled weights and any other model gets seeded random weights.
    """
    spec = get_spec(name)
    ad = adapter_class(spec.family).load(
        spec, transformer_path=checkpoint, tokenizer_path=tokenizer_checkpoint, device=device, dtype=dtype, seed=seed
    )
    # how to load the same model again in another process (a worker of the ray backend): `reload_adapter`
    ad.load_args = {
        "name": name,
        "checkpoint": None if checkpoint is None else str(os.path.abspath(os.fspath(checkpoint))),
        "tokenizer_checkpoint": None
        if tokenizer_checkpoint is None
        else str(os.path.abspath(os.fspath(tokenizer_checkpoint))),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(seed),
    }
    return ad


def reload_adapter(load_args: dict, device: str | torch.device = "auto", identity: dict | None = None) -> IARAdapter:
    """The model `load_adapter` loaded with `load_args` (an adapter's `load_args`), on `device`; with `identity`
    (the original's), a model whose files differ here (another node, another copy) is refused."""
    kw = dict(load_args)
    ad = load_adapter(kw.pop("name"), device=device, dtype=getattr(torch, kw.pop("dtype", "float32")), **kw)
    if identity is not None and ad.identity != identity:
        raise ValueError(
            f"the model loaded here differs from the one the job was started with: {ad.identity} vs {identity}. "
            f"Every worker must read the same checkpoint files (a shared filesystem, the same paths)."
        )
    return ad


__all__ = [
    "IARAdapter",
    "PositionGroup",
    "UnitSite",
    "adapter_class",
    "load_adapter",
    "reload_adapter",
    "resolve_device",
]
