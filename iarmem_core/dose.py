"""Dose-response: how many memorized copies survive as more units are edited, for four ways to choose them.

The question behind the top-k% edit is "does removing the units UnitMem ranks highest remove the copies, and
better than any units would?". One point (k = 10%) cannot answer it; a curve can (LOCALIZATION.md section 3).
For the images the unedited attack extracts (the copies), this module edits n units and counts how many copies
are still extracted, for n along a grid and four selections:

- ``unitmem``: the top k% units by UnitMem (`intervention.select_units`, the Intervention page's ranking);
- ``random``: `random_draws` (>= 20) random sets with the ranked set's count of units in every block
  (`intervention.random_control`): the median and the 5-95% band of the counts, and the ranked edit's rank
  and one-sided p-value among them (`intervention.random_draw_stats`);
- ``union``: the union of the per-image minimal sets (`localize.localize_all`), growing one image at a time
  (images by ascending n_min): what is known to carry each copy, put together;
- ``greedy``: a set cover guided by attribution: each step adds the unit with the largest summed attribution
  (`localize.attribution`, each image's scores divided by its largest) over the copies still extracted; which
  copies are still extracted is measured again at every point of the curve, so the greedy set only chases the
  copies that survive. Attribution is a first-order estimate of the margin change, so this is a heuristic
  cover, verified by the attack at every point; it is not an optimum.

Every count is the localization's decision (`localize.Judge`: the attack's greedy generation from the prefix
at the model's calibrated threshold, strictly above) on the same images, so the four curves are comparable and
their point at n = 0 is the unedited model. Images the edit newly makes extracted are not counted (the curve
follows the copies of the unedited model). All edits use one operation (`op`, `factor`; default: zeroing, the
operation the minimal sets were found with). The result is a stored job (kind ``dose-response``).

Example:
    >>> res = unitmem.run_unitmem(m, sel, unitmem.default_config(m))
    >>> curve = dose.run_dose_response(m, sel, res)
    >>> curve["curves"]["unitmem"][-1], curve["curves"]["random"][-1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from iarmem_core import data, extraction, intervention, jobs, localize
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.hooks import UnitEdit

KIND = "dose-response"
VERSION = "2"  # 2: built on localize-all version 2 (its key in the result)
DEFAULT_PERCENTS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
SELECTIONS = ("unitmem", "random", "union", "greedy")


@dataclass(frozen=True)
class CurveConfig:
    """Options of a dose-response curve; every field is part of the result's store key."""

    percents: tuple[float, ...] = DEFAULT_PERCENTS  # the UnitMem / random grid, % of all units
    random_draws: int = 20
    ranking: str = intervention.DEFAULT_RANKING
    combine: str = intervention.DEFAULT_COMBINE
    union_points: int = 12  # at most this many points on the union curve (always its last)
    greedy: bool = True
    # the per-image localization behind the union; its operation (op, factor), prefix, decision and seed are
    # those of every curve (default: zeroing, the calibrated threshold, the attack's prefix)
    localize: localize.LocalizeConfig = field(default_factory=localize.LocalizeConfig)

    def __post_init__(self) -> None:
        ps = tuple(float(p) for p in self.percents)
        if not ps or any(not math.isfinite(p) or p <= 0 or p > 100 for p in ps):
            raise ValueError(f"percents must be numbers in (0, 100], got {self.percents}")
        object.__setattr__(self, "percents", tuple(sorted(set(ps))))
        if self.random_draws < 1:
            raise ValueError(f"random_draws must be >= 1, got {self.random_draws}")
        if self.union_points < 1:
            raise ValueError(f"union_points must be >= 1, got {self.union_points}")

    @property
    def op(self) -> str:
        return self.localize.op

    @property
    def factor(self) -> float:
        return float(self.localize.factor)

    @property
    def seed(self) -> int:
        return int(self.localize.seed)

    def to_dict(self) -> dict:
        return asdict(self)


