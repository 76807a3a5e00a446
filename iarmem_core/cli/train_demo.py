"""`iarmem train-demo`: re-create the demo world v2 (data bundle, demo-var, demo-rar, demo-var-ctl, their cards and
measurements) on CPU from Debian's Fashion-MNIST and the shipped tokenizers and feature net."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HELP = "re-create the demo world (data bundle, demo-var, demo-rar, demo-var-ctl, cards) on CPU"
PARTS = ("data", "var", "rar", "ctl", "calibrate", "measure")
EXTRA_PARTS = ("features",)  # not part of the default run: the FeatureNet is reused


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iarmem_core.registry import ASSETS

    p.add_argument(
        "--only",
        action="append",
        choices=PARTS + EXTRA_PARTS,
        help="run only this part (repeatable); default: all, in the order " + ", ".join(PARTS) + " (features: "
        "retrain the FeatureNet of the quality metrics, only when asked)",
    )
    p.add_argument("--out", default=str(ASSETS), help="assets folder to write (default: the repository's assets/)")
    p.add_argument("--work", default="runs/world", help="working folder (per-epoch weights, stores, logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        choices=(1, 2),
        help="2 (default): demo-var and demo-rar side by side in two processes (one thread each); 1: "
        "one after the other",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _child(args: argparse.Namespace, part: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "iarmem_core",
        "train-demo",
        "--only",
        part,
        "--out",
        str(args.out),
        "--work",
        str(args.work),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--jobs",
        "1",
        "--json",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr: progress


def run(args: argparse.Namespace) -> int:
    import torch

    from iarmem_core.demo import world
    from iarmem_core.demo.bundle import build_demo_bundle
    from iarmem_core.demo.train import Clock, _json_safe
    from iarmem_core.store import ResultStore

    torch.set_num_threads(args.threads)
    parts = list(args.only or PARTS)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"seed": args.seed, "parts": {}}
    with Clock() as total:
        if "features" in parts:
            from iarmem_core.demo.train import FeatureNetTrainConfig, train_features

            with Clock() as c:
                fcard = train_features(out, FeatureNetTrainConfig(), args.seed)
            report["parts"]["features"] = {"timing": c.to_dict(), "heldout_accuracy": fcard["heldout_accuracy"]}
        if "data" in parts:
            with Clock() as c:
                split = build_demo_bundle(out / "demo_data", seed=args.seed)
            report["parts"]["data"] = {"timing": c.to_dict(), "items": split["items_per_kind"]}
        models = [m for m in ("var", "rar") if m in parts]
        if args.jobs == 2 and len(models) == 2:
            procs = [(m, _child(args, m)) for m in models]
            for m, proc in procs:
                o, _ = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"train-demo: the {m} process failed (exit {proc.returncode}); its error is "
                        f"above. Re-run it alone with --only {m}."
                    )
                report["parts"].update(json.loads(o.strip().splitlines()[-1])["parts"])
        else:
            plans = world.default_plans()
            for m in models:
                with Clock() as c:
                    card = world.build_model(plans[f"demo-{m}"], out, work, args.seed)
                report["parts"][f"demo-{m}"] = {
                    "timing": c.to_dict(),
                    "chosen_epoch": card["checkpoint_choice"]["chosen_epoch"],
                }
        if "ctl" in parts:
            with Clock() as c:
                card = world.build_control(out, work, seed=args.seed)
            report["parts"]["demo-var-ctl"] = {"timing": c.to_dict(), "curve_last": card["curve"][-1]}
        if "calibrate" in parts:
            for name in ("demo-var", "demo-rar", "demo-var-ctl"):
                with Clock() as c:
                    world.calibrate_card(name, out, ResultStore(work / "calibration"), args.seed)
                report["parts"][f"calibrate {name}"] = {"timing": c.to_dict()}
        if "measure" in parts:
            from iarmem_core.demo import measure

            for name in ("demo-var-ctl", "demo-var", "demo-rar"):
                with Clock() as c:
                    m = measure.measure_model(name, out, ResultStore(work / "measure"), seed=args.seed)
                report["parts"][f"measure {name}"] = {"timing": c.to_dict(), "summary": m.get("summary")}
    report["timing"] = total.to_dict()
    if args.json:
        print(json.dumps(_json_safe(report)))
    else:
        for part, r in report["parts"].items():
            print(f"{part}: {json.dumps(_json_safe(r))}")
        print(f"total: {json.dumps(report['timing'])}")
    return 0
