"""Backends: throughput of 1 vs 2 Ray CPU workers on a scoring job, and a FLOP-based estimate for N GPUs.

    PYTHONPATH=$PWD python bench/backends.py [--n 384] [--model demo-var] [--skip-ray]

Prints one JSON object:

- "scoring": the candidate-scoring job (memscore: one teacher-forced forward per aligned block of 32 images) of
  `--model` on `--n` demo images, run by the local backend (this process, one thread) and by the ray backend with
  1 and 2 CPU actors (one CPU each) of a private Ray instance (in a loopback-only network namespace where
  `unshare -n` is allowed, else bound to 127.0.0.1). Throughput is images / the time from the first block handed
  out to the last merge (the actors' start-up and model load are reported apart); "ratio_2_vs_1" is the
  speed-up of the second worker; "bit_identical" compares the three results. On a shared 2-core machine the
  ratio is bounded by the cores actually free (the load average is printed beside it).
- "estimate": FLOPs per image of VAR-d30 counted by torch's FlopCounterMode on meta tensors (nothing is
  allocated; matmuls, convolutions and attention, not element-wise ops) for the tokenizer's encoder and decoder
  and the teacher-forced forward, beside the rule of thumb 2 x params x tokens; then the hours for the three
  workloads of issue 18 on N = 1, 2, 4, 8 H200 at an assumed achieved fraction of the bf16 dense peak (stated
  per workload), plus the result traffic into the driver. (The FLOP counting lives here because
  iarmem_core/flops.py is being written elsewhere; the lead merges them.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

H200_BF16_DENSE_TFLOPS = 989.5  # NVIDIA H200 SXM, dense bf16 tensor-core peak
IMAGENET_TRAIN = 1_281_167


# ---- FLOP estimate ---------------------------------------------------------------------------------------------
def counted_flops(model: str = "var-d30") -> dict:
    """FLOPs per image (batch 1, 256 px) of the tokenizer and the teacher-forced forward, counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from iarmem_core.adapters import adapter_class
    from iarmem_core.registry import get_spec

    spec = get_spec(model)
    cls = adapter_class(spec.family)
    with torch.device("meta"):
        tok, tr = cls.build_tokenizer(spec), cls.build_transformer(spec)
    ad = cls(spec, tok.eval(), tr.eval(), torch.device("meta"))
    x = torch.zeros(1, 3, spec.image_size, spec.image_size, device="meta")
    out = {"model": model, "params_transformer": sum(p.numel() for p in tr.parameters())}
    out["params_tokenizer"] = sum(p.numel() for p in tok.parameters())
    out["tokens_per_image"] = int(ad.n_tokens)
    with torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            toks = ad.tokenize(x)
        out["tokenize_flops"] = int(fc.get_total_flops())
        fc = FlopCounterMode(display=False)
        with fc:
            ad.teacher_forced_logits(toks, torch.zeros(1, dtype=torch.long, device="meta"))
        out["teacher_forced_flops"] = int(fc.get_total_flops())
        fc = FlopCounterMode(display=False)
        with fc:
            ad.decode(toks)
        out["decode_flops"] = int(fc.get_total_flops())
    out["rule_of_thumb_2PT_flops"] = int(2 * out["params_transformer"] * out["tokens_per_image"])
    L, C = spec.transformer["depth"], spec.transformer["embed_dim"]
    out["units_per_block"] = int(C * spec.transformer["mlp_ratio"])
    out["blocks"] = int(L)
    return out


def unitmem_payload(units: int, groups: int, top_k: int = 5) -> int:
    """Bytes of one UnitMem block's statistics (BlockStats) for `units` units (all blocks) and `groups` groups."""
    return units * groups * (4 + 8 + 4 + 8) + units * groups * top_k * (4 + 8)


