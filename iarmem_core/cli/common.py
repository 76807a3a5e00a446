"""Options shared by the commands, and the helpers every command uses (model, data, store, output)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np


# ---- option types: a bad value is an argparse error that names the option ---------------------------
def _int(text: str, lo: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, batch sizes)."""
    return _int(text, 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """An integer >= 0 (seeds, top-k where 0 means no truncation)."""
    return _int(text, 0, "an integer >= 0")


def finite_float(text: str, lo: float = -math.inf, hi: float = math.inf, what: str = "a finite number") -> float:
    """A finite float in [lo, hi]; NaN and infinity are refused."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def number(lo: float = -math.inf, hi: float = math.inf, what: str | None = None, open_lo: bool = False):
    """An argparse type: a finite float in [lo, hi] (or (lo, hi] with open_lo)."""
    desc = what or (
        "a finite number"
        if (lo, hi) == (-math.inf, math.inf)
        else f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]"
        if math.isfinite(hi)
        else f"a number {'>' if open_lo else '>='} {lo:g}"
    )

    def conv(text: str) -> float:
        v = finite_float(text, lo, hi, desc)
        if open_lo and v == lo:
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}")
        return v

    conv.__name__ = "number"
    return conv


# ---- shared options ------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo-var", help="registry name (see `models`), e.g. demo-var, var-d16")
    p.add_argument("--checkpoint", help="transformer weights (.pth/.pt/.bin/.safetensors) for --model")
    p.add_argument("--tokenizer-checkpoint", help="tokenizer weights for --model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=nonneg_int, default=0)


def add_data_args(p: argparse.ArgumentParser, n_default: int | None = 500, null: bool = False) -> None:
    p.add_argument("--data", default="demo", help="'demo' (bundled Fashion-MNIST) or an ImageFolder path")
    p.add_argument("--split", default="train", help="demo split: train, heldout, planted, unique")
    p.add_argument("--n", type=positive_int, default=n_default, help="number of images (class-stratified)")
    p.add_argument(
        "--fraction", type=number(0, 1, open_lo=True), help="folder data: class-stratified fraction instead of --n"
    )
    p.add_argument("--per-class", type=positive_int, help="folder data: images per class instead of --n")
    if null:
        p.add_argument(
            "--heldout",
            type=nonneg_int,
            default=0,
            help="null control: add this many never-trained images to D' (demo: its held-out split; "
            "folder data: from --heldout-folder)",
        )
        p.add_argument(
            "--heldout-folder",
            help="folder data: an ImageFolder of never-trained images (e.g. ImageNet val) for --heldout",
        )


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="result store folder (default $IARMEM_STORE or ./store)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--force", action="store_true", help="recompute even if the result is stored")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """Where the heavy blocks run: --backend local (this process, the default) or ray (a Ray cluster)."""
    p.add_argument(
        "--backend",
        default="local",
        choices=("local", "ray"),
        help="local: this process (default); ray: the blocks run on the actors of a Ray cluster "
        "(pip install -r requirements-ray.txt)",
    )
    p.add_argument(
        "--ray-address",
        help="with --backend ray (default $RAY_ADDRESS): http://HEAD:8265 submits the job through the Ray Jobs API "
        "and follows it (the store must be on a filesystem the cluster shares); HEAD:6379 or auto: this process "
        "is the driver on a node of the cluster; neither: a private local Ray instance on 127.0.0.1",
    )
    p.add_argument("--ray-workers", type=int, help="Ray actors (default: one per GPU, or per CPU without GPUs)")
    p.add_argument(
        "--ray-gpus-per-worker", type=float, help="GPUs per actor (default 1; 0.5 packs two small models per GPU)"
    )


def get_backend(args: argparse.Namespace):
    """The backend of --backend (None: local, the job runs in this process)."""
    if getattr(args, "backend", "local") != "ray":
        return None
    from iarmem_core.backends import get_backend as _get

    return _get(
        "ray",
        address=getattr(args, "ray_address", None),
        workers=getattr(args, "ray_workers", None),
        gpus_per_worker=getattr(args, "ray_gpus_per_worker", None),
    )


def jobs_api_address(args: argparse.Namespace) -> str | None:
    """The Jobs API address when this command is to be submitted to a cluster (--backend ray and an http://
    --ray-address or $RAY_ADDRESS), else None."""
    if getattr(args, "backend", "local") != "ray":
        return None
    from iarmem_core.backends.ray_jobs import is_jobs_address

    addr = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")
    return addr if is_jobs_address(addr) else None


BACKEND_DESTS = ("backend", "ray_address", "ray_workers", "ray_gpus_per_worker")


def argv_of(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> list[str]:
    """The command line of the parsed `args` (options that differ from their defaults), without `drop`."""
    from iarmem_core.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subs.choices[args.command]
    out: list[str] = [args.command]
    positional: list[str] = []
    for act in sub._actions:
        if act.dest in drop or act.dest == "help" or isinstance(act, argparse._HelpAction):
            continue
        v = getattr(args, act.dest, act.default)
        if not act.option_strings:
            positional += [str(x) for x in v] if isinstance(v, list) else [str(v)]
            continue
        if v == act.default or v is None:
            continue
        flag = next((o for o in act.option_strings if o.startswith("--")), act.option_strings[0])
        if isinstance(act, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(act, argparse._StoreFalseAction):
            out.append(flag)
        elif isinstance(act, argparse._AppendAction):
            for x in v:
                out += [flag, str(x)]
        else:
            out += [flag, str(v)]
    return out + positional


def submit_to_cluster(args: argparse.Namespace, address: str) -> int:
    """Submit this command to the Ray cluster at the Jobs API `address`, follow its progress on stderr and print
    the command's output (its --json object) when it ends. Ctrl-C stops the cluster job (resumable later)."""
    from iarmem_core.backends import ray_jobs

    store_root = os.environ.get("IARMEM_CLUSTER_STORE") or str(get_store(args).root.resolve())
    argv = argv_of(args, drop=BACKEND_DESTS + ("store",)) + ["--store", store_root]
    backend = {
        "workers": getattr(args, "ray_workers", None),
        "gpus_per_worker": getattr(args, "ray_gpus_per_worker", None),
    }
    sid = ray_jobs.submit(address, argv, backend=backend)
    print(f"submitted Ray job {sid} to {address} (store {store_root})", file=sys.stderr)
    show = progress_printer(args.command)

    def on_status(d: dict) -> None:
        if "progress" in d:
            show(float(d["progress"]), str(d.get("message") or ""))

    state, text = ray_jobs.follow(address, sid, on_status)
    out = ray_jobs.last_json(text)
    if out is not None:
        print(json.dumps(out))
    elif not getattr(args, "json", False):
        print(text[-4000:])
    if state != "SUCCEEDED":
        print(f"error: Ray job {sid} ended {state}; its logs: ray job logs {sid} --address {address}", file=sys.stderr)
        return 1
    return 0


def load_model(args: argparse.Namespace):
    from iarmem_core.adapters import load_adapter, resolve_device

    try:
        resolve_device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    return load_adapter(
        args.model,
        checkpoint=args.checkpoint,
        tokenizer_checkpoint=args.tokenizer_checkpoint,
        device=args.device,
        seed=args.seed,
    )


def load_data(args: argparse.Namespace, image_size: int):
    """D' from --data/--n/... (plus --heldout never-trained images when the command has that option)."""
    from iarmem_core import data

    n_null = int(getattr(args, "heldout", 0) or 0)
    if n_null < 0:
        raise ValueError(f"--heldout must be >= 0, got {n_null}")
    base = _load_base(args, image_size)
    if not n_null:
        return base
    if args.data == "demo":
        if args.split != "train":
            raise ValueError("--heldout adds never-trained images to training images: use it with --split train")
        return data.select_demo_with_null(n=args.n, n_heldout=n_null, seed=args.seed)
    if not getattr(args, "heldout_folder", None):
        raise ValueError(
            "--heldout on folder data needs --heldout-folder: an ImageFolder of never-trained images "
            "(e.g. ImageNet val)"
        )
    null = data.load_image_folder(args.heldout_folder, image_size, count=n_null, seed=args.seed)
    return data.concat([base, null], trained=[True, False])


def _load_base(args: argparse.Namespace, image_size: int):
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


_LINE_OPEN = [False]  # a progress line is on stderr without its newline yet


def end_progress_line() -> None:
    """End an unfinished progress line, so that what follows on stderr starts a line of its own."""
    if _LINE_OPEN[0]:
        print(file=sys.stderr, flush=True)
        _LINE_OPEN[0] = False


STATUS_LINES_ENV = "IARMEM_STATUS_LINES"  # set by `run-job`: progress also as structured lines on stderr


def progress_printer(label: str) -> Callable[[float, str], None]:
    state = {"last": -1, "t": 0.0}
    lines = bool(os.environ.get(STATUS_LINES_ENV))

    def show(frac: float, msg: str) -> None:
        if lines and (time.monotonic() - state["t"] >= 1.0 or frac >= 1.0):
            state["t"] = time.monotonic()
            from iarmem_core.backends.ray_jobs import status_line

            print(status_line(label=label, progress=round(float(frac), 4), message=msg), file=sys.stderr, flush=True)
        pct = int(100 * frac)
        if pct != state["last"]:
            state["last"] = pct
            print(f"\r[{label}] {pct:3d}% {msg}", end="", file=sys.stderr, flush=True)
            _LINE_OPEN[0] = True
            if pct >= 100:
                end_progress_line()

    return show


def _json_default(obj):
    return str(obj)


def _finite(obj):
    """NaN and inf as None (numpy scalars and small arrays included), so that --json output is always valid
    JSON."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_finite(obj), default=_json_default, allow_nan=False))
    else:
        for k, v in obj.items():
            print(f"{k}: {json.dumps(_finite(v), default=_json_default) if isinstance(v, (list, dict)) else v}")


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """'1,5,14' -> (1, 5, 14); None stays None; a bad item is a ValueError naming the option."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


def parse_units(text: str) -> dict[int, tuple[int, ...]]:
    """'3:17,3:25,5:2' -> {3: (17, 25), 5: (2,)}; a malformed pair is a ValueError that shows the format."""
    out: dict[int, set[int]] = {}
    for pair in (t.strip() for t in text.split(",")):
        if not pair:
            continue
        try:
            b, u = (int(v) for v in pair.split(":"))
        except ValueError:
            raise ValueError(f"--units: {pair!r} is not 'block:unit' (e.g. --units 3:17,3:25)") from None
        out.setdefault(b, set()).add(u)
    if not out:
        raise ValueError("--units: no units given (e.g. --units 3:17,3:25)")
    return {b: tuple(sorted(us)) for b, us in sorted(out.items())}


def check_units(units: dict[int, tuple[int, ...]], model, option: str = "--units") -> None:
    """A ValueError naming the option unless every block and unit exists in `model`."""
    blocks = [site.block for site in model.unit_sites()]
    bad_b = sorted(b for b in units if b not in blocks)
    if bad_b:
        raise ValueError(
            f"{option}: block(s) {bad_b} do not exist in {model.spec.name} (blocks {blocks[0]}..{blocks[-1]})"
        )
    bad_u = sorted({u for us in units.values() for u in us if not 0 <= u < model.n_units})
    if bad_u:
        raise ValueError(
            f"{option}: unit(s) {bad_u[:8]} are outside 0..{model.n_units - 1} of {model.spec.name}'s blocks"
        )


def check_detail_scales(scales: tuple[int, ...] | None, model, option: str = "--detail-scales") -> None:
    """A ValueError naming the option unless every scale index exists in `model` (next-token models: 0)."""
    if scales is None:
        return
    n = len(model.token_grids)
    bad = sorted(s for s in scales if not 0 <= s < n)
    if bad:
        have = f"0..{n - 1} ({n} scales)" if n > 1 else "0 (a next-token model has one token grid)"
        raise ValueError(f"{option}: scale(s) {bad} do not exist in {model.spec.name}; valid: {have}")
