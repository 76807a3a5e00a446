"""Extraction-attack throughput: candidates per second at several batch sizes, with and without the KV cache.

One candidate = what the attack does per image (`iarmem_core.extraction.attack_batch`): tokenize, decode
the reconstruction, greedy generation from the default prefix (the paper's 30 tokens: VAR 4 scales),
decode, and the similarities (token match, plus SSIM where the images are large enough). Candidates are
random images; full-size configs get seeded random weights, which is all a speed measurement needs.

A configuration whose predicted time (from the smaller batch already measured, scaled linearly) exceeds
--budget-s seconds is skipped and reported as such, so the whole run fits in a few minutes on a CPU.

    python bench/extraction.py                                   # demo-var, demo-rar, var-d16; batch 1,16,64
    python bench/extraction.py --models var-d16 --batches 1,16 --budget-s 300 --threads 2

Prints one JSON object: {"results": [record, ...], "ratios": [...], "host": {...}, "args": {...}}; a record
has model, batch, kv_cache, candidates_per_s, seconds (generate_s of them inside generate; the rest is
tokenize, two decodes and the similarities), prefix_tokens, n_tokens (or skipped / error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(model: str, batches: list[int], budget_s: float, reps: int, device: str) -> list[dict]:
    import torch

    from iarmem_core import extraction
    from iarmem_core.adapters import load_adapter

    try:
        m = load_adapter(model, device=device)
    except Exception as e:  # noqa: BLE001 - a missing demo asset is reported, not fatal
        return [{"model": model, "error": f"{type(e).__name__}: {str(e)[:300]}"}]
    p = extraction.default_prefix(m)
    measures = ["token_match"] + (["ssim"] if m.image_size >= extraction.MIN_SSIM_SIZE else [])
    gen_kw = {"cfg": 0.0, "top_k": 1, "top_p": 0.0, "temperature": 1.0}
    # time spent inside generate (the rest: tokenize, two decodes, similarities), via a wrapper on the instance
    gen_time = [0.0]
    real_generate = m.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return real_generate(*a, **kw)
        finally:
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            gen_time[0] += time.perf_counter() - t

    m.generate = timed_generate
    out = []
    for kv in (True, False):
        per_item = None  # seconds per candidate at the largest batch measured so far
        for b in batches:
            rec = {
                "model": model,
                "batch": b,
                "kv_cache": kv,
                "prefix_tokens": p,
                "n_tokens": m.n_tokens,
                "device": str(m.device),
            }
            if per_item is not None and per_item * b * reps > budget_s:
                rec["skipped"] = (
                    f"predicted {per_item * b * reps:.0f} s (from the smaller batch) > budget {budget_s:.0f} s"
                )
                out.append(rec)
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.rand(b, 3, m.image_size, m.image_size, generator=g)
            y = torch.arange(b) % m.num_classes
            extraction.attack_batch(m, x[:1], y[:1], [p], measures, gen_kw, kv_cache=kv)  # warm-up
            times, gtimes = [], []
            for _ in range(reps):
                gen_time[0] = 0.0
                if m.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                extraction.attack_batch(m, x, y, [p], measures, gen_kw, kv_cache=kv)
                if m.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                gtimes.append(gen_time[0])
            k = times.index(min(times))
            sec = times[k]
            per_item = sec / b
            rec.update(
                candidates_per_s=round(b / sec, 3), seconds=round(sec, 3), generate_s=round(gtimes[k], 3), reps=reps
            )
            out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo-var,demo-rar,var-d16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip a configuration predicted to take longer")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.time()
    results = []
    for model in args.models.split(","):
        results += measure(model.strip(), batches, args.budget_s, args.reps, args.device)
    ratios = []
    for r in results:
        if r.get("kv_cache") and "candidates_per_s" in r:
            no = [
                q
                for q in results
                if q.get("model") == r["model"]
                and q.get("batch") == r["batch"]
                and q.get("kv_cache") is False
                and "candidates_per_s" in q
            ]
            if no:
                ratios.append(
                    {
                        "model": r["model"],
                        "batch": r["batch"],
                        "kv_speedup": round(r["candidates_per_s"] / no[0]["candidates_per_s"], 3),
                        "kv_speedup_generate_only": round(no[0]["generate_s"] / r["generate_s"], 3),
                    }
                )
    host = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "cuda": torch.cuda.is_available(),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps({"results": results, "ratios": ratios, "host": host, "args": vars(args)}))


if __name__ == "__main__":
    main()
