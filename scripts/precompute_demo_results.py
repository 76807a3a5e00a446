"""Precompute the results the app shows first and ship them in assets/store (a read-only fallback store).

For every demo model (demo-var, demo-rar) this runs the app's default analyses exactly as the app and the CLI
key them: UnitMem on the demo selection (500 images, seed 0) with the app's overview groups, its null control
(plus 500 never-trained images) and its class-controlled variant, the extraction attack with its defaults
(plus the held-out control), the localization of every extracted image and their union, the unedited model's
quality samples, the default edit's measurement (top 10%, factor 0.5, 20 random draws), the trade-off sweep and
the dose-response curves.
The results are computed in (or taken from) a working store, then copied to assets/store/results/<key>/,
and assets/store/index.json lists them. tests/app/test_shipped_store.py fails when a shipped key no
longer matches what the current code would compute, so rerun this script after changing a model, the data,
the configs or the code version:

    python scripts/precompute_demo_results.py                  # all demo models, working store ./store
    python scripts/precompute_demo_results.py --models demo-var --store /tmp/s
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from iarmem_app import config
from iarmem_core import data, dose, extraction, intervention, localize, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore

REPO = Path(__file__).resolve().parent.parent

SEED = 0
MAX_MB = 24.0  # the shipped store stays within the demo assets' 40 MB (weights, data and results together)


def _wait(handle) -> None:
    handle.wait()
    if handle.state != "done":
        raise RuntimeError(f"{handle.key}: {handle.status().get('error')}")


def default_keys(name: str, store: ResultStore, sweep: bool = True) -> list[dict]:
    """The (kind, key, runner) of every result the app shows first for model `name`."""
    adapter = load_adapter(name, device="cpu", seed=SEED)
    sel = data.select_demo(n=config.N_IMAGES, seed=SEED)
    cfg = unitmem.default_config(adapter, seed=SEED)
    um_key = unitmem.result_key(adapter, sel, cfg, store)
    out = [
        {
            "model": name,
            "kind": unitmem.KIND,
            "key": um_key,
            "run": lambda: unitmem.run_unitmem(adapter, sel, cfg, store=store),
        }
    ]
    # the Memorization page's controls: the null control (D' + as many never-trained images) and rest = class
    nsel = data.select_demo_with_null(n=config.N_IMAGES, n_heldout=config.N_IMAGES, seed=SEED)
    out.append(
        {
            "model": name,
            "kind": unitmem.KIND,
            "key": unitmem.result_key(adapter, nsel, cfg, store),
            "run": lambda: unitmem.run_unitmem(adapter, nsel, cfg, store=store),
        }
    )
    ccfg = replace(cfg, rest="class")
    out.append(
        {
            "model": name,
            "kind": unitmem.KIND,
            "key": unitmem.result_key(adapter, sel, ccfg, store),
            "run": lambda: unitmem.run_unitmem(adapter, sel, ccfg, store=store),
        }
    )
    ecfg = extraction.ExtractionConfig(seed=SEED)
    ekey = extraction.extraction_key(adapter, sel, ecfg, store=store)
    out.append(
        {
            "model": name,
            "kind": extraction.KIND,
            "key": ekey,
            "run": lambda: extraction.run_extraction(adapter, sel, ecfg, store=store),
        }
    )
    # "Which units carry this image?" for every extracted image, and their union
    lcfg = localize.LocalizeConfig(seed=SEED)

    def loc_all():
        return localize.localize_all(adapter, sel, lcfg, store=store)

    def loc_key():
        ids = extraction.run_extraction(adapter, sel, ecfg, store=store).extracted_ids()
        return localize.localize_all_key(adapter, sel, lcfg, ids, store)

    out.append(
        {
            "model": name,
            "kind": localize.ALL_KIND,
            "key": loc_key,
            "run": loc_all,
            "also": lambda: [r["store_key"] for r in loc_all()["images"]],
        }
    )
    if not sweep:
        return out

    def um_result():
        return unitmem.run_unitmem(adapter, sel, cfg, store=store)

    # the intervention page's first view: the unedited model's quality samples (every edit's measurement
    # compares with them), the default edit's numbers and the trade-off curve
    qspec = intervention.quality_spec(
        adapter,
        None,
        n_samples=intervention.DEFAULT_N_SAMPLES,
        feature_space=None,
        reference_set=None,
        seed=SEED,
        sampling=None,
    )
    out.append(
        {
            "model": name,
            "kind": intervention.QUALITY_KIND,
            "key": store.key(intervention.QUALITY_KIND, qspec, intervention.QUALITY_VERSION),
            "run": lambda: intervention.quality(adapter, None, seed=SEED, store=store),
        }
    )
    kw = dict(top_percent=10.0, units=None, factor=0.5, op="fc1_scale", ranking="global", seed=SEED)
    res0 = unitmem.UnitMemResult({}, {"store_key": um_key})
    out.append(
        {
            "model": name,
            "kind": intervention.MEASURE_KIND,
            "key": intervention.measurement_key(adapter, res0, sel, store, **kw),
            "run": lambda: _wait(intervention.start_measurement(adapter, um_result(), sel, store, **kw)),
        }
    )
    args = {**intervention.sweep_defaults(), "seed": SEED}
    out.append(
        {
            "model": name,
            "kind": intervention.SWEEP_KIND,
            "key": intervention.sweep_key(adapter, res0, sel, store, **args),
            "run": lambda: intervention.run_sweep(adapter, um_result(), sel, store=store, **args),
        }
    )
    # the dose-response curves (the copies the attack extracts, four selections of units)
    dcfg = dose.CurveConfig(localize=localize.LocalizeConfig(seed=SEED))
    out.append(
        {
            "model": name,
            "kind": dose.KIND,
            "key": lambda: dose.dose_response_key(adapter, sel, res0, dcfg, store),
            "run": lambda: dose.run_dose_response(adapter, sel, um_result(), dcfg, store=store),
        }
    )
    return out


def _ship(work: ResultStore, out: Path, item: dict, name: str, t0: float, index: list) -> None:
    src, dst = work.result_dir(item["key"]), out / "results" / item["key"]
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for lock in dst.rglob(".lock"):
        lock.unlink()  # the working store's writer lock; the shipped store is read-only
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    index.append(
        {"model": name, "kind": item["kind"], "key": item["key"], "bytes": size, "seconds": round(time.time() - t0, 1)}
    )
    print(f"[{name}] {item['kind']} {item['key']}: {size / 1e6:.2f} MB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="default: the app's demo models")
    p.add_argument("--store", default=str(REPO / "store"), help="working store (results are reused from it)")
    p.add_argument("--out", default=str(config.SHIPPED_STORE))
    p.add_argument("--no-sweep", action="store_true", help="skip the intervention measurements (slow on CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = args.models or config.quick_models()
    work = ResultStore(args.store)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    index = []
    for name in models:
        for item in default_keys(name, work, sweep=not args.no_sweep):
            t0 = time.time()
            if callable(item["key"]):
                item["key"] = item["key"]()
            if not work.exists(item["key"]):
                print(f"[{name}] computing {item['kind']} {item['key']} ...", file=sys.stderr, flush=True)
                item["run"]()
            extra = [{**item, "key": k, "kind": k.rsplit("-", 1)[0]} for k in item.get("also", lambda: [])()]
            for it in [item] + extra:
                _ship(work, out, it, name, t0, index)
    keep = {e["key"] for e in index}

    for d in (out / "results").iterdir():
        if d.name not in keep:
            shutil.rmtree(d)  # results of older code or models: stale
    total = sum(e["bytes"] for e in index) / 1e6
    (out / "index.json").write_text(
        json.dumps({"seed": SEED, "n_images": config.N_IMAGES, "entries": index}, indent=1) + "\n"
    )
    print(json.dumps({"models": models, "entries": len(index), "total_mb": round(total, 2)}))
    if total > MAX_MB:
        print(
            f"warning: the shipped store is {total:.1f} MB (> {MAX_MB} MB); keep the repository small", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
