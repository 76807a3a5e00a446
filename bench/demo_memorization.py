"""Memorization and quality of the shipped demo models; prints one JSON object.

    python bench/demo_memorization.py [--models demo-var,demo-rar] [--n-unique 1000] [--threads 2]

Layout: {"assets_mb": ..., "models": {"demo-var": M, "demo-rar": M}} where M has
- groups: planted_<count>x per duplication count, unique, heldout; each with n, token_acc (teacher-forced
  top-1 accuracy over all tokens), reproduced (greedy generation, top-1 and no CFG, from the first
  `main_prefix_tokens` true tokens: SSIM of the decoded generation to the tokenizer's reconstruction above
  `threshold`), exact_match (every generated token equal to the image's own), token_match_mean, ssim_mean,
  and by_prefix with the same numbers for every reported prefix length;
- similarity ("ssim"), threshold and threshold_calibration (how the threshold was set: at most 1% of
  known-different nearest-neighbour pairs of training images exceed it);
- recon_ssim_heldout (tokenizer reconstruction of the 1000 held-out images), sample_class_acc (bundled
  classifier on class-conditional samples with the model's CFG settings), fd_samples_heldout (Frechet
  distance of those samples to the held-out images in the bundled demo-fashion-cnn feature space; not FID).

Everything runs on the weights as shipped (fp16 files loaded through the registry), on CPU (--device picks
another). ``flops`` per model: the model FLOPs of every tokenize / teacher forcing / generation / decode of
the measurement (`iarmem_core.flops.Meter`), per part, against the fp32 peak of the device (a large matmul
timed at the start and the end of this run, the better of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from iarmem_core.adapters import load_adapter
from iarmem_core.demo import train as dt
from iarmem_core.registry import ASSETS

ROOT = Path(__file__).resolve().parent.parent


def assets_mb() -> float:
    """Size of the demo weights and the data bundle in MB (what the 30 MB budget covers)."""
    files = [p for d in ("demo_data", "demo-var", "demo-rar") for p in (ASSETS / d).glob("*") if p.is_file()]
    files += [p for p in ASSETS.glob("demo-fashion-cnn.*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo-var,demo-rar")
    ap.add_argument("--n-unique", type=int, default=1000, help="unique training images (0: all 3970)")
    ap.add_argument("--n-heldout", type=int, default=0, help="held-out images (0: all 1000)")
    ap.add_argument("--samples-per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from iarmem_core import flops

    peak = flops.measure_peak(args.device)
    plans = {p.spec.name: p for p in dt.default_plans().values()}
    fnet = dt.load_demo_feature_net()
    out: dict = {"assets_mb": assets_mb(), "models": {}}
    t0 = time.perf_counter()
    for name in args.models.split(","):
        plan = plans[name]
        cfg = dt.MeasureConfig(
            n_unique=args.n_unique or None, n_heldout=args.n_heldout or None, samples_per_class=args.samples_per_class
        )
        model = load_adapter(name, device=args.device)
        t = time.perf_counter()
        with flops.Meter(model) as meter:
            out["models"][name] = dt.measure_demo_model(model, fnet, plan.prefixes, plan.main_prefix, cfg)
        out["models"][name]["flops"] = (meter, time.perf_counter() - t)
    peak = flops.best_peak(peak, flops.measure_peak(args.device))  # start and end: the better of the two
    for rec in out["models"].values():
        meter, wall = rec["flops"]
        rec["flops"] = meter.report(wall, peak)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["torch_threads"] = torch.get_num_threads()
    out["loadavg_1min"] = round(os.getloadavg()[0], 2)
    out["device"] = args.device
    out["peak"] = peak
    print(json.dumps(out))


if __name__ == "__main__":
    main()
