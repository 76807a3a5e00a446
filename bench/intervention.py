"""Privacy vs quality of unit edits on a model (issue 7): the sweep and its ablations, as one JSON object.

For each variant (how units are localized and edited) and each k: the extraction count after editing the
top-k% UnitMem units and after editing random units of the same size and blocks, with FD and class
accuracy of samples. Every number is a stored job, so a rerun only computes what is missing.

Variants (--variants, comma separated):
  default      UnitMem with the model's training augmentation (10 views), global ranking, max over
               scales, fc1 rows x 0.5 (the paper's edit)
  no_aug       UnitMem on the images alone (1 view)
  per_block    the top k% of every block
  per_group    k% in total, taken in turn from each scale's (VAR) / row's (next-token) own ranking
  last_scale   VAR: rank by the last scale's UnitMem (the scale the candidates are scored on)
  zero         zero the units instead of halving their fc1 rows
  factor0.25   fc1 rows x 0.25
  a+b          both, e.g. last_scale+zero

The random control is drawn --random-draws times (default 20 on demo models, in one batched attack): each row
carries the draws' mean, min, max, 5-95% band, the ranked edit's rank and its one-sided p-value against them
(`intervention.random_draw_stats`).

--group-selectivity adds the ground-truth group diagnostic (demo): the top-k% units by how much more they fire for
the planted images than for the rest (`intervention.target_selectivity`), edited x0.5 and zeroed, with the
extraction count after each. It is not an oracle or an upper bound: per-image sets remove far more copies with
fewer units (iarmem_core.dose).

``flops``: the model FLOPs of every tokenize / teacher forcing / generation / decode the run made
(`iarmem_core.flops.Meter`; results already in the store cost nothing), per part with seconds, against the
fp32 peak of this machine (a large matmul timed at the start and the end, the better of the two).

    python bench/intervention.py --model demo-var
    python bench/intervention.py --model demo-rar --variants default,zero --top-percents 5,10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "default": {},
    "no_aug": {"n_augs": 1},
    "per_block": {"ranking": "per_block"},
    "per_group": {"ranking": "per_group", "group_kinds": ("scale", "row")},
    "last_scale": {"combine": -1},
    "zero": {"op": "zero"},
    "factor0.25": {"factor": 0.25},
    "factor0": {"factor": 0.0},
}


def variant(name: str) -> dict:
    """The options of a variant name; 'a+b' merges a and b."""
    out: dict = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        out.update(VARIANTS[part])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-var")
    ap.add_argument("--variants", default="default,no_aug,per_block,per_group,last_scale,zero")
    ap.add_argument("--top-percents", default="0,1,5,10,20")
    ap.add_argument("--n", type=int, default=500, help="data selection D' (demo: all planted + stratified)")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--candidates-per-class", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="result store (default $IARMEM_STORE or ./store)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument(
        "--group-selectivity", action="store_true", help="add the ground-truth (planted group) selectivity diagnostic"
    )
    ap.add_argument(
        "--random-draws", type=int, help="random-control draws per k (default: the model kind's, 20 on demo models)"
    )
    args = ap.parse_args()

    import torch

    from iarmem_core import data, extraction, flops, intervention, unitmem
    from iarmem_core.adapters import load_adapter
    from iarmem_core.store import ResultStore, get_store

    if args.threads:
        torch.set_num_threads(args.threads)
    st = ResultStore(args.store) if args.store else get_store()
    m = load_adapter(args.model, device=args.device)
    peak = flops.measure_peak(m.device)
    meter = flops.Meter(m).__enter__()  # every tokenize / teacher forcing / generation / decode of the run
    sel = data.select_demo(n=args.n, seed=args.seed)
    ks = [float(k) for k in args.top_percents.split(",")]
    ecfg = extraction.ExtractionConfig(candidates_per_class=args.candidates_per_class, seed=args.seed)
    t0 = time.time()
    before = extraction.run_extraction(m, sel, ecfg, store=st)
    out = {"model": args.model, "extraction_before": before.summary(), "variants": {}}
    for name in args.variants.split(","):
        v = variant(name)
        if v.get("combine") == -1 and len(m.token_grids) == 1:
            continue  # next-token models have one scale group
        ucfg = unitmem.UnitMemConfig(
            n_augs=v.pop("n_augs", 10), seed=args.seed, group_kinds=v.pop("group_kinds", ("scale",))
        )
        tu = time.time()
        um = unitmem.run_unitmem(m, sel, ucfg, store=st)
        combine = v.pop("combine", "max")
        if combine == -1:
            combine = len(um.meta["scale_groups"]) - 1
        df = intervention.run_sweep(
            m,
            um,
            sel,
            top_percents=ks,
            combine=combine,
            extraction_cfg=ecfg,
            n_samples=args.n_samples,
            seed=args.seed,
            store=st,
            random_draws=args.random_draws,
            **v,
        )
        rows = df[
            [
                "top_percent",
                "selection",
                "n_units",
                "extracted",
                "extracted_planted",
                "recall_planted_max_count",
                "fd",
                "class_acc",
                "random_draws",
                "random_extracted_mean",
                "random_extracted_min",
                "random_extracted_max",
                "p_value",
            ]
        ].to_dict(orient="records")
        out["variants"][name] = {
            "unitmem": {**ucfg.to_dict(), "store_key": um.meta["store_key"]},
            "edit": {
                "ranking": v.get("ranking", "global"),
                "combine": combine,
                "op": v.get("op", "fc1_scale"),
                "factor": v.get("factor", 0.5),
            },
            "sweep_key": df.attrs["store_key"],
            "rows": rows,
            "seconds": round(time.time() - tu, 1),
        }
    if args.group_selectivity:
        counts = [c or 1 for c in sel.meta["count"]]
        target = [c >= 16 for c in counts]  # the planted images the attack extracts (16x and 64x)
        to = time.time()
        sel_LU = intervention.target_selectivity(m, sel, target)
        blocks = [s.block for s in m.unit_sites()]
        rows = []
        for k in (k for k in ks if k > 0):
            units = intervention.top_units(sel_LU, k, blocks)
            for op, factor in (("fc1_scale", 0.5), ("zero", 0.0)):
                e = intervention.make_edit(units, op=op, factor=factor)
                c = extraction.run_extraction(m, sel, ecfg, store=st, edit=e).count()
                rows.append(
                    {
                        "top_percent": k,
                        "op": op,
                        "factor": factor,
                        "n_units": e.n_units,
                        "extracted": c["extracted"],
                        "extracted_planted": c.get("extracted_planted"),
                    }
                )
        out["group_selectivity"] = {
            "target": "planted images with count >= 16",
            "rows": rows,
            "seconds": round(time.time() - to, 1),
        }
    out["similarity"] = before.summary()["similarity"]
    out["threshold"] = before.summary()["threshold"]
    out["fd_metric"] = "FD[demo-fashion-cnn]"
    out["wall_s"] = round(time.time() - t0, 1)
    meter.__exit__(None, None, None)
    out["flops"] = meter.report(time.time() - t0, flops.best_peak(peak, flops.measure_peak(m.device)))
    out["flops"]["what"] = "model FLOPs of every adapter call of the run (stored jobs found in the store cost none)"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
