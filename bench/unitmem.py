"""UnitMem pass cost: overhead over a plain teacher-forced pass, peak memory vs data size, throughput.

For each model:
- overhead_ratio: time of the UnitMem pass (hooks, |a|, group means, running max/argmax/sum/top-k) over
  the time of the same tokenize + teacher-forced forwards without any hook, on the same batches and
  views (`UnitMemPass.views_of`: for a finite augmentation family such as the demo models' flip, the exact
  family, 2 views; --random-views: --augs seeded views) (target <= 1.2);
- peak_mem_mb_small / peak_mem_mb_large: peak resident memory (CPU) or peak allocated (CUDA) of a full
  UnitMem pass over N and 10 N images, each in a fresh subprocess (target: within 10% of each other,
  since the state is O(units x groups));
- images_per_s: images (each with A views) per second in the UnitMem pass;
- flops: model FLOPs of the plain pass (tokenize + teacher forcing of every view, `iarmem_core.flops`), the
  achieved FLOP/s of both passes and their fraction of this machine's peak (a large matmul timed in the same
  worker process before and after the passes, the better of the two; the bf16 peak for --dtype bf16).

--dtype bf16 runs the UnitMem pass (and the plain pass) under bf16 autocast, as `UnitMemConfig(dtype="bf16")`
(a GPU option; tests/test_gpu.py compares it with fp32).

Models: demo-var and demo-rar (bundled weights), and var-d16-random (the VAR-d16 config with seeded
random weights; only the scale groups, as the CLI's `--detail-scales none`).

    python bench/unitmem.py                      # all three, CPU (and CUDA when present)
    python bench/unitmem.py --models demo-var --n-small 20 --augs 4

Prints one JSON object keyed by model.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {  # bench name -> (registry name, image count small, detail groups, views per image on CPU)
    "demo-var": ("demo-var", 50, True, 10),
    "demo-rar": ("demo-rar", 50, True, 10),
    "var-d16-random": ("var-d16", 2, False, 2),  # 310M parameters, 680 tokens: CPU time is the limit
}


def _entry(name: str) -> tuple:
    """Any other registry name works too (detail groups, 20 images, --augs views)."""
    return MODELS.get(name, (name, 20, True, None))


def _config(detail: bool, augs: int, batch: int, dtype: str = "fp32"):
    from iarmem_core.unitmem import UnitMemConfig

    return UnitMemConfig(
        n_augs=augs,
        group_kinds=("scale", "position") if detail else ("scale",),
        batch_size=batch,
        top_images=5,
        dtype=dtype,
        exact_views=not RANDOM_VIEWS[0],
    )


RANDOM_VIEWS = [False]  # --random-views: --augs seeded random views even for a finite family (the CLI's flag)


def _selection(n: int):
    """n demo training images: all planted plus a stratified sample when n >= 30, else n unique ones."""
    from iarmem_core import data

    return data.select_demo(n=n, seed=0) if n >= 30 else data.load_demo("unique").subset(range(n))


def _timing(name: str, n: int, augs: int, batch: int, device: str, reps: int, dtype: str = "fp32") -> dict:
    """Plain teacher-forced pass vs UnitMem pass on the same batches and views."""
    import contextlib

    import torch

    from iarmem_core import flops
    from iarmem_core.adapters import load_adapter
    from iarmem_core.unitmem import UnitMemPass

    reg, _, detail, _ = _entry(name)
    m = load_adapter(reg, device=device)
    cfg = _config(detail, augs, batch, dtype)
    ds = _selection(n)
    batches = []
    for s in range(0, len(ds), batch):
        idx = list(range(s, min(len(ds), s + batch)))
        batches.append((ds.images(idx, size=m.image_size), ds.labels_tensor(idx), [ds.ids[i] for i in idx]))
    probe = UnitMemPass(m, len(ds), cfg)  # the plain pass iterates exactly the views the UnitMem pass sees

    def sync():
        if m.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast():
        if dtype == "bf16":
            return torch.autocast(m.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def plain():
        with autocast():
            for x, y, keys in batches:
                for view in probe.views_of(x, keys):
                    m.teacher_forced_logits(m.tokenize(view), y.to(m.device))

    def with_unitmem():
        p = UnitMemPass(m, len(ds), cfg)
        for x, y, keys in batches:
            p.step(x, y, keys)
        return p

    pdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak0 = flops.measure_peak(m.device, pdtype)
    plain()  # warm-up (allocator, kernels)
    t_plain, t_um = [], []
    for _ in range(reps):  # interleave so both see the same machine load
        sync()
        t = time.perf_counter()
        plain()
        sync()
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        with_unitmem()
        sync()
        t_um.append(time.perf_counter() - t)
    p_s, u_s = min(t_plain), min(t_um)
    per_image = probe.views["n"]
    views = len(ds) * per_image
    work = flops.tokenize_flops(reg, views) + flops.teacher_forced_flops(reg, views)
    peak = flops.best_peak(peak0, flops.measure_peak(m.device, pdtype))  # before and after: the better
    return {
        "plain_s": round(p_s, 3),
        "unitmem_s": round(u_s, 3),
        "overhead_ratio": round(u_s / p_s, 3),
        "images_per_s": round(len(ds) / u_s, 2),
        "n_images_timed": len(ds),
        "augs": augs,
        "views_per_image": per_image,  # exact families (none, flip) have fewer members than --augs
        "random_views": RANDOM_VIEWS[0],
        "batch": batch,
        "groups": len(UnitMemPass(m, 1, cfg).plan.groups),
        "blocks": m.n_blocks,
        "units_per_block": m.n_units,
        "device": str(m.device),
        "dtype": dtype,
        "flops": {
            "plain": flops.fraction(work, p_s, peak),
            "unitmem": flops.fraction(work, u_s, peak),
            "what": "model FLOPs of tokenizing and teacher-forcing every view (UnitMem's own reductions not counted)",
        },
    }


def _memory(name: str, n: int, augs: int, batch: int, device: str, dtype: str = "fp32") -> dict:
    """A full UnitMem pass over n images; reports the peak memory of this process."""
    import torch

    from iarmem_core.adapters import load_adapter
    from iarmem_core.unitmem import UnitMemPass

    reg, _, detail, _ = _entry(name)
    m = load_adapter(reg, device=device)
    cfg = _config(detail, augs, batch, dtype)
    ds = _selection(n)
    if m.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    p = UnitMemPass(m, len(ds), cfg)
    for s in range(0, len(ds), batch):
        idx = list(range(s, min(len(ds), s + batch)))
        p.step(ds.images(idx, size=m.image_size), ds.labels_tensor(idx), [ds.ids[i] for i in idx])
    p.finish()
    if m.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mem_mb": round(peak, 1), "n_images": len(ds)}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--augs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-small", type=int, help="override the small data size (the large one is 10x)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="UnitMem precision (bf16: autocast)")
    ap.add_argument(
        "--random-views",
        action="store_true",
        help="seeded random views (--augs of them) instead of the exact family (flip: 2 views), as `unitmem "
        "--random-views`; the per-image statistics are then shared by more forwards",
    )
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    RANDOM_VIEWS[0] = args.random_views
    if args._worker:
        kind, name = args._worker.split(":", 1)
        if kind == "time":
            rec = _timing(name, args._n, args.augs, args.batch, args.device, args.reps, args.dtype)
        else:
            rec = _memory(name, args._n, args.augs, args.batch, args.device, args.dtype)
        print(json.dumps(rec))
        return

    results = {}
    import torch as _t

    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and _t.cuda.is_available())
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        _, n_def, _, augs_cpu = _entry(name)
        augs = args.augs if (on_gpu or augs_cpu is None or args.augs != 10) else augs_cpu
        n_small = args.n_small or n_def
        # both data sizes run full batches, so the peak compares the accumulator, not the batch's activations
        batch = min(args.batch, n_small)
        common = [
            "--augs",
            str(augs),
            "--batch",
            str(batch),
            "--reps",
            str(args.reps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
            *(["--random-views"] if args.random_views else []),
        ]
        rec = _sub(["--_worker", f"time:{name}", "--_n", str(n_small), *common])
        small = _sub(["--_worker", f"mem:{name}", "--_n", str(n_small), *common])
        large = _sub(["--_worker", f"mem:{name}", "--_n", str(10 * n_small), *common])
        rec.update(
            {
                "peak_mem_mb_small": small.get("peak_mem_mb"),
                "peak_mem_mb_large": large.get("peak_mem_mb"),
                "n_small": small.get("n_images"),
                "n_large": large.get("n_images"),
            }
        )
        if small.get("peak_mem_mb") and large.get("peak_mem_mb"):
            rec["peak_mem_large_over_small"] = round(large["peak_mem_mb"] / small["peak_mem_mb"], 3)
        errors = [r["error"] for r in (small, large) if "error" in r]
        if errors:
            rec["error"] = errors[0]
        results[name] = rec
    results["_host"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cuda": torch.cuda.is_available(),
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
