"""Greedy generation throughput with and without the KV cache, and peak memory, per model/batch/device.

Every configuration runs in a fresh subprocess, so its peak memory (ru_maxrss on CPU, which includes the
weights; torch.cuda.max_memory_allocated during generation on CUDA) is its own. Models get seeded
random weights (`load_adapter(name)` without files), which is all a speed measurement needs.

    python bench/generation.py --models var-d16                 # CPU, and CUDA when available
    python bench/generation.py --models var-d16 --quick         # batch 1 only
    python bench/generation.py --models var-d16,rar-b --batches 1,8 --reps 3 --devices cpu

Prints one JSON object: {"results": [record, ...], "peak": {device: ...}, "host": {...}, "args": {...}}; a
record has model, batch, device, kv_cache, images_per_s, tokens_per_s, peak_mem_mb (and seconds, n_tokens,
load_s) and flops (the generation's model FLOPs from `iarmem_core.flops`, achieved FLOP/s and the fraction of
the device's peak: an fp32 matmul timed at the start and the end of this run with the same threads, the
better of the two), or model, batch, device, kv_cache
and error when that configuration could not run. --device is --devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "var-d16,rar-b,llamagen-b-256"


def _worker(model: str, batch: int, device: str, kv_cache: bool, reps: int, warmup: int, threads: int) -> dict:
    """Measure one configuration in this process; returns its record."""
    import torch

    from iarmem_core.adapters import load_adapter

    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t0 = time.perf_counter()
    m = load_adapter(model, device=dev)
    load_s = time.perf_counter() - t0
    labels = torch.arange(batch) % m.num_classes

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        m.generate(labels, cfg=0.0, top_k=1, kv_cache=kv_cache)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        m.generate(labels, cfg=0.0, top_k=1, kv_cache=kv_cache)
        sync()
        times.append(time.perf_counter() - t)
    sec = min(times)  # the least disturbed repetition
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "model": model,
        "batch": batch,
        "device": device,
        "kv_cache": kv_cache,
        "images_per_s": batch / sec,
        "tokens_per_s": batch * m.n_tokens / sec,
        "peak_mem_mb": round(peak_mb, 1),
        "seconds": sec,
        "n_tokens": m.n_tokens,
        "load_s": round(load_s, 2),
        "reps": reps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }


def _run_one(model: str, batch: int, device: str, kv: bool, args: argparse.Namespace) -> dict:
    warmup = args.warmup if args.warmup >= 0 else (1 if device.startswith("cuda") else 0)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--models",
        model,
        "--batches",
        str(batch),
        "--devices",
        device,
        "--kv",
        "on" if kv else "off",
        "--reps",
        str(args.reps),
        "--warmup",
        str(warmup),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = {"model": model, "batch": batch, "device": device, "kv_cache": kv}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**base, "error": f"exit {p.returncode}: {tail[0][:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated registry names ({DEFAULT_MODELS})")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--devices", "--device", default="auto", help="cpu, cuda, or auto = cpu plus cuda when available")
    ap.add_argument("--kv", choices=("both", "on", "off"), default="both", help="KV cache on, off or both")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions per configuration (the fastest counts)")
    ap.add_argument("--warmup", type=int, default=-1, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration before giving up")
    ap.add_argument("--quick", action="store_true", help="batch 1 only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        rec = _worker(
            args.models,
            int(args.batches),
            args.devices,
            args.kv == "on",
            args.reps,
            args.warmup,
            args.threads,
        )
        print(json.dumps(rec))
        return 0

    import torch

    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
    )
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    kvs = {"both": [True, False], "on": [True], "off": [False]}[args.kv]
    from iarmem_core import flops

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    peaks = {d: flops.measure_peak(d) for d in devices}
    results = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for device in devices:
            for batch in batches:
                for kv in kvs:
                    rec = _run_one(model, batch, device, kv, args)
                    results.append(rec)
                    print(json.dumps(rec), file=sys.stderr, flush=True)  # progress
    peaks = {d: flops.best_peak(peaks[d], flops.measure_peak(d)) for d in devices}  # start and end: the better
    for rec in results:
        if "seconds" in rec:
            work = flops.generate_flops(rec["model"], rec["batch"], prefix=0, kv_cache=rec["kv_cache"])
            rec["flops"] = flops.fraction(work, rec["seconds"], peaks[rec["device"]])
    host = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg": os.getloadavg(),
    }
    print(json.dumps({"results": results, "peak": peaks, "host": host, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
