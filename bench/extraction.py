"""Extraction attack at hardware speed: cached references, bf16 decodes, and every figure against the limit.

Sections (--sections, comma separated; all by default), each a key of the printed JSON:

- ``target``: the end-to-end attack on --target-model (var-d16, seeded random weights) with --target-candidates
  candidates in batches of --target-batch, in ONE process, the variants run interleaved (paired, same load):
  ``uncached`` (the pipeline before the cache: every batch tokenizes its candidates and decodes their
  reconstruction, fp32 decodes, the transformer on PyTorch's own fp32 GEMM, MKL), ``cached_fp32`` (references
  from the store, MKL; bit-identical to uncached), ``cached_fp32_onednn`` (the same on oneDNN's fp32 GEMM,
  `iarmem_core.models.linear`: fp32 noise apart, the same tokens) and ``cached_bf16`` (references from the
  store, oneDNN, bf16 decodes with the fp32 recheck near the thresholds: what the attack runs by default with
  ``decode_dtype="bf16"``).
  Each is `extraction.run_extraction` (force=True, no held-out images) on the first candidates of the demo
  selection resized to the model's size; the scores (a teacher-forced pass) and the references are computed
  once before the timed runs, as every run after the first finds them stored (their cold cost is reported:
  ``references_cold_s``). ``speedup_vs_uncached`` = uncached / cached_bf16 seconds, ``same_decisions``: every
  row's decision for every measure at the attack's thresholds equal to uncached. When fewer candidates than
  --target-full are measured, ``extrapolated`` scales the per-candidate times linearly (every batch has the
  same shapes, so the same cost) and says so.
- ``demo_attack``: the demo attack (`ExtractionConfig()`: 50 candidates + 200 held-out images, default prefix)
  on demo-var and demo-rar, cold (fresh store with the shipped UnitMem pass) and again with the references
  stored (an edited run); seconds and the share of generation / tokenizer / similarity (the attack's phases).
- ``edit_measurement``: `intervention.run_intervention` on demo-var (top 5% units, x0.5) with --random-draws
  random draws (default 20): seconds, the share of time in generation / tokenizer / similarity / other
  (measured by timing the adapter's methods and the similarity code), and how many references were computed.
- ``sweep``: a prefix sweep (8, 16, 24, 32 tokens) of the 50 demo candidates on demo-rar: one shared prefill
  (`generate_prefixes`) against one generation per prefix, seconds and whether the tokens are equal.
- ``throughput``: candidates per second of `attack_batch` (uncached, fp32) at --batches, KV cache on and off
  (skipped when predicted over --budget-s).

Every timed workload carries ``flops``: model FLOPs (`iarmem_core.flops`, counted on the meta device: matmuls,
convolutions, attention; the metered calls of the run), achieved FLOP/s, and the fraction of this machine's
peak (``peak``: a large fp32 and bf16 matmul timed at the start and at the end of this run, the better of the
two; on the CPU the fp32 peak is the faster of MKL's and oneDNN's GEMM, both in ``by_gemm``; the transformer
counts against the fp32 peak, bf16 decodes against the bf16 one). ``host`` has the load
average at the start and the end (the machine is shared with other work).

    python bench/extraction.py --threads 2                              # everything (CPU: about an hour)
    python bench/extraction.py --sections target --target-candidates 16 --threads 2
    python bench/extraction.py --sections demo_attack,edit_measurement --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("target", "demo_attack", "edit_measurement", "sweep", "throughput")


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peaks(device: str) -> dict:
    import torch

    from iarmem_core import flops

    return {"fp32": flops.measure_peak(device, torch.float32), "bf16": flops.measure_peak(device, torch.bfloat16)}


def _flops(meter, seconds: float, peaks: dict, decode: str = "fp32") -> dict:
    """The metered model FLOPs (`flops.Meter`) of a workload; set against the limit at the end of the run
    (`_finish_flops`): the transformer and the encoder at the fp32 peak, the decodes at `decode`'s peak."""
    return {
        "model_flops": float(meter.total_flops),
        "seconds": round(seconds, 4),
        "parts": {
            k: {"flops": v, "seconds": round(meter.seconds[k], 3), "peak": decode if k == "decode" else "fp32"}
            for k, v in meter.flops.items()
        },
        "_pending": True,
    }


