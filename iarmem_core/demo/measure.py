"""The measurements of a demo-world model, written into its card: what the world's success criteria ask
(LOCALIZATION.md section 3), computed with the library's own attack, UnitMem, localization and quality code.

    python -m iarmem_core train-demo --only measure

For one shipped model (demo-var, demo-rar, demo-var-ctl) on the default D' (`data.select_demo(500)`: every item of
known kind plus unique images):

- extraction per group (planted kind x dose, control canaries, twins, unique, held-out): the attack on every item
  and 100 unique images, 200 held-out images, at the calibrated threshold of the card, with the margin (similarity
  minus threshold) distribution;
- UnitMem (the app's overview pass): for the top-10% units (ranked by their max over the generated groups), the
  share whose argmax image is of each group, beside that group's share of D'; and the planted-minus-twin
  (block, group) map: per cell, the share of its top-10% units pointing at planted items minus at their twins;
- per-image causal sets (`localize`): n_min of every extracted item, with 20 matched random sets;
- the planted-minus-twin map of attribution (positive attribution per (block, group), each item's map normalised
  to sum 1, planted items minus twins, per kind);
- criterion (a): for k in 0.5, 1, 2, 3, 5% the UnitMem-ranked edit (zero) against 20 random draws of the same
  size per block (one batched attack, `intervention.measure_edits`): per group the items still extracted, the
  rank and p-value of the ranked edit among the draws, and FD / class accuracy of the ranked edit beside the
  draws' 5-95% band (`intervention.quality_many`, 200 samples each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from iarmem_core import data, extraction, intervention, localize, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.demo.train import Clock, Log, _json_safe, _stderr_log
from iarmem_core.demo.world import group_of
from iarmem_core.store import ResultStore

TOP_PERCENTS = (0.5, 1.0, 2.0, 3.0, 5.0)
N_DRAWS = 20


def _groups(image_set: data.ImageSet) -> dict[str, str]:
    return {k: group_of(image_set.meta, i) for i, k in enumerate(image_set.ids)}


def extraction_part(ad, sel, store, seed) -> tuple[dict, extraction.ExtractionResult, dict]:
    spec = ad.spec
    items = [k for k, r in zip(sel.ids, sel.meta["role"]) if r != "unique"]
    uniq = [k for k, r in zip(sel.ids, sel.meta["role"]) if r == "unique"][:100]
    ids = tuple(k for k in sel.ids if k in set(items) | set(uniq))
    ev, _ = extraction.demo_heldout_sets(200, seed)
    cfg = extraction.ExtractionConfig(candidate_ids=ids, seed=seed)
    res = extraction.run_extraction(ad, sel, cfg, heldout_set=ev, store=store)
    groups = _groups(sel)
    groups.update({k: "heldout" for k in ev.ids})
    t = res.table
    p0 = res.meta["prefix_tokens"][0]
    m = res.similarity
    thr = res.thresholds(m)[p0]
    rows = t[t.prefix_tokens == p0]
    by: dict[str, dict] = {}
    for g in sorted(set(groups[k] for k in rows.image_id)):
        r = rows[rows.image_id.map(groups) == g]
        marg = r[m].to_numpy(np.float64) - thr
        by[g] = {
            "extracted": int(r.extracted.sum()),
            "n": int(len(r)),
            "share": round(float(r.extracted.mean()), 4),
            "margin_q10_q50_q90": [round(float(q), 4) for q in np.quantile(marg, [0.1, 0.5, 0.9])],
        }
    out = {
        "similarity": m,
        "threshold": thr,
        "threshold_source": res.summary()["threshold_source"],
        "prefix_tokens": p0,
        "by_group": by,
        "store_key": res.meta["store_key"],
        "command": f"python -m iarmem_core extract --model {spec.name} --ids <the items> --json",
    }
    return out, res, groups


def unitmem_part(ad, sel, store, groups) -> tuple[dict, unitmem.UnitMemResult]:
    cfg = unitmem.default_config(ad)
    res = unitmem.run_unitmem(ad, sel, cfg, store=store)
    g_of = np.array([groups.get(k, "unique") for k in res.image_ids])
    gen = res.generated_group_ids()
    score = res.unit_scores("generated").reshape(-1).astype(np.float64)
    k = max(1, int(round(0.1 * score.size)))
    top = np.lexsort((np.arange(score.size), -score))[:k]
    L, G, U = res.unitmem.shape
    # the argmax of a top unit: in the generated group where the unit has its max
    li, ui = top // U, top % U
    gbest = np.asarray(gen)[res.unitmem[li][:, gen, :][np.arange(k), :, ui].argmax(1)]
    arg = res.arrays["argmax_LGU"][li, gbest, ui]
    share_top = {g: round(float(np.mean(g_of[arg] == g)), 4) for g in sorted(set(g_of))}
    share_data = {g: round(float(np.mean(g_of == g)), 4) for g in sorted(set(g_of))}
    # planted-minus-twin map per (block, group): share of each cell's top-10% units
    kk = max(1, int(round(0.1 * U)))
    order = np.argsort(-res.unitmem, axis=-1, kind="stable")[..., :kk]
    cell_arg = np.take_along_axis(res.arrays["argmax_LGU"], order, axis=-1)
    cg = g_of[cell_arg]
    planted = np.char.startswith(cg.astype(str), "planted") | (cg == "control canary")
    twin = np.char.startswith(cg.astype(str), "twin")
    diff = (planted.mean(-1) - twin.mean(-1))[:, res.heatmap_group_ids()]
    return {
        "store_key": res.store_key,
        "ranking": "each unit's max UnitMem over the generated groups (combine='generated')",
        "top10_argmax_share": share_top,
        "share_of_data": share_data,
        "top10_argmax_ratio_vs_share": {
            g: round(share_top[g] / share_data[g], 3) if share_data[g] else None for g in share_top
        },
        "planted_minus_twin_map": {
            "groups": [res.groups[i]["name"] for i in res.heatmap_group_ids()],
            "blocks": res.blocks,
            "values_LG": np.round(diff, 4).tolist(),
            "definition": "per (block, group): share of the cell's top-10% units whose argmax "
            "is a planted item minus the share whose argmax is a twin",
        },
        "command": f"python -m iarmem_core unitmem --model {ad.spec.name} --json",
    }, res


def localize_part(ad, sel, store, ext_res, groups, seed, log) -> dict:
    ids = [k for k in ext_res.extracted_ids() if groups.get(k, "").startswith(("planted", "control"))]
    cfg = localize.LocalizeConfig(seed=seed, quality_samples=0)
    rows = []
    for i, k in enumerate(ids):
        r = localize.run_localization(ad, sel, k, cfg, others=ids, store=store)
        rows.append(
            {
                "image": k,
                "group": groups[k],
                "n_min": r.get("n_min"),
                "random_flips": r.get("random_flips"),
                "random_draws": r.get("random_draws"),
                "margin_before": r.get("margin_before"),
                "collateral": len(r.get("collateral") or []),
            }
        )
        if (i + 1) % 10 == 0:
            log(f"[{ad.spec.name} measure] localized {i + 1}/{len(ids)}")
    by: dict[str, dict] = {}
    for g in sorted(set(r["group"] for r in rows)):
        rs = [r for r in rows if r["group"] == g]
        found = [r["n_min"] for r in rs if r["n_min"] is not None]
        by[g] = {
            "n": len(rs),
            "n_min_median": float(np.median(found)) if found else None,
            "n_min_q25_q75": [float(q) for q in np.quantile(found, [0.25, 0.75])] if found else None,
            "not_removed_within_budget": len(rs) - len(found),
            "random_flips": f"{sum(r['random_flips'] or 0 for r in rs)} of {sum(r['random_draws'] or 0 for r in rs)}",
        }
    return {
        "per_image": rows,
        "by_group": by,
        "config": cfg.to_dict(),
        "command": f"python -m iarmem_core localize --model {ad.spec.name} --all --json",
    }


def attribution_part(ad, sel, groups, prefix) -> dict:
    kinds = {}
    for i, k in enumerate(sel.ids):
        g = groups[k]
        if g == "unique":
            continue
        kind = str(sel.meta["kind"][i])
        a = localize.attribution(ad, sel.images([i], size=ad.image_size)[0], int(sel.labels[i]), prefix)
        m = np.asarray(a["map_LG"])
        m = m / max(float(m.sum()), 1e-12)
        role = "planted" if g.startswith(("planted", "control canary")) else "twin"
        kinds.setdefault(kind, {}).setdefault(role, []).append(m)
        groups_names = a["groups"]
    out = {}
    for kind, d in kinds.items():
        if "planted" in d and "twin" in d:
            diff = np.mean(d["planted"], 0) - np.mean(d["twin"], 0)
            out[kind] = {
                "values_LG": np.round(diff, 5).tolist(),
                "n_planted": len(d["planted"]),
                "n_twin": len(d["twin"]),
            }
    return {
        "groups": groups_names,
        "blocks": [s.block for s in ad.unit_sites()],
        "by_kind": out,
        "definition": "positive attribution per (block, group), each item's map normalised to sum 1; the mean "
        "over planted items minus the mean over their never-trained twins",
    }


def pattern(values_LG, groups: list[str], family: str) -> dict:
    """Criterion (b) on one planted-minus-twin map [L, G]: where its positive part sits.

    Per group (column) the block centroid of the positive part, sum_l l * P[l, g] / sum_l P[l, g] (blocks
    counted from 0; None without mass), and the overall centroid. The paper's pattern: VAR, coarse scales in
    early blocks and finer scales deeper (the Spearman correlation of the centroids with the scale order is
    positive); next-token models, the later blocks (the overall centroid above the middle block)."""
    d = np.clip(np.asarray(values_LG, np.float64), 0, None)
    L = d.shape[0]
    li = np.arange(L, dtype=np.float64)
    mass = d.sum(0)
    cent = [float((li * d[:, g]).sum() / mass[g]) if mass[g] > 0 else None for g in range(d.shape[1])]
    overall = float((li[:, None] * d).sum() / d.sum()) if d.sum() > 0 else None
    out = {
        "centroid_by_group": {g: (None if c is None else round(c, 3)) for g, c in zip(groups, cent)},
        "centroid_overall": None if overall is None else round(overall, 3),
        "middle_block": (L - 1) / 2,
    }
    if family == "var":
        pts = [(gi, c) for gi, c in enumerate(cent) if c is not None]
        if len(pts) >= 3:
            a = np.argsort(np.argsort([p[0] for p in pts])).astype(np.float64)
            b = np.argsort(np.argsort([p[1] for p in pts])).astype(np.float64)
            rho = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        else:
            rho = None
        out["spearman_scale_vs_centroid"] = None if rho is None else round(rho, 3)
        out["paper_pattern"] = bool(rho is not None and rho > 0)
        out["definition"] = "VAR: coarse scales early, finer scales deeper = a positive Spearman correlation"
    else:
        out["paper_pattern"] = bool(overall is not None and overall > (L - 1) / 2)
        out["definition"] = "next-token: the later blocks = the overall centroid above the middle block"
    return out


def add_patterns(m: dict, family: str) -> dict:
    """Criterion (b) for the UnitMem map and for each kind's attribution map of measurements `m` (in place)."""
    um = m["unitmem"]["planted_minus_twin_map"]
    m["unitmem"]["pattern"] = pattern(um["values_LG"], um["groups"], family)
    att = m["attribution"]
    for v in att["by_kind"].values():
        v["pattern"] = pattern(v["values_LG"], att["groups"], family)
    m.setdefault("summary", {})["criterion_b"] = {
        "unitmem": m["unitmem"]["pattern"]["paper_pattern"],
        **{f"attribution {k}": v["pattern"]["paper_pattern"] for k, v in att["by_kind"].items()},
    }
    return m


