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
import os
import sys
import traceback

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


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (and a JSON error object on stdout when --json was given)."""

    json_errors = False

    def error(self, message: str):  # argparse's own errors: bad option values, unknown options
        _report(f"{self.prog}: {message} (see {self.prog} --help)", "UsageError", self.json_errors)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command. Command modules import the analysis only inside `run`; their options
    read the defaults from the analysis' config classes, which this imports."""
    parser = _Parser(prog="iarmem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (mod, add, _run, help_attr) in COMMANDS.items():
        m = importlib.import_module(mod)
        p = sub.add_parser(name, help=getattr(m, help_attr))
        getattr(m, add)(p)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(msg: str, kind: str, as_json: bool) -> None:
    """One line on stderr; with --json also {"error", "type"} as the one JSON object on stdout."""
    msg = _one_line(msg)
    from iarmem_core.cli.common import end_progress_line

    end_progress_line()
    if as_json:
        print(json.dumps({"error": msg, "type": kind}), flush=True)
    print(f"error: {msg}", file=sys.stderr, flush=True)


# problems with the input, the files or the machine, whose message says what to do (exit code 2); anything
# else is a bug, reported on one line too (exit code 1; IARMEM_DEBUG=1 prints the traceback)
_EXPECTED = (ValueError, KeyError, LookupError, OSError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error ends as one line on stderr (and a JSON object with --json), never a
    traceback, with a non-zero exit code (2: bad input or environment, 130: Ctrl-C or a cancel, 1: an internal
    error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    _Parser.json_errors = as_json
    args = build_parser().parse_args(argv)
    mod, _add, run, _help = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(mod), run)(args) or 0)
    except KeyboardInterrupt as e:
        msg = e.args[0] if e.args else "interrupted (Ctrl-C) before any job started; nothing was stored"
        _report(str(msg), "KeyboardInterrupt", as_json)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place where every failure becomes a message
        from iarmem_core.jobs import Cancelled

        if isinstance(e, Cancelled):  # a cancel request from another process (the app's Cancel button)
            _report(str(e), "Cancelled", as_json)
            return 130
        if os.environ.get("IARMEM_DEBUG"):
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if not isinstance(e, _EXPECTED):
            msg = f"internal error ({type(e).__name__}: {msg}); run with IARMEM_DEBUG=1 for the traceback"
        elif not msg:
            msg = type(e).__name__
        _report(str(msg), type(e).__name__, as_json)
        return 2 if isinstance(e, _EXPECTED) else 1