def _finish_flops(obj, peaks: dict) -> None:
    """Fill achieved FLOP/s and the fraction of the peak into every pending FLOP record of `obj` (in place)."""
    if isinstance(obj, list):
        for v in obj:
            _finish_flops(v, peaks)
        return
    if not isinstance(obj, dict):
        return
    if obj.pop("_pending", False):
        sec = obj["seconds"]
        at_peak = sum(p["flops"] / peaks[p["peak"]]["flops_per_s"] for p in obj["parts"].values())
        obj["achieved_flops_per_s"] = obj["model_flops"] / sec if sec > 0 else None
        obj["seconds_at_peak"] = round(at_peak, 4)
        obj["fraction_of_peak"] = round(at_peak / sec, 4) if sec > 0 else None
        obj["peak_how"] = {k: peaks[k]["how"] for k in sorted({p["peak"] for p in obj["parts"].values()})}
        for part in obj["parts"].values():
            if part.get("seconds"):
                rate = part["flops"] / part["seconds"]
                part["fraction_of_peak"] = round(rate / peaks[part["peak"]]["flops_per_s"], 4)
        return
    for v in obj.values():
        _finish_flops(v, peaks)


def _decisions(res) -> dict:
    """{measure: bool [R]} at the attack's thresholds."""
    return {m: res.decision(similarity=m) for m in res.meta["measures"]}