def _edit(units: Mapping[int, Sequence[int]], cfg: CurveConfig) -> UnitEdit | None:
    units = {int(b): tuple(int(u) for u in us) for b, us in units.items() if len(us)}
    if not units:
        return None
    return UnitEdit(units=units, op=cfg.op, factor=float(cfg.factor))


def _n(units: Mapping[int, Sequence[int]]) -> int:
    return int(sum(len(u) for u in units.values()))


def union_steps(minimal_sets: Sequence[tuple[str, int, Sequence]], points: int) -> list[dict]:
    """The growing union: images by ascending n_min (ties: id), at most `points` steps (evenly spread, the last
    always kept). `minimal_sets`: (image id, n_min, [[block, unit], ...])."""
    order = sorted(minimal_sets, key=lambda r: (int(r[1]), str(r[0])))
    m = len(order)
    if m == 0:
        return []
    keep = sorted({int(round(x)) for x in np.linspace(1, m, num=min(points, m))})
    out, acc = [], set()
    for j, (_, _, units) in enumerate(order, start=1):
        acc |= {(int(b), int(u)) for b, u in units}
        if j in keep:
            out.append({"n_images": j, "units": intervention.units_from_pairs(acc), "added": order[j - 1][0]})
    return out


def greedy_order(attr_IF: np.ndarray, alive_I: np.ndarray, chosen: set[int], n_add: int) -> list[int]:
    """The next `n_add` flat unit indices of the greedy cover: by summed attribution over the alive images
    (each row already divided by its largest value; negative attribution counts as 0), ties by lower index,
    never a chosen one."""
    score = np.clip(attr_IF[alive_I], 0, None).sum(0) if alive_I.any() else np.zeros(attr_IF.shape[1])
    if chosen:
        score[list(chosen)] = -np.inf
    order = np.lexsort((np.arange(score.size), -score))
    return [int(f) for f in order[:n_add] if np.isfinite(score[f])]


def job_spec(adapter: IARAdapter, image_set: data.ImageSet, unitmem_result, cfg: CurveConfig, ids) -> dict:
    return {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "data": data.data_fingerprint(image_set),
        "unitmem": unitmem_result.meta.get("store_key"),
        "config": cfg.to_dict(),
        "images": sorted(ids),
    }