def criterion_a(ad, sel, store, ext_res, um_res, groups, seed, log) -> dict:
    edits, labels = [], []
    for k in TOP_PERCENTS:
        units = intervention.select_units(um_res, k)
        edits.append(intervention.make_edit(units, "zero"))
        labels.append((k, "ranked", 0))
        for d in range(N_DRAWS):
            edits.append(intervention.make_edit(intervention.random_control(units, ad.n_units, seed=seed + d), "zero"))
            labels.append((k, "random", d))
    sc = intervention.measure_edits(ad, sel, edits, base=ext_res, store=store)
    ext = sc.extracted()  # [E, I]
    g_I = np.array([groups.get(str(k), "unique") for k in sc.image_id])
    before = sc.extracted_before()
    log(f"[{ad.spec.name} measure] {len(edits)} edits attacked; sampling for quality")
    qs = intervention.quality_many(ad, edits, n_samples=200, seed=seed)
    out = {}
    for k in TOP_PERCENTS:
        ri = [i for i, lab in enumerate(labels) if lab[0] == k and lab[1] == "ranked"][0]
        di = [i for i, lab in enumerate(labels) if lab[0] == k and lab[1] == "random"]
        row = {"n_units": edits[ri].n_units}
        for g in sorted(set(g_I)):
            sel_g = g_I == g
            if not before[sel_g].any():
                continue
            r = int(ext[ri, sel_g].sum())
            dr = ext[di][:, sel_g].sum(1)
            row[g] = {"before": int(before[sel_g].sum()), "ranked_after": r, **intervention.random_draw_stats(r, dr)}
        fd_d = np.array([qs[i]["fd"] for i in di])
        acc_d = np.array([qs[i]["class_acc"] for i in di], dtype=np.float64)
        row["quality"] = {
            "ranked_fd": qs[ri]["fd"],
            "ranked_class_acc": qs[ri]["class_acc"],
            "random_fd_q05_q95": [float(np.quantile(fd_d, 0.05)), float(np.quantile(fd_d, 0.95))],
            "random_class_acc_q05_q95": [float(np.quantile(acc_d, 0.05)), float(np.quantile(acc_d, 0.95))],
        }
        row["quality"]["inside_band"] = bool(
            row["quality"]["ranked_fd"] <= row["quality"]["random_fd_q05_q95"][1]
            and row["quality"]["ranked_class_acc"] >= row["quality"]["random_class_acc_q05_q95"][0]
        )
        out[f"{k:g}%"] = row
    # the criterion per group: some k <= 5% with p < 0.05 (all 20 draws leave more extracted) and quality in band
    verdict = {}
    for g in sorted(set(g_I)):
        hits = [
            kk for kk, row in out.items() if g in row and row[g]["p_value"] < 0.05 and row["quality"]["inside_band"]
        ]
        if any(g in row for row in out.values()):
            verdict[g] = {"holds": bool(hits), "at": hits}
    return {
        "edit": "zero the units (UnitMem-ranked: global ranking of each unit's max over the generated groups)",
        "random": f"{N_DRAWS} draws with the ranked edit's count of units in every block",
        "quality": "quality_many: 200 class-balanced samples per edit, FD[demo-fashion-cnn] and class accuracy",
        "by_k": out,
        "criterion_a": verdict,
    }


