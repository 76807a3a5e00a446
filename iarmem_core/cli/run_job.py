"""`iarmem run-job SPEC`: the driver of a job on a Ray cluster (what the Ray Jobs API runs on the head).

SPEC is a JSON object, inline or in a file: {"argv": ["unitmem", "--model", ..., "--store", DIR], "key": KEY,
"backend": {"workers": N, "gpus_per_worker": F}}. The driver runs the CLI command `argv` with `--backend ray`
(connecting to the cluster it runs in: $RAY_ADDRESS, set by the Jobs API), so its blocks run on the cluster's
actors while this process merges them and is the only writer of the result, its checkpoints and its status
in the store. It prints structured progress lines (`IARMEM_STATUS {json}`, on stderr) for a submitter that
cannot see the store, and the command's output. SIGTERM (Ray's stop_job) is a cancel: the job is recorded as
cancelled with its checkpoint kept, and its actors are killed. With `key`, a run that produced no result under
that key fails: the cluster computed a different key, i.e. its code, data or checkpoints differ from the
submitter's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from iarmem_core.cli import common

HELP = "driver of a job on a Ray cluster: runs a command's blocks on the cluster (submitted by the Jobs API)"
HEAVY = ("unitmem", "extract")  # the commands whose blocks run on the backend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the job: a JSON object inline, or the path of a JSON file holding it")


def read_spec(text: str) -> dict:
    """The spec from inline JSON or a file; a clear ValueError for anything else."""
    raw = text.strip()
    if not raw.startswith("{"):
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"run-job: {text!r} is neither a JSON object nor a file holding one")
        raw = path.read_text()
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"run-job: the spec is not valid JSON ({e})") from None
    argv = spec.get("argv") if isinstance(spec, dict) else None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError('run-job: the spec needs "argv", the command line as a list of strings, e.g. ["unitmem", ...]')
    if argv[0] not in HEAVY:
        raise ValueError(f"run-job: command {argv[0]!r} has no blocks to distribute; use one of {', '.join(HEAVY)}")
    return spec


def driver_argv(spec: dict) -> list[str]:
    """The command line the driver runs: the spec's, with --backend ray and the spec's worker settings."""
    argv = list(spec["argv"])
    if "--backend" not in argv:
        argv += ["--backend", "ray"]
    b = spec.get("backend") or {}
    if b.get("workers") is not None and "--ray-workers" not in argv:
        argv += ["--ray-workers", str(int(b["workers"]))]
    if b.get("gpus_per_worker") is not None and "--ray-gpus-per-worker" not in argv:
        argv += ["--ray-gpus-per-worker", str(float(b["gpus_per_worker"]))]
    return argv


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}: the job was stopped")


def run(args: argparse.Namespace) -> int:
    from iarmem_core.backends.ray_jobs import status_line
    from iarmem_core.cli import build_parser, main

    spec = read_spec(args.spec)
    argv = driver_argv(spec)
    key = spec.get("key")
    sub_args = build_parser().parse_args(argv)
    if common.jobs_api_address(sub_args) is not None:
        raise ValueError("run-job runs inside the cluster: its command must not carry an http:// --ray-address")
    store = common.get_store(sub_args)
    os.environ[common.STATUS_LINES_ENV] = "1"
    signal.signal(signal.SIGTERM, _on_sigterm)

    def say(**fields) -> None:
        print(status_line(key=key, command=argv[0], **fields), file=sys.stderr, flush=True)

    say(state="running", progress=0.0, message="driver started", store=str(store.root), pid=os.getpid())
    from iarmem_core.jobs import Cancelled

    cancelled = {"state": "cancelled", "message": "stopped; the checkpoint is kept, submit it again to resume"}
    try:
        rc = main(argv)
    except (KeyboardInterrupt, Cancelled):
        say(**cancelled)
        return 130
    except BaseException as e:
        say(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    if rc == 130:  # the command reports a stop or a cancel itself and exits 130 (iarmem_core.cli.main)
        say(**cancelled)
        return 130
    if rc == 0 and key and not store.exists(key):
        msg = (
            f"the job ran but left no result under {key}: the cluster computed another store key, so its iarmem "
            f"code, data or checkpoints differ from the submitter's. Install the same iarmem on every node and put "
            f"data, checkpoints and the store on a filesystem that every node and the submitter share."
        )
        say(state="failed", error=msg)
        print(f"error: {msg}", file=sys.stderr)
        return 3
    say(state="done" if rc == 0 else "failed", progress=1.0 if rc == 0 else None, rc=rc)
    return rc