# ---------------------------------------------------------------------------------------------------
def target(args, peaks) -> dict:
    import numpy as np
    import torch

    from iarmem_core import data, extraction, flops
    from iarmem_core.adapters import load_adapter
    from iarmem_core.extraction import cache
    from iarmem_core.models import linear
    from iarmem_core.store import ResultStore

    m = load_adapter(args.target_model, device=args.device)
    pool = data.select_demo(n=max(args.target_candidates, 30), seed=0)
    sel = pool.subset(range(args.target_candidates), name=f"bench: first {args.target_candidates} of demo n=500")
    cfg = extraction.ExtractionConfig(candidate_ids=tuple(sel.ids), batch_size=args.target_batch, heldout=False, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="iarmem-bench-"))
    st = ResultStore(tmp / "store")
    out = {
        "model": args.target_model,
        "candidates_measured": len(sel),
        "batch": args.target_batch,
        "threads": torch.get_num_threads(),
        "device": str(m.device),
        "prefix_tokens": extraction.default_prefix(m),
        "what": "extraction.run_extraction(force=True) per variant, scores and references stored beforehand",
    }
    try:
        t = time.perf_counter()
        extraction.memorization_scores(m, sel, store=st, batch_size=max(args.target_batch, 32))
        out["scoring_cold_s"] = round(time.perf_counter() - t, 2)
        variants = {  # (config, cache, fp32 CPU GEMM of the transformer: iarmem_core.models.linear)
            "uncached": (cfg, False, "mkl"),
            "cached_fp32": (cfg, True, "mkl"),
            "cached_fp32_onednn": (cfg, True, "onednn"),
            "cached_bf16": (replace(cfg, decode_dtype="bf16"), True, "onednn"),
        }
        measures, _ = extraction.available_measures(m, cfg, None)
        out["references_cold_s"] = {}
        for precision in ("fp32", "bf16"):  # what the first cached run computes, once (the candidates' tokens
            t = time.perf_counter()  # come from the scoring pass)
            cache.references(
                m, sel, np.arange(len(sel)), measures=measures, batch_size=cfg.batch_size, precision=precision, store=st
            )
            out["references_cold_s"][precision] = round(time.perf_counter() - t, 2)
        times = {k: [] for k in variants}
        results = {}
        meters = {}
        for _ in range(args.reps):  # interleaved: each repetition runs every variant once
            for name, (c, use_cache, gemm) in variants.items():
                _sync(m.device)
                t = time.perf_counter()
                with linear.cpu_gemm(gemm), flops.Meter(m) as meter:
                    results[name] = extraction.run_extraction(m, sel, c, store=st, cache=use_cache, force=True)
                _sync(m.device)
                times[name].append(time.perf_counter() - t)
                if times[name][-1] == min(times[name]):
                    meters[name] = meter
        n = len(sel)
        base = results["uncached"]
        for name, ts in times.items():
            sec = min(ts)
            res = results[name]
            rec = {
                "seconds": round(sec, 2),
                "seconds_all": [round(x, 2) for x in ts],
                "per_candidate_s": round(sec / n, 3),
                "phases": res.meta["timings"]["phases"],
                "shares": res.meta["timings"]["shares"],
                "flops": _flops(meters[name], sec, peaks, "bf16" if "bf16" in name else "fp32"),
                "cpu_gemm": variants[name][2] if m.device.type == "cpu" else None,
            }
            if name != "uncached":
                same = {k: bool(np.array_equal(v, _decisions(base)[k])) for k, v in _decisions(res).items()}
                rec["same_decisions"] = same
                rec["max_abs_sim_diff"] = {
                    mm: float(np.abs(res.arrays[f"sim_{mm}"] - base.arrays[f"sim_{mm}"]).max())
                    for mm in res.meta["measures"]
                }
                rec["tokens_equal"] = bool(
                    np.array_equal(res.arrays["gen_tokens_RN"], base.arrays["gen_tokens_RN"])
                    and np.array_equal(res.arrays["true_tokens_RN"], base.arrays["true_tokens_RN"])
                )
                if name.startswith("cached_fp32"):  # mkl: the same kernels as uncached; onednn: fp32 noise apart
                    rec["bit_identical"] = all(np.array_equal(base.arrays[k], res.arrays[k]) for k in base.arrays)
                else:
                    rec["bf16_recheck"] = res.meta["bf16_recheck"]
            out[name] = rec
        out["speedup_vs_uncached"] = round(out["uncached"]["seconds"] / out["cached_bf16"]["seconds"], 3)
        out["speedup_cached_fp32_vs_uncached"] = round(out["uncached"]["seconds"] / out["cached_fp32"]["seconds"], 3)
        out["speedup_cached_fp32_onednn_vs_uncached"] = round(
            out["uncached"]["seconds"] / out["cached_fp32_onednn"]["seconds"], 3
        )
        out["same_decisions"] = all(all(out[k]["same_decisions"].values()) for k in variants if k != "uncached")
        out["tokens_equal"] = all(out[k]["tokens_equal"] for k in variants if k != "uncached")
        if n < args.target_full:
            k = args.target_full / n
            out["extrapolated"] = {
                "candidates": args.target_full,
                "how": f"linear: {n} measured candidates x {k:g} (same batch shapes, so the same cost per batch); "
                "the cold references scale the same way; the speedup is the measured ratio",
                **{f"{name}_s": round(out[name]["seconds"] * k, 1) for name in variants},
                "speedup_vs_uncached": out["speedup_vs_uncached"],
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------
def _shipped_store(tmp: Path):
    from iarmem_core.registry import ASSETS
    from iarmem_core.store import ResultStore

    shutil.copytree(ASSETS / "store", tmp / "store")
    return ResultStore(tmp / "store")


def demo_attack(args, peaks) -> dict:
    from iarmem_core import data, extraction, flops, hooks
    from iarmem_core.adapters import load_adapter

    out = {}
    sel = data.select_demo(n=500, seed=0)
    for name in ("demo-var", "demo-rar"):
        m = load_adapter(name, device=args.device)
        tmp = Path(tempfile.mkdtemp(prefix="iarmem-bench-"))
        try:
            st = _shipped_store(tmp)
            cfg = extraction.ExtractionConfig(seed=0)
            rec = {}
            edit = hooks.UnitEdit({0: tuple(range(0, m.n_units, 7))}, factor=0.5)
            for what, kw in (("cold", {"force": True}), ("references_stored", {"edit": edit})):
                _sync(m.device)
                t = time.perf_counter()
                with flops.Meter(m) as meter:
                    res = extraction.run_extraction(m, sel, cfg, store=st, **kw)
                _sync(m.device)
                sec = time.perf_counter() - t
                c = res.count()
                n = len(res.table)
                rec[what] = {
                    "seconds": round(sec, 2),
                    "timings": res.meta["timings"],
                    "rows": n,
                    "extracted": c["extracted"],
                    "flops": _flops(meter, sec, peaks),
                }
            out[name] = rec
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------
def edit_measurement(args, peaks) -> dict:
    from iarmem_core import data, flops, intervention, unitmem
    from iarmem_core.adapters import load_adapter
    from iarmem_core.extraction import attack as attack_mod

    m = load_adapter("demo-var", device=args.device)
    sel = data.select_demo(n=500, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="iarmem-bench-"))
    real_sims, sim_s = attack_mod.compute_similarities, [0.0]

    def timed_sims(*a, **kw):
        t = time.perf_counter()
        try:
            return real_sims(*a, **kw)
        finally:
            sim_s[0] += time.perf_counter() - t

    try:
        st = _shipped_store(tmp)
        um = unitmem.run_unitmem(m, sel, unitmem.default_config("demo-var", seed=0), store=st)
        attack_mod.compute_similarities = timed_sims
        n_ref0 = len(st.list(kind="reference"))
        t = time.perf_counter()
        with flops.Meter(m) as meter:
            res = intervention.run_intervention(
                m, um, sel, top_percent=5.0, store=st, random_draws=args.random_draws, n_samples=args.edit_samples
            )
        wall = time.perf_counter() - t
        n_ref = len(st.list(kind="reference")) - n_ref0
    finally:
        attack_mod.compute_similarities = real_sims
        shutil.rmtree(tmp, ignore_errors=True)
    sec = meter.seconds
    parts = {
        "generation": sec.get("generate", 0.0),
        "tokenizer": sec.get("tokenize", 0.0) + sec.get("decode", 0.0),
        "teacher_forced": sec.get("teacher_forced", 0.0),
        "similarity": sim_s[0],
    }
    parts["other"] = wall - sum(parts.values())
    return {
        "model": "demo-var",
        "random_draws": args.random_draws,
        "n_samples_quality": args.edit_samples,
        "seconds": round(wall, 2),
        "seconds_by_part": {k: round(v, 2) for k, v in parts.items()},
        "shares": {k: round(v / wall, 4) for k, v in parts.items()},
        "extraction_runs": 2 + args.random_draws,
        "reference_entries_computed": n_ref,
        "extracted_before_after": [res.extracted_before, res.extracted_after],
        "random_extracted_mean": res.random_control.extracted_after_mean if res.random_control else None,
        "flops": _flops(meter, wall, peaks),
        "what": "generation = generate / generate_latent, tokenizer = tokenize + decodes (the attack's and the "
        "quality samples'), similarity = the attack's similarity code; other = quality metrics (feature net, FD, "
        "classifier), store, jobs. The extraction before the edit is the shipped result (not recomputed).",
    }


