"""`iarmem train-demo`: re-create the demo world (feature net, demo models, cards) on CPU from the bundled data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

HELP = "re-create the demo assets (feature net, demo-var, demo-rar) on CPU from the bundled data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iarmem_core.registry import ASSETS

    p.add_argument(
        "--only",
        action="append",
        choices=("var", "rar", "features"),
        help="train only this part (repeatable); default: features, var, rar",
    )
    p.add_argument("--out", default=str(ASSETS), help="assets folder to write (default: the repository's assets/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads of one process (the budget is 60 min on 2 cores in total)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        choices=(1, 2),
        help="2 (default): the feature net, then demo-var and demo-rar side by side in two "
        "processes, all on one thread each (on a busy 2-core machine one OpenMP thread per "
        "process is much faster than two threads in one); 1: one after the other with --threads",
    )
    p.add_argument("--epochs", type=int, help="override the transformer epochs of the chosen models")
    p.add_argument("--no-measure", action="store_true", help="skip the measurements in the model cards")
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="train nothing: measure the models in --out again and update their cards (e.g. after "
        "changing a sampling setting in the registry)",
    )
    p.add_argument("--json", action="store_true", help="print the timing report as one JSON object")


def _run_children(args: argparse.Namespace, families: Sequence[str]) -> dict:
    """Train `families` in parallel subprocesses (one thread each); returns their merged reports."""
    import subprocess

    procs = []
    for fam in families:
        cmd = [
            sys.executable,
            "-m",
            "iarmem_core",
            "train-demo",
            "--only",
            fam,
            "--out",
            str(args.out),
            "--seed",
            str(args.seed),
            "--threads",
            "1",
            "--jobs",
            "1",
            "--json",
        ]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.no_measure:
            cmd.append("--no-measure")
        procs.append((fam, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))  # stderr: progress
    parts, failed = {}, []
    for fam, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{fam} (exit {proc.returncode})")
            continue
        parts.update(json.loads(out.strip().splitlines()[-1])["parts"])
    if failed:
        raise RuntimeError(
            f"train-demo: the training process of {', '.join(failed)} failed; its error is "
            f"above. Re-run that part alone with --only."
        )
    return parts


def run(args: argparse.Namespace) -> int:
    import torch

    from iarmem_core.demo.train import Clock, _json_safe, default_plans, load_demo_feature_net, remeasure, train_demo

    torch.set_num_threads(args.threads)
    plans = default_plans()
    if args.epochs:
        plans = {
            k: dataclasses.replace(p, transformer=dataclasses.replace(p.transformer, epochs=args.epochs))
            for k, p in plans.items()
        }
    only = tuple(args.only or ("features", "var", "rar"))
    models = [f for f in ("var", "rar") if f in only]
    if args.measure_only:
        fnet = load_demo_feature_net(args.out)
        for fam in models:
            plan = next(p for p in plans.values() if p.spec.family == fam)
            card = remeasure(plan, Path(args.out), fnet)
            print(
                json.dumps({plan.spec.name: card["measurements"]})
                if args.json
                else f"{plan.spec.name}: {json.dumps(card['measurements']['groups'])}"
            )
        return 0
    if args.jobs == 2 and len(models) == 2:
        # the feature net trains first (the models' curves use it), on one thread as well: with a second busy
        # process on a 2-core machine, two OpenMP threads ran it 5x slower than one (320 s vs 62 s)
        torch.set_num_threads(1)
        with Clock() as total:
            report = train_demo(
                args.out,
                only=tuple(p for p in only if p == "features"),
                seed=args.seed,
                plans=plans,
                measure=not args.no_measure,
            )
            report["parts"].update(_run_children(args, models))
        report["timing"] = total.to_dict()
        report["parallel"] = "demo-var and demo-rar trained side by side, one thread each"
    else:
        report = train_demo(args.out, only=only, seed=args.seed, plans=plans, measure=not args.no_measure)
    if args.json:
        print(json.dumps(_json_safe(report)))
    else:
        for part, r in report["parts"].items():
            print(f"{part}: {json.dumps(_json_safe(r))}")
        print(f"total: {json.dumps(report['timing'])}")
    return 0