def estimate(f: dict, gpus=(1, 2, 4, 8)) -> dict:
    """Hours per workload on N GPUs from the counted FLOPs and an assumed achieved fraction of peak."""
    n_scales = 10
    units = f["units_per_block"] * f["blocks"]
    workloads = {
        "scoring_imagenet_train": {
            "what": f"teacher-forced scoring of the {IMAGENET_TRAIN:,} ImageNet training images (tokenize + forward)",
            "images": IMAGENET_TRAIN,
            "flops_per_image": f["tokenize_flops"] + f["teacher_forced_flops"],
            "fraction_of_peak": 0.35,
            "driver_bytes_per_image": 15 * 4,  # [G=15 score groups] float32 per image
        },
        "quality_sweep_50k": {
            "what": "50,000 generated samples with CFG (two rows per sample, KV cache: each token's forward once) "
            "+ decode; the feature network for FID is negligible",
            "images": 50_000,
            "flops_per_image": 2 * f["teacher_forced_flops"] + f["decode_flops"],
            "fraction_of_peak": 0.20,  # KV-cache generation is memory-bound at small scales: assumed lower
            "driver_bytes_per_image": 256 * 256 * 3,  # the image (uint8) or its features
        },
        "unitmem_1pct_x10_views": {
            "what": "UnitMem on 1% of ImageNet (12,812 images) x 10 views: tokenize + teacher-forced forward per "
            "view, per-group means of |activations| (negligible)",
            "images": 12_812 * 10,
            "flops_per_image": f["tokenize_flops"] + f["teacher_forced_flops"],
            "fraction_of_peak": 0.35,
            # a block's payload does not depend on its size: [L, G, U] max (f32) + argmax (i64) + ties (i32) + sum
            # (f64) + the top-5 of the S scale groups (f32 + i64), G = S = 10; per view-image at 16 images a block
            "driver_bytes_per_image": unitmem_payload(units, n_scales) / (16 * 10),
            "driver_bytes_per_image_block128": unitmem_payload(units, n_scales) / (128 * 10),
        },
    }
    out = {}
    for name, w in workloads.items():
        total = w["images"] * w["flops_per_image"]
        rate = H200_BF16_DENSE_TFLOPS * 1e12 * w["fraction_of_peak"]
        out[name] = {
            **w,
            "total_pflop": round(total / 1e15, 1),
            "hours": {str(n): round(total / (n * rate) / 3600, 3) for n in gpus},
            "driver_traffic_gb": round(w["images"] * w["driver_bytes_per_image"] / 1e9, 2),
        }
        if "driver_bytes_per_image_block128" in w:
            out[name]["driver_traffic_gb_block128"] = round(w["images"] * w["driver_bytes_per_image_block128"] / 1e9, 2)
    return {
        "assumptions": {
            "gpu": "NVIDIA H200 SXM",
            "peak_bf16_dense_tflops": H200_BF16_DENSE_TFLOPS,
            "fraction_of_peak": "stated per workload (achieved / peak); bf16 forward; scaling over N GPUs is "
            "linear (blocks are independent; per-actor start-up of ~1 min to load the model is left out)",
            "flops": "torch FlopCounterMode on meta tensors: matmuls, convolutions, attention",
        },
        "per_image": f,
        "workloads": out,
    }


# ---- throughput of 1 vs 2 CPU workers ----------------------------------------------------------------------------
def _scores(backend, model: str, n: int) -> tuple[np.ndarray, dict, float]:
    from iarmem_core import data
    from iarmem_core.adapters import load_adapter
    from iarmem_core.extraction import memorization_scores
    from iarmem_core.store import ResultStore

    ad = load_adapter(model, device="cpu")
    ds = data.select_demo(n=n, seed=0)
    with tempfile.TemporaryDirectory(prefix="iarmem-bench-") as d:
        store = ResultStore(d)
        t = time.perf_counter()
        acc, meta = memorization_scores(ad, ds, store=store, batch_size=32, force=True, backend=backend)
        wall = time.perf_counter() - t
        return acc, store.load(meta["store_key"])[1]["execution"], wall


def throughput(model: str, n: int) -> dict:
    from iarmem_core.backends.ray_backend import RayBackend

    torch.set_num_threads(1)
    out: dict = {"model": model, "n_images": n, "block": 32, "threads_per_worker": 1}
    acc_local, ex, wall = _scores(None, model, n)
    out["local"] = {"images_per_s": round(n / ex["blocks_s"], 2), "wall_s": round(wall, 2)}
    accs = [acc_local]
    for k in (1, 2):
        rb = RayBackend(workers=k, gpus_per_worker=0, cpus_per_worker=1, num_cpus=2, num_gpus=0, wait_all=True)
        acc, ex, wall = _scores(rb, model, n)
        accs.append(acc)
        out[f"ray_{k}_worker"] = {
            "images_per_s": round(n / ex["blocks_s"], 2),
            "blocks_s": ex["blocks_s"],
            "wall_s": round(wall, 2),
            "workers_setup_s": [w["setup_s"] for w in ex["worker_info"]],
            "blocks_per_worker": [w["blocks_sent"] for w in ex["worker_info"]],
        }
    out["ratio_2_vs_1"] = round(out["ray_2_worker"]["images_per_s"] / out["ray_1_worker"]["images_per_s"], 3)
    out["bit_identical"] = all(np.array_equal(accs[0], a) for a in accs[1:])
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return out