# ---------------------------------------------------------------------------------------------------
def sweep(args, peaks) -> dict:
    """A prefix sweep on the next-token demo model: one shared prefill vs one generation per prefix."""
    import torch

    from iarmem_core import data
    from iarmem_core.adapters import load_adapter
    from iarmem_core.adapters.base import IARAdapter

    out = {}
    for model in ("demo-rar",):
        m = load_adapter(model, device=args.device)
        sel = data.select_demo(n=50, seed=0)
        x = sel.images(range(len(sel)), size=m.image_size)
        labels = sel.labels_tensor(range(len(sel))).to(m.device)
        prefixes = [p for p in (8, 16, 24, 32) if p in m.prefix_choices]
        seeds = list(prefixes)
        with torch.inference_mode():
            toks = m.tokenize(x)
            times = {"shared_prefill": [], "one_per_prefix": []}
            res = {}
            for _ in range(max(args.reps, 2)):
                for name, fn in (("shared_prefill", m.generate_prefixes), ("one_per_prefix", None)):
                    _sync(m.device)
                    t = time.perf_counter()
                    if fn is None:
                        res[name] = IARAdapter.generate_prefixes(m, labels, toks, prefixes, seeds, top_k=1)
                    else:
                        res[name] = fn(labels, toks, prefixes, seeds, top_k=1)
                    _sync(m.device)
                    times[name].append(time.perf_counter() - t)
        out[model] = {
            "candidates": len(sel),
            "prefixes": prefixes,
            **{f"{k}_s": round(min(v), 3) for k, v in times.items()},
            "speedup": round(min(times["one_per_prefix"]) / min(times["shared_prefill"]), 3),
            "tokens_equal": all(
                torch.equal(a[0], b[0]) for a, b in zip(res["shared_prefill"], res["one_per_prefix"], strict=True)
            ),
            "what": "greedy generation of the 50 demo candidates from each prefix; the fastest of the rounds",
        }
    return out


