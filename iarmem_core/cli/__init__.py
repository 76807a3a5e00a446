"""iarmem's command line (`iarmem <cmd>` or `python -m iarmem_core <cmd>`): the app's functions, defaults, store.

One module per command (`unitmem`, `extract`, `intervene` + `sample`, `models` + `identify`, `train-demo`,
`run-job`: the driver of a job on a Ray cluster);
the options shared by several live in `common`, and `commands` turns a configuration back into the command
line that reproduces it (the app prints those). Nothing in the library imports this package.
With --json each command prints exactly one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# command -> (module, add_arguments, run, help attribute)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "models": ("iarmem_core.cli.models", "add_arguments", "run", "HELP"),
    "identify": ("iarmem_core.cli.models", "add_identify_arguments", "run_identify", "IDENTIFY_HELP"),
    "unitmem": ("iarmem_core.cli.unitmem", "add_arguments", "run", "HELP"),
    "extract": ("iarmem_core.cli.extract", "add_arguments", "run", "HELP"),
    "intervene": ("iarmem_core.cli.intervene", "add_arguments", "run", "HELP"),
    "sample": ("iarmem_core.cli.intervene", "add_sample_arguments", "run_sample", "SAMPLE_HELP"),
    "localize": ("iarmem_core.cli.localize", "add_arguments", "run", "HELP"),
    "train-demo": ("iarmem_core.cli.train_demo", "add_arguments", "run", "HELP"),
    "run-job": ("iarmem_core.cli.run_job", "add_arguments", "run", "HELP"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command. Command modules import the analysis only inside `run`; their options
    read the defaults from the analysis' config classes, which this imports."""
    parser = argparse.ArgumentParser(prog="iarmem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, add, _run, help_attr) in COMMANDS.items():
        m = importlib.import_module(mod)
        p = sub.add_parser(name, help=getattr(m, help_attr))
        getattr(m, add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mod, _add, run, _help = COMMANDS[args.command]
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
