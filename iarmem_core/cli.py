"""python -m iarmem_core <command>: the same functions and store as the app.

Commands: models, identify, unitmem (and, as they land: extract, intervene, sample, train-demo).
With --json each command prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable

# command -> (module, add_arguments, run); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "unitmem": ("iarmem_core.cli", "_unitmem_args", "_unitmem_run"),
    "models": ("iarmem_core.cli", "_models_args", "_models_run"),
    "identify": ("iarmem_core.cli", "_identify_args", "_identify_run"),
    "extract": ("iarmem_core.extraction", "add_arguments", "run_cli"),
    "intervene": ("iarmem_core.intervention", "add_arguments", "run_cli"),
    "sample": ("iarmem_core.intervention", "add_sample_arguments", "run_sample_cli"),
    "train-demo": ("iarmem_core.demo.train", "add_arguments", "run"),
}
HELP = {
    "unitmem": "localize memorization: streaming UnitMem per block and scale / position",
    "models": "list the registry (released, demo and test configs)",
    "identify": "say what a checkpoint file is (family, component, likely registry model)",
    "extract": "training-data extraction attack: candidates, greedy generation from a prefix, similarity counts",
    "intervene": "edit the top-k% UnitMem units: extraction and quality before/after, random control, --sweep",
    "sample": "class-conditional samples as a PNG grid, unedited and with the top-k% units edited",
    "train-demo": "re-create the demo assets (feature net, demo-var, demo-rar) on CPU from the bundled data",
}


# ---- shared options ------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo-var", help="registry name (see `models`), e.g. demo-var, var-d16")
    p.add_argument("--checkpoint", help="transformer weights (.pth/.pt/.bin/.safetensors) for --model")
    p.add_argument("--tokenizer-checkpoint", help="tokenizer weights for --model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)


def add_data_args(p: argparse.ArgumentParser, n_default: int | None = 500) -> None:
    p.add_argument("--data", default="demo", help="'demo' (bundled Fashion-MNIST) or an ImageFolder path")
    p.add_argument("--split", default="train", help="demo split: train, heldout, planted, unique")
    p.add_argument("--n", type=int, default=n_default, help="number of images (class-stratified)")
    p.add_argument("--fraction", type=float, help="folder data: class-stratified fraction instead of --n")
    p.add_argument("--per-class", type=int, help="folder data: images per class instead of --n")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="result store folder (default $IARMEM_STORE or ./store)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--force", action="store_true", help="recompute even if the result is stored")


def load_model(args: argparse.Namespace):
    from iarmem_core.adapters import load_adapter

    return load_adapter(args.model, checkpoint=args.checkpoint, tokenizer_checkpoint=args.tokenizer_checkpoint,
                        device=args.device, seed=args.seed)


def load_data(args: argparse.Namespace, image_size: int):
    from iarmem_core import data

    if args.data == "demo":
        return data.select_demo(n=args.n, seed=args.seed, split=args.split)
    if args.fraction is not None:
        return data.load_image_folder(args.data, image_size, fraction=args.fraction, seed=args.seed)
    if args.per_class is not None:
        return data.load_image_folder(args.data, image_size, per_class=args.per_class, seed=args.seed)
    return data.load_image_folder(args.data, image_size, count=args.n, seed=args.seed)


def get_store(args: argparse.Namespace):
    from iarmem_core.store import ResultStore, get_store

    return ResultStore(args.store) if args.store else get_store()


def progress_printer(label: str) -> Callable[[float, str], None]:
    state = {"last": -1}

    def show(frac: float, msg: str) -> None:
        pct = int(100 * frac)
        if pct != state["last"]:
            state["last"] = pct
            print(f"\r[{label}] {pct:3d}% {msg}", end="", file=sys.stderr, flush=True)
            if pct >= 100:
                print(file=sys.stderr)

    return show


def emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}")


# ---- models / identify ---------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=("var", "rar", "llamagen"))
    p.add_argument("--json", action="store_true")


def _models_run(args: argparse.Namespace) -> int:
    from iarmem_core.registry import all_specs

    rows = [{"name": s.name, "family": s.family, "kind": s.kind, "image_size": s.image_size,
             "files": s.files, "description": s.description}
            for s in all_specs() if args.family in (None, s.family)]
    if args.json:
        print(json.dumps({"models": rows}))
    else:
        for r in rows:
            print(f"{r['name']:22s} {r['family']:9s} {r['kind']:9s} {r['description']}")
    return 0


def _identify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true")


def _identify_run(args: argparse.Namespace) -> int:
    from iarmem_core import checkpoints

    sd = checkpoints.read_state_dict(args.path)
    info = checkpoints.identify(sd)
    info["likely_models"] = checkpoints._likely_models(info)
    info["n_tensors"] = len(sd)
    info["n_parameters"] = int(sum(v.numel() for v in sd.values() if v.is_floating_point()))
    emit(info, args.json)
    return 0


# ---- unitmem -------------------------------------------------------------------------------------
def _unitmem_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    add_output_args(p)
    p.add_argument("--augs", type=int, default=10, help="A views per image (view 0 is the image itself)")
    p.add_argument("--augmentation", default="default",
                   help="default (the model's), none, shift, crop, flip, crop+flip")
    p.add_argument("--rest", default="mean", choices=("mean", "median"))
    p.add_argument("--detail", default="position",
                   help="finer groups inside --detail-scales: comma list of position,row, or none")
    p.add_argument("--detail-scales", default="all",
                   help="scales (0 = coarsest) that get the finer groups: 'all', 'none' or e.g. 3,4")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--top", type=int, default=10, help="top units to list")


def _unitmem_run(args: argparse.Namespace) -> int:
    from iarmem_core import unitmem

    model = load_model(args)
    image_set = load_data(args, model.image_size)
    detail = tuple(k.strip() for k in args.detail.split(",") if k.strip() and k.strip() != "none")
    scales = None if args.detail_scales == "all" else (
        () if args.detail_scales == "none" else tuple(int(s) for s in args.detail_scales.split(",")))
    cfg = unitmem.UnitMemConfig(n_augs=args.augs, augmentation=args.augmentation, rest=args.rest,
                                group_kinds=("scale",) + detail, detail_scales=scales,
                                batch_size=args.batch_size, dtype=args.dtype, seed=args.seed)
    res = unitmem.run_unitmem(model, image_set, cfg, store=get_store(args), force=args.force,
                              on_progress=progress_printer("unitmem"))
    out = unitmem.summarize(res, top=args.top, kinds=("scale", "row") if "row" in detail else ("scale",))
    out["skipped_files"] = image_set.report.get("skipped", {}) if image_set.report else {}
    emit(out, args.json)
    return 0


# ---- entry ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iarmem_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, add, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=HELP.get(name, ""))
        getattr(importlib.import_module(mod), add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mod, _add, run = COMMANDS[args.command]
    from iarmem_core.checkpoints import CheckpointError
    from iarmem_core.data import PathNotAllowedError

    try:
        return int(getattr(importlib.import_module(mod), run)(args) or 0)
    except (CheckpointError, PathNotAllowedError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if getattr(args, "json", False):
            print(json.dumps({"error": msg, "type": type(e).__name__}))
        print(f"error: {msg}", file=sys.stderr)
        return 2