# ---------------------------------------------------------------------------------------------------
def throughput(args, peaks) -> dict:
    import torch

    from iarmem_core import extraction
    from iarmem_core.adapters import load_adapter

    records = []
    for model in [s.strip() for s in args.models.split(",") if s.strip()]:
        try:
            m = load_adapter(model, device=args.device)
        except Exception as e:  # noqa: BLE001 - a missing demo asset is reported, not fatal
            records.append({"model": model, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        p = extraction.default_prefix(m)
        measures = ["token_match"] + (["ssim"] if m.image_size >= extraction.MIN_SSIM_SIZE else [])
        gen_kw = {"cfg": 0.0, "top_k": 1, "top_p": 0.0, "temperature": 1.0}
        for kv in (True, False):
            per_item = None
            for b in [int(x) for x in args.batches.split(",")]:
                rec = {"model": model, "batch": b, "kv_cache": kv, "prefix_tokens": p, "device": str(m.device)}
                if per_item is not None and per_item * b * args.reps > args.budget_s:
                    rec["skipped"] = f"predicted {per_item * b * args.reps:.0f} s > budget {args.budget_s:.0f} s"
                    records.append(rec)
                    continue
                g = torch.Generator().manual_seed(0)
                x = torch.rand(b, 3, m.image_size, m.image_size, generator=g)
                y = torch.arange(b) % m.num_classes
                extraction.attack_batch(m, x[:1], y[:1], [p], measures, gen_kw, kv_cache=kv)  # warm-up
                best, phases = None, None
                for _ in range(args.reps):
                    ph = {}
                    _sync(m.device)
                    t = time.perf_counter()
                    extraction.attack_batch(m, x, y, [p], measures, gen_kw, kv_cache=kv, timings=ph)
                    _sync(m.device)
                    sec = time.perf_counter() - t
                    if best is None or sec < best:
                        best, phases = sec, ph
                per_item = best / b
                from iarmem_core import flops

                f = flops.attack_flops(model, b, [p], cached_references=False)
                if not kv:
                    f["generate"] = flops.generate_flops(model, b, p, kv_cache=False)
                    f["total"] = sum(v for k, v in f.items() if k != "total")
                rec.update(
                    candidates_per_s=round(b / best, 3),
                    seconds=round(best, 3),
                    generate_s=round(phases.get("generate_s", 0.0), 3),
                    phases={k: round(v, 3) for k, v in phases.items()},
                    reps=args.reps,
                    flops={
                        "model_flops": float(f["total"]),
                        "seconds": round(best, 4),
                        "parts": {k: {"flops": v, "peak": "fp32"} for k, v in f.items() if k != "total"},
                        "_pending": True,
                    },
                )
                records.append(rec)
    ratios = []
    for r in records:
        if r.get("kv_cache") and "candidates_per_s" in r:
            no = [
                q
                for q in records
                if q.get("model") == r["model"] and q.get("batch") == r["batch"] and q.get("kv_cache") is False
            ]
            if no and "candidates_per_s" in no[0]:
                ratios.append(
                    {
                        "model": r["model"],
                        "batch": r["batch"],
                        "kv_speedup": round(r["candidates_per_s"] / no[0]["candidates_per_s"], 3),
                        "kv_speedup_generate_only": round(no[0]["generate_s"] / max(r["generate_s"], 1e-9), 3),
                    }
                )
    return {"results": records, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (target: interleaved rounds; the fastest counts)")
    ap.add_argument("--target-model", default="var-d16")
    ap.add_argument("--target-candidates", type=int, default=16, help="candidates measured (the target is 64)")
    ap.add_argument("--target-full", type=int, default=64, help="candidates the target is stated for")
    ap.add_argument("--target-batch", type=int, default=16)
    ap.add_argument("--random-draws", type=int, default=20)
    ap.add_argument("--edit-samples", type=int, default=1000, help="samples per quality measurement")
    ap.add_argument("--models", default="demo-var,demo-rar,var-d16", help="throughput: models")
    ap.add_argument("--batches", default="1,16,64", help="throughput: batch sizes")
    ap.add_argument("--budget-s", type=float, default=120.0, help="throughput: skip configurations predicted longer")
    args = ap.parse_args()
    import torch

    from iarmem_core import flops
    from iarmem_core.adapters.base import resolve_device

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))
    t0 = time.time()
    out = {"host": {"loadavg_at_start": os.getloadavg()}}
    out["peak"] = _peaks(args.device)
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
        t = time.time()
        try:
            out[name] = globals()[name](args, out["peak"])
        except Exception as e:  # noqa: BLE001 - one failed section is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        out[name]["section_wall_s"] = round(time.time() - t, 1)
    start_peaks = out.pop("peak")
    end_peaks = _peaks(args.device)  # a short window can fall on a busy moment of a shared machine: the best
    out["peak"] = {k: flops.best_peak(start_peaks[k], end_peaks[k]) for k in start_peaks}
    _finish_flops(out, out["peak"])
    out["host"].update(
        {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "cuda": torch.cuda.is_available(),
            "device": args.device,
            "wall_s": round(time.time() - t0, 1),
        }
    )
    out["args"] = vars(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
