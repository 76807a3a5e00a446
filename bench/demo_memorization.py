"""The demo world's measurements of the shipped models, re-measured; prints one JSON object.

    python bench/demo_memorization.py [--models demo-var-ctl,demo-var,demo-rar] [--store /tmp/s] [--threads 2]

For every model: `iarmem_core.demo.measure.measure_model` without writing the card (the numbers the model cards
hold: extraction per group at the card's calibrated threshold, UnitMem's top-unit argmax shares and
planted-minus-twin map, per-image minimal sets, the attribution map, criterion (a) with 20 random draws and the
quality band), its wall time, and ``flops``: the model FLOPs of every tokenize / teacher forcing / generation /
decode (`iarmem_core.flops.Meter`) against the fp32 peak of the device (a large matmul timed at the start and
the end of the run, the better of the two). Results are reused from --store when there (a fresh folder
measures from scratch). ``assets_mb``: the demo weights, data bundle and FeatureNet (the 40 MB budget).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from iarmem_core.adapters import load_adapter
from iarmem_core.registry import ASSETS
from iarmem_core.store import ResultStore

DIRS = ("demo_data", "demo-var", "demo-rar", "demo-var-ctl")


def assets_mb() -> float:
    """Size of the demo weights, the data bundle and the FeatureNet in MB."""
    files = [p for d in DIRS for p in (ASSETS / d).glob("*") if p.is_file()]
    files += [p for p in ASSETS.glob("demo-fashion-cnn.*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def main() -> None:
    from iarmem_core import flops
    from iarmem_core.demo import measure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo-var-ctl,demo-var,demo-rar")
    ap.add_argument("--store", default=None, help="result store (default: a fresh temporary folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="iarmem-bench-"))
    peak = flops.measure_peak("cpu")
    out: dict = {"assets_mb": assets_mb(), "store": str(root), "models": {}}
    t0 = time.perf_counter()
    for name in args.models.split(","):
        t = time.perf_counter()
        model = load_adapter(name, device="cpu")
        with flops.Meter(model) as meter:
            m = measure.measure_model(name, ASSETS, ResultStore(root), seed=args.seed, write=False, adapter=model)
        out["models"][name] = {"summary": m["summary"], "timings": m["timings"], "wall_s": time.perf_counter() - t}
        out["models"][name]["flops"] = meter
    peak = flops.best_peak(peak, flops.measure_peak("cpu"))
    for rec in out["models"].values():
        rec["flops"] = rec["flops"].report(rec["wall_s"], peak)
        rec["wall_s"] = round(rec["wall_s"], 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["torch_threads"] = torch.get_num_threads()
    out["loadavg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