def _curve(adapter, image_set, unitmem_result, cfg: CurveConfig, ids: list[str], store, progress) -> dict:
    blocks = [s.block for s in adapter.unit_sites()]
    U = adapter.n_units
    n_total = len(blocks) * U
    out: dict = {
        "n_units_total": n_total,
        "images": list(ids),
        "op": cfg.op,
        "factor": float(cfg.factor),
        "random_draws": int(cfg.random_draws),
        "definition": {
            "y": "copies still extracted: of the images the unedited attack extracts, how many the attack "
            "(greedy from the prefix, calibrated threshold, strictly above) still extracts after the edit",
            "unitmem": f"top k% units by UnitMem (ranking {cfg.ranking}, combine {cfg.combine})",
            "random": f"{cfg.random_draws} random sets with the ranked set's count of units per block: median "
            "and 5-95% band; rank and one-sided p = (1 + draws at or below the ranked count) / (draws + 1)",
            "union": "union of the per-image minimal sets (localize), images added by ascending n_min",
            "greedy": "each step adds the unit with the largest summed attribution (each image's scores / its "
            "largest) over the copies still extracted, re-measured at every point; a heuristic, not an optimum",
        },
    }
    if not ids:
        out.update(extracted_before=0, curves={s: [] for s in SELECTIONS}, note="no image is extracted: no curve")
        return out
    pos = {k: i for i, k in enumerate(image_set.ids)}
    lcfg = cfg.localize
    judge = localize.make_judge(adapter, image_set, [pos[k] for k in ids], lcfg, store)
    out.update(similarity=judge.measure, threshold=judge.threshold, prefix_tokens=judge.prefix)

    # 1. UnitMem-ranked and random sets, the unedited model first: one batched pass
    progress(0.02, "UnitMem-ranked and random sets")
    plan: list[tuple[float, dict, list[dict]]] = []
    for k in cfg.percents:
        sel = intervention.select_units(unitmem_result, k, cfg.ranking, cfg.combine)
        rnd = [intervention.random_control(sel, U, seed=cfg.seed + i) for i in range(cfg.random_draws)]
        plan.append((k, sel, rnd))
    edits: list[UnitEdit | None] = [None]
    for _, sel, rnd in plan:
        edits += [_edit(sel, cfg)] + [_edit(r, cfg) for r in rnd]
    ext_EI = extraction.is_extracted(
        judge.scores_many(edits, on_batch=lambda f: progress(0.02 + 0.45 * f, "UnitMem-ranked and random sets")),
        judge.threshold,
    )
    alive0 = ext_EI[0]
    out["extracted_before"] = int(alive0.sum())
    out["not_extracted_by_the_judge"] = [k for k, a in zip(ids, alive0) if not a]

    def count(ext_I: np.ndarray) -> int:
        return int((ext_I & alive0).sum())

    start = {"n_units": 0, "extracted": out["extracted_before"]}
    ranked, random_rows, e = [dict(start, top_percent=0.0)], [dict(start, top_percent=0.0)], 1
    for k, sel, rnd in plan:
        n_rank = count(ext_EI[e])
        draws = [count(ext_EI[e + 1 + i]) for i in range(len(rnd))]
        e += 1 + len(rnd)
        st = intervention.random_draw_stats(n_rank, draws)
        ranked.append({"top_percent": k, "n_units": _n(sel), "extracted": n_rank, "rank": st["rank"]})
        ranked[-1]["p_value"] = st["p_value"]
        random_rows.append(
            {
                "top_percent": k,
                "n_units": _n(sel),
                "extracted": float(np.median(draws)),
                "q05": st["extracted_after_q05"],
                "q95": st["extracted_after_q95"],
                "min": st["extracted_after_min"],
                "max": st["extracted_after_max"],
                "draws": draws,
            }
        )

    # 2. the union of the minimal sets
    progress(0.5, "per-image minimal sets (localize, stored per image)")
    loc = localize.localize_all(
        adapter,
        image_set,
        lcfg,
        store=store,
        on_progress=lambda f, m: progress(0.5 + 0.3 * f, f"localize: {m}"),
    )
    sets = [
        (r["image"], int(r["n_min"]), _units_of(store, r))
        for r in loc["images"]
        if r.get("n_min") and r["image"] in pos
    ]
    steps = union_steps(sets, cfg.union_points)
    union_rows = [dict(start, n_images=0)]
    if steps:
        ext_U = extraction.is_extracted(judge.scores_many([_edit(s["units"], cfg) for s in steps]), judge.threshold)
        for s, ext in zip(steps, ext_U):
            union_rows.append(
                {"n_images": s["n_images"], "added": s["added"], "n_units": _n(s["units"]), "extracted": count(ext)}
            )
    out["n_localized"] = len(sets)
    out["localize_all_key"] = loc["store_key"]

    # 3. the greedy cover, guided by each copy's attribution, verified at every point
    greedy_rows = [dict(start)]
    if cfg.greedy:
        progress(0.82, "attribution of every copy (one backward pass each)")
        attr = np.zeros((len(ids), n_total), np.float64)
        for i, k in enumerate(ids):
            row = pos[k]
            x = image_set.images([row], size=adapter.image_size)[0]
            g = localize.attribution(adapter, x, int(image_set.labels[row]), judge.prefix)["scores_LU"].reshape(-1)
            top = float(g.max())
            attr[i] = g / top if top > 0 else 0.0
        targets = sorted({r["n_units"] for r in ranked[1:]} | {r["n_units"] for r in union_rows[1:]})
        grid, n = [], 1
        while n < (targets[-1] if targets else 0):
            grid.append(n)
            n *= 2
        grid = sorted(set(grid) | set(targets))
        chosen: list[int] = []
        alive = alive0.copy()
        for j, n in enumerate(grid):
            progress(0.85 + 0.15 * j / len(grid), f"greedy cover: {n} units")
            chosen += greedy_order(attr, alive, set(chosen), n - len(chosen))
            units = intervention.units_from_pairs((blocks[f // U], f % U) for f in chosen)
            ext = extraction.is_extracted(judge.scores_many([_edit(units, cfg)])[0], judge.threshold)
            alive = ext & alive0
            greedy_rows.append({"n_units": len(chosen), "extracted": int(alive.sum())})
            if not alive.any():
                break
    out["curves"] = {"unitmem": ranked, "random": random_rows, "union": union_rows, "greedy": greedy_rows}
    out["summary"] = summary(out)
    return out


def _units_of(store, image_row: Mapping) -> list:
    _, meta = store.load(image_row["store_key"])
    return list(meta.get("units") or [])


def units_to_remove(rows: Sequence[Mapping], share: float = 0.5) -> int | None:
    """The fewest units at which a curve has removed at least `share` of the copies (None: never)."""
    if not rows:
        return None
    n0 = rows[0]["extracted"]
    for r in rows:
        if n0 and (n0 - r["extracted"]) >= share * n0:
            return int(r["n_units"])
    return None


def summary(res: Mapping) -> dict:
    """Per selection: units needed to remove half and all of the copies (None: not within the curve)."""
    out = {}
    for name, rows in res["curves"].items():
        out[name] = {
            "units_for_half": units_to_remove(rows, 0.5),
            "units_for_all": units_to_remove(rows, 1.0),
            "last": dict(rows[-1]) if rows else None,
        }
        if out[name]["last"] is not None:
            out[name]["last"].pop("draws", None)
    return out


def _job(adapter, image_set, unitmem_result, cfg: CurveConfig | None, store, on_progress=None, ids=None):
    """(config, store, spec, job function) of the curves: what run, start and key share. `ids`: the extracted
    images when the caller has them (default: from the unedited attack, run or loaded)."""
    cfg = cfg or CurveConfig()
    st = store if store is not None else store_mod.get_store()
    if ids is None:
        ids = localize.extracted_ids(adapter, image_set, cfg.localize, st)
    spec = job_spec(adapter, image_set, unitmem_result, cfg, ids)

    def fn(ctx):
        def progress(f: float, msg: str) -> None:
            ctx.check()
            ctx.progress(f, msg)
            if on_progress is not None:
                on_progress(f, msg)

        return {}, _curve(adapter, image_set, unitmem_result, cfg, ids, ctx.store, progress)

    return cfg, st, spec, fn


def run_dose_response(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    unitmem_result,
    cfg: CurveConfig | None = None,
    *,
    store=None,
    on_progress=None,
    force: bool = False,
) -> dict:
    """Run (or load from the store) the dose-response curves; see the module docstring for what they hold."""
    _, st, spec, fn = _job(adapter, image_set, unitmem_result, cfg, store, on_progress)
    _, meta = jobs.run_job(KIND, spec, fn, store=st, version=VERSION, force=force)
    return {**meta, "store_key": st.key(KIND, spec, VERSION)}


def start_dose_response(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    unitmem_result,
    cfg: CurveConfig | None = None,
    *,
    store=None,
    ids=None,
) -> jobs.JobHandle:
    """The same as a background job (the app); `ids` as in `dose_response_key`."""
    _, st, spec, fn = _job(adapter, image_set, unitmem_result, cfg, store, ids=ids)
    return jobs.start_job(KIND, spec, fn, store=st, version=VERSION)


def dose_response_key(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    unitmem_result,
    cfg: CurveConfig | None = None,
    store=None,
    ids=None,
) -> str:
    """The store key `run_dose_response` would use. `ids`: the ids the unedited attack extracts when the caller has
    them (the app, from a stored result); otherwise that attack is loaded from the store (or run)."""
    _, st, spec, _ = _job(adapter, image_set, unitmem_result, cfg, store, ids=ids)
    return st.key(KIND, spec, VERSION)
