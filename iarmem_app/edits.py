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
    return ", ".join(f"{names.get(k, k)} {v:g}" if isinstance(v, float) else f"{names.get(k, k)} {v}"
                     for k, v in kw.items())


@torch.no_grad()
def samples(adapter, labels: list[int], edit: hooks.UnitEdit | None, seed: int) -> torch.Tensor:
    """Class-conditional samples [B, 3, H, W] in [0, 1] at `seed`, with `edit` applied (None: without)."""
    lab = torch.tensor(labels, dtype=torch.long)
    with hooks.edit(adapter.transformer, edit):
        tokens = adapter.generate(lab, seed=seed, **sampling_settings(adapter))
    return adapter.decode(tokens).cpu()


# ---- jobs: the numbers of one edit and the sweep (iarmem_core.intervention) ------------------------------
MEASURE_KIND = "intervention-app"


def measure_spec(adapter, res, image_set, *, top_percent: float | None, units: dict | None, factor: float, op: str,
                 ranking: str, seed: int) -> dict:
    from iarmem_core import data

    return {"model": adapter.identity, "data": data.data_fingerprint(image_set), "unitmem": res.meta.get("store_key"),
            "top_percent": top_percent, "units": None if units is None else {str(b): list(u) for b, u in
                                                                              sorted(units.items())},
            "factor": float(factor), "op": op, "ranking": ranking, "seed": int(seed),
            "random_draws": intervention.default_random_draws(adapter)}


def start_measure(adapter, res, image_set, store, *, top_percent: float | None, units: dict | None, factor: float,
                  op: str, ranking: str, seed: int):
    """run_intervention for one edit (top-k% or explicit units) as a job; its dict lands in the result's meta."""
    from iarmem_core import jobs

    spec = measure_spec(adapter, res, image_set, top_percent=top_percent, units=units, factor=factor, op=op,
                        ranking=ranking, seed=seed)

    def fn(ctx):
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        out = intervention.run_intervention(adapter, res, image_set, top_percent=top_percent or 0.0, units=units,
                                   factor=factor, op=op, ranking=ranking, seed=seed, store=ctx.store,
                                   on_progress=progress)
        return {}, out

    return jobs.start_job(MEASURE_KIND, spec, fn, store=store)


SWEEP_PERCENTS = intervention.DEFAULT_TOP_PERCENTS


def sweep_args(adapter, res, image_set, *, factor: float, op: str, ranking: str, seed: int) -> dict:
    """Keyword arguments of intervention.start_sweep / sweep_spec (the CLI's `intervene --sweep` defaults)."""
    return dict(top_percents=SWEEP_PERCENTS, factor=float(factor), op=op, ranking=ranking, combine="max",
                cfg_half="both", extraction_cfg=None, n_samples=1000, feature_space=None, reference_set=None,
                sampling=None, seed=int(seed), heldout_set=None, sscd_path=None)
