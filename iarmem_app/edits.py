"""Unit selection and side-by-side samples for the intervention page (no streamlit).

The selection, the edit and the sampling settings are iarmem_core.intervention's, so the page, the CLI
(`intervene`, `sample`) and the stored results agree on which units an edit touches.
"""

from __future__ import annotations

import torch

from iarmem_core import hooks, intervention
from iarmem_core.intervention import make_edit, select_units

__all__ = [
    "make_edit",
    "select_units",
    "parse_units",
    "unknown_units",
    "sampling_settings",
    "describe_sampling",
    "samples",
]


def parse_units(tags: list[str], result=None) -> dict[int, tuple[int, ...]]:
    """["3:17", "3:25"] -> {3: (17, 25)}; malformed tags are skipped. With a UnitMem `result`, units its
    model does not have (a block it lacks, a unit index past its width: a hand-edited URL) are dropped too
    (`unknown_units` lists them)."""
    pairs = []
    blocks = None if result is None else {int(b) for b in result.meta["blocks"]}
    n_units = None if result is None else int(result.n_units)
    for t in tags:
        try:
            b, u = (int(x) for x in str(t).split(":"))
        except ValueError:
            continue
        if blocks is not None and (b not in blocks or not 0 <= u < n_units):
            continue
        pairs.append((b, u))
    return intervention.units_from_pairs(pairs)


def unknown_units(tags: list[str], result) -> list[str]:
    """The tags of `tags` that name a block or unit the model of UnitMem `result` does not have."""
    blocks = {int(b) for b in result.meta["blocks"]}
    out = []
    for t in tags:
        try:
            b, u = (int(x) for x in str(t).split(":"))
        except ValueError:
            continue
        if b not in blocks or not 0 <= u < int(result.n_units):
            out.append(str(t))
    return out


def sampling_settings(adapter) -> dict:
    """The model's own sampling settings (CFG, top-k/p, temperature): the same as `python -m iarmem_core sample`."""
    return intervention.sampling_kwargs(adapter)


def describe_sampling(kw: dict) -> str:
    names = {"cfg": "CFG", "top_k": "top-k", "top_p": "top-p", "temperature": "temperature", "cfg_power": "CFG power"}
    return ", ".join(
        f"{names.get(k, k)} {v:g}" if isinstance(v, float) else f"{names.get(k, k)} {v}" for k, v in kw.items()
    )


@torch.no_grad()
def samples(adapter, labels: list[int], edit: hooks.UnitEdit | None, seed: int) -> torch.Tensor:
    """Class-conditional samples [B, 3, H, W] in [0, 1] at `seed`, with `edit` applied (None: without)."""
    lab = torch.tensor(labels, dtype=torch.long)
    with hooks.edit(adapter.transformer, edit):
        tokens = adapter.generate(lab, seed=seed, **sampling_settings(adapter))
    return adapter.decode(tokens).cpu()