def measure_model(
    name: str,
    out_dir: Path,
    store: ResultStore,
    seed: int = 0,
    log: Log = _stderr_log,
    write: bool = True,
    adapter=None,
) -> dict:
    """Measure the shipped model `name` (or `adapter`) and, with `write`, store them as card["measurements"];
    returns them."""
    ad = adapter if adapter is not None else load_adapter(name, device="cpu")
    sel = data.select_demo(500, seed)
    timings = {}
    with Clock() as c:
        ext, ext_res, groups = extraction_part(ad, sel, store, seed)
    timings["extraction"] = c.to_dict()
    log(f"[{name} measure] extraction: {json.dumps({g: v['share'] for g, v in ext['by_group'].items()})}")
    with Clock() as c:
        um, um_res = unitmem_part(ad, sel, store, groups)
    timings["unitmem"] = c.to_dict()
    with Clock() as c:
        loc = localize_part(ad, sel, store, ext_res, groups, seed, log)
    timings["localize"] = c.to_dict()
    with Clock() as c:
        attr = attribution_part(ad, sel, groups, ext["prefix_tokens"])
    timings["attribution"] = c.to_dict()
    with Clock() as c:
        crit = criterion_a(ad, sel, store, ext_res, um_res, groups, seed, log)
    timings["criterion_a"] = c.to_dict()
    q = intervention.quality(ad, None, n_samples=1000, seed=seed, store=store)
    m = {
        "data": sel.name,
        "n_images": len(sel),
        "extraction": ext,
        "unitmem": um,
        "localization": loc,
        "attribution": attr,
        "edits": crit,
        "quality": {k: q[k] for k in ("fd", "fd_metric", "class_acc", "n_samples")},
        "timings": timings,
        "command": "python -m iarmem_core train-demo --only measure",
    }
    m["summary"] = {
        "extracted_share": {g: v["share"] for g, v in ext["by_group"].items()},
        "n_min_median": {g: v["n_min_median"] for g, v in loc["by_group"].items()},
        "top10_argmax_ratio": um["top10_argmax_ratio_vs_share"],
        "criterion_a": crit["criterion_a"],
        "class_acc": q["class_acc"],
        "fd": q["fd"],
    }
    add_patterns(m, ad.spec.family)
    if not write:
        return m
    path = Path(out_dir) / name / "card.json"
    card = json.loads(path.read_text())
    card["measurements"] = m
    path.write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    log(f"[{name} measure] {json.dumps(_json_safe(m['summary']))}")
    return m
