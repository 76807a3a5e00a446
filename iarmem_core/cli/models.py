"""`iarmem models` (the registry) and `iarmem identify FILE` (what a checkpoint file is)."""

from __future__ import annotations

import argparse
import json

from iarmem_core.cli import common

HELP = "list the registry (released, demo and test configs)"
IDENTIFY_HELP = "say what a checkpoint file is (family, component, likely registry model)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=("var", "rar", "llamagen"))
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from iarmem_core.registry import all_specs

    rows = [
        {
            "name": s.name,
            "family": s.family,
            "kind": s.kind,
            "image_size": s.image_size,
            "files": s.files,
            "description": s.description,
        }
        for s in all_specs()
        if args.family in (None, s.family)
    ]
    if args.json:
        print(json.dumps({"models": rows}))
    else:
        for r in rows:
            print(f"{r['name']:22s} {r['family']:9s} {r['kind']:9s} {r['description']}")
    return 0


def add_identify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


def run_identify(args: argparse.Namespace) -> int:
    from iarmem_core import checkpoints

    sd = checkpoints.read_state_dict(args.path)
    info = checkpoints.identify(sd)
    info["likely_models"] = checkpoints.likely_models(info)
    info["n_tensors"] = len(sd)
    info["n_parameters"] = int(sum(v.numel() for v in sd.values() if v.is_floating_point()))
    common.emit(info, args.json)
    return 0
