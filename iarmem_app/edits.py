"""Unit selection and side-by-side samples for the intervention page (no streamlit).

The selection, the edit and the sampling settings are iarmem_core.intervention's, so the page, the CLI
(`intervene`, `sample`) and the stored results agree on which units an edit touches.
"""

from __future__ import annotations

import torch

from iarmem_core import hooks, intervention
from iarmem_core.intervention import make_edit, select_units

__all__ = ["make_edit", "select_units", "parse_units", "sampling_settings", "describe_sampling", "samples"]


def parse_units(tags: list[str]) -> dict[int, tuple[int, ...]]:
    """["3:17", "3:25"] -> {3: (17, 25)}; malformed tags are skipped."""
    pairs = []
    for t in tags:
        try:
            b, u = (int(x) for x in str(t).split(":"))
        except ValueError:
            continue
        pairs.append((b, u))
    return intervention.units_from_pairs(pairs)


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
