"""Unit selection and side-by-side samples for the intervention page (no streamlit).

Uses iarmem_core.intervention (issue 7) when it is in this build; until then a minimal stand-in with the
paper's defaults: global ranking of each unit's max UnitMem over the scale groups, fc1 rows x factor.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from iarmem_core import hooks


def core():
    """iarmem_core.intervention, or None while it is not in this build."""
    try:
        return importlib.import_module("iarmem_core.intervention")
    except ImportError:
        return None


def select_units(res, top_percent: float, ranking: str = "global") -> dict[int, tuple[int, ...]]:
    """The top `top_percent` % units by UnitMem (each unit's max over the scale groups)."""
    mod = core()
    if mod is not None:
        return mod.select_units(res, top_percent, ranking=ranking)
    um = res.arrays["unitmem_LGU"][:, list(res.meta["scale_groups"]), :].max(axis=1)  # [L, U]
    blocks = [int(b) for b in res.meta["blocks"]]
    L, U = um.shape
    if ranking == "per_block":
        k = int(round(top_percent / 100 * U))
        return {blocks[li]: tuple(int(u) for u in np.argsort(um[li])[::-1][:k]) for li in range(L) if k}
    k = int(round(top_percent / 100 * L * U))
    flat = np.argsort(um.reshape(-1))[::-1][:k]
    out: dict[int, list[int]] = {}
    for f in flat:
        li, u = divmod(int(f), U)
        out.setdefault(blocks[li], []).append(u)
    return {b: tuple(sorted(us)) for b, us in out.items()}


def parse_units(tags: list[str]) -> dict[int, tuple[int, ...]]:
    """["3:17", "3:25"] -> {3: (17, 25)}; malformed tags are skipped."""
    out: dict[int, set[int]] = {}
    for t in tags:
        try:
            b, u = (int(x) for x in str(t).split(":"))
        except ValueError:
            continue
        out.setdefault(b, set()).add(u)
    return {b: tuple(sorted(us)) for b, us in out.items()}


def make_edit(units: dict[int, tuple[int, ...]], op: str, factor: float) -> hooks.UnitEdit:
    mod = core()
    if mod is not None:
        return mod.make_edit(units, op=op, factor=factor)
    return hooks.UnitEdit(units=units, op=op, factor=factor)


def sampling_settings(adapter) -> dict:
    """The model's own sampling settings (CFG, top-k/p, temperature) for the side-by-side samples."""
    mod = core()
    if mod is not None and hasattr(mod, "sampling_kwargs"):
        return dict(mod.sampling_kwargs(adapter))  # the same settings as `python -m iarmem_core sample`
    s = dict(adapter.spec.sampling)
    out = {"cfg": float(s.get("cfg", 0.0)), "top_k": int(s.get("top_k", 0)), "top_p": float(s.get("top_p", 0.0)),
           "temperature": float(s.get("temperature", 1.0))}
    if adapter.family == "rar" and "cfg_power" in s:
        out["cfg_power"] = float(s["cfg_power"])
    return out


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
            "factor": float(factor), "op": op, "ranking": ranking, "seed": int(seed)}


def start_measure(adapter, res, image_set, store, *, top_percent: float | None, units: dict | None, factor: float,
                  op: str, ranking: str, seed: int):
    """run_intervention for one edit (top-k% or explicit units) as a job; its dict lands in the result's meta."""
    from iarmem_core import jobs

    mod = core()
    spec = measure_spec(adapter, res, image_set, top_percent=top_percent, units=units, factor=factor, op=op,
                        ranking=ranking, seed=seed)

    def fn(ctx):
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        out = mod.run_intervention(adapter, res, image_set, top_percent=top_percent or 0.0, units=units,
                                   factor=factor, op=op, ranking=ranking, seed=seed, store=ctx.store,
                                   on_progress=progress)
        return {}, out

    return jobs.start_job(MEASURE_KIND, spec, fn, store=store)


SWEEP_PERCENTS = (0, 1, 5, 10, 20)


def sweep_args(adapter, res, image_set, *, factor: float, op: str, ranking: str, seed: int) -> dict:
    """Keyword arguments of intervention.start_sweep / sweep_spec (the CLI's `intervene --sweep` defaults)."""
    return dict(top_percents=SWEEP_PERCENTS, factor=float(factor), op=op, ranking=ranking, combine="max",
                cfg_half="both", extraction_cfg=None, n_samples=1000, feature_space=None, reference_set=None,
                sampling=None, seed=int(seed), heldout_set=None, sscd_path=None)