def gpu_check(models: list[str], n: int) -> dict:
    """On a CUDA machine: bf16 scoring throughput with the local backend (random weights: timing only) and, with
    Ray installed, two actors sharing the GPU (gpus_per_worker=0.5) on the same job, compared bit for bit."""
    from iarmem_core import data
    from iarmem_core.adapters import load_adapter
    from iarmem_core.extraction import memorization_scores
    from iarmem_core.store import ResultStore

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    out: dict = {"gpu": torch.cuda.get_device_name(0), "n_images": n, "dtype": "bf16", "block": 32, "models": {}}
    ds = data.select_demo(n=n, seed=0)
    for model in models:
        row: dict = {}
        t = time.perf_counter()
        ad = load_adapter(model, device="cuda", dtype=torch.bfloat16)
        row["load_s"] = round(time.perf_counter() - t, 1)
        flops = counted_flops(model)
        per_image = flops["tokenize_flops"] + flops["teacher_forced_flops"]
        memorization_scores(ad, ds.subset(np.arange(32)), store=ResultStore(tempfile.mkdtemp()), force=True)  # warm
        torch.cuda.synchronize()
        t = time.perf_counter()
        acc_local, _ = memorization_scores(ad, ds, store=ResultStore(tempfile.mkdtemp()), force=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        row["local"] = {
            "images_per_s": round(n / dt, 1),
            "achieved_tflops": round(n * per_image / dt / 1e12, 1),
            "fraction_of_bf16_peak": round(n * per_image / dt / 1e12 / H200_BF16_DENSE_TFLOPS, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        try:
            import ray  # noqa: F401
        except ImportError:
            row["ray"] = {"skipped": "ray is not installed (pip install -r requirements-ray.txt)"}
        else:
            from iarmem_core.backends.ray_backend import RayBackend

            rb = RayBackend(workers=2, gpus_per_worker=0.5, cpus_per_worker=1, num_gpus=1, wait_all=True)
            acc_ray, meta = memorization_scores(ad, ds, store=ResultStore(tempfile.mkdtemp()), force=True, backend=rb)
            ex = meta.get("execution") or {}
            row["ray_two_actors_one_gpu"] = {"bit_identical_to_local": bool(np.array_equal(acc_local, acc_ray))}
            row["ray_two_actors_one_gpu"].update({k: ex.get(k) for k in ("blocks_s", "devices", "worker_info")})
            if ex.get("blocks_s"):
                row["ray_two_actors_one_gpu"]["images_per_s"] = round(n / ex["blocks_s"], 1)
        out["models"][model] = row
        del ad
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-var")
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--skip-ray", action="store_true", help="only the FLOP estimate")
    ap.add_argument("--gpu", nargs="*", metavar="MODEL", help="the GPU check (bench/ray_gpu_check.sh) on these models")
    ap.add_argument("--_inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu is not None:
        print(json.dumps({"bench": "backends-gpu", **gpu_check(args.gpu or ["var-d16", "var-d30"], args.n)}, indent=1))
        return
    if args._inner:  # inside the namespace: only the throughput part, as JSON on stdout
        print(json.dumps(throughput(args.model, args.n)))
        return
    report = {
        "bench": "backends",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "estimate": estimate(counted_flops("var-d30")),
    }
    if not args.skip_ray:
        from tests.support.ray_cluster import cluster_env, in_loopback_namespace

        me = [sys.executable, "-u", str(Path(__file__).resolve()), "--_inner"]
        cmd, ns = in_loopback_namespace(me + sys.argv[1:])
        env = cluster_env()
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            report["scoring"] = {"error": r.stderr[-3000:]}
        else:
            report["scoring"] = {**json.loads(lines[-1]), "loopback_namespace": ns}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
