"""Bad command lines: every error is one line on stderr (a JSON object {"error", "type"} on stdout with
--json), names the option, exits non-zero, and prints no traceback; NaN never reaches JSON output.

The stores' faults (damaged, read-only, full) through the CLI are in test_hostile_store.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from iarmem_core import cli
from iarmem_core.cli import common


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's own errors end in SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code), out, err


def one_line_error(argv: list[str], capsys, *phrases: str) -> dict:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code != 0, (out, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    obj = json.loads(out)
    assert set(obj) == {"error", "type"} and err == f"error: {obj['error']}\n"
    for p in phrases:
        assert p in obj["error"], obj["error"]
    code2, out2, err2 = run_cli(argv, capsys)  # without --json: the same line, nothing on stdout
    assert code2 == code and out2 == "" and err2 == err
    return obj


@pytest.mark.parametrize(
    "argv, phrases",
    [
        (["extract", "--threshold", "nan"], ["--threshold", "finite number", "'nan'"]),
        (["extract", "--threshold", "inf"], ["--threshold", "'inf'"]),
        (["extract", "--threshold", "-inf"], ["--threshold"]),
        (["extract", "--top-k", "-1"], ["--top-k", "integer >= 0", "-1"]),
        (["extract", "--batch-size", "0"], ["--batch-size", "integer >= 1", "got 0"]),
        (["unitmem", "--batch-size", "0"], ["--batch-size", "integer >= 1"]),
        (["extract", "--top-p", "1.5"], ["--top-p", "[0, 1]"]),
        (["extract", "--temperature", "0"], ["--temperature", "> 0"]),
        (["intervene", "--factor", "nan"], ["--factor"]),
        (["intervene", "--top-percent", "250"], ["--top-percent", "[0, 100]"]),
        (["unitmem", "--n", "-5"], ["--n", "integer >= 1"]),
        (["unitmem", "--seed", "-1"], ["--seed", "integer >= 0"]),
        (["unitmem", "--augs", "x"], ["--augs", "'x'"]),
        (["unitmem", "--fraction", "0"], ["--fraction", "(0, 1]"]),
        (["nosuchcommand"], ["invalid choice"]),
    ],
)
def test_bad_option_values_are_refused_with_the_option_named(argv, phrases, capsys):
    obj = one_line_error(argv, capsys, *phrases)
    assert obj["type"] == "UsageError"


def test_detail_scales_out_of_range_for_the_model(capsys):
    one_line_error(
        ["unitmem", "--model", "test-var", "--detail-scales", "99"],
        capsys,
        "--detail-scales",
        "[99]",
        "valid: 0..3 (4 scales)",
    )
    one_line_error(
        ["unitmem", "--model", "test-rar", "--detail-scales", "1"],
        capsys,
        "--detail-scales",
        "next-token model has one token grid",
    )


def test_bad_units_name_the_option_and_the_valid_range(capsys):
    one_line_error(["intervene", "--model", "test-var", "--units", "3:x"], capsys, "--units", "'3:x'", "block:unit")
    one_line_error(["intervene", "--model", "test-var", "--units", "99:1"], capsys, "--units", "[99]", "blocks 0..1")
    one_line_error(["intervene", "--model", "test-var", "--units", "0:100000"], capsys, "--units", "[100000]")
    one_line_error(["intervene", "--model", "test-var", "--sweep", "--top-percents", "5,nan"], capsys, "--top-percents")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")
def test_device_cuda_without_cuda(capsys):
    obj = one_line_error(["unitmem", "--device", "cuda"], capsys, "--device cuda", "CUDA is not available")
    assert obj["type"] == "ValueError"


def test_missing_checkpoint_and_unknown_model(tmp_path, capsys):
    one_line_error(["identify", str(tmp_path / "nope.pth")], capsys, "no such file")
    one_line_error(["unitmem", "--model", "var-d17"], capsys, "no model named 'var-d17'")


def test_an_internal_error_is_one_line_too(monkeypatch, capsys):
    from iarmem_core.cli import models

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(models, "run", broken)
    code, out, err = run_cli(["models", "--json"], capsys)
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert json.loads(out) == {
        "error": "internal error (ZeroDivisionError: boom); run with IARMEM_DEBUG=1 for the traceback",
        "type": "ZeroDivisionError",
    }


def test_nan_never_reaches_json_output(capsys):
    common.emit(
        {
            "a": float("nan"),
            "b": np.float32("nan"),
            "c": [np.inf, 1.5, np.float64(-np.inf)],
            "d": {"e": np.array([np.nan, 2.0])},
            "f": np.int64(3),
        },
        True,
    )
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"bare {name} in JSON output")

    assert json.loads(out, parse_constant=refuse) == {
        "a": None,
        "b": None,
        "c": [None, 1.5, None],
        "d": {"e": [None, 2.0]},
        "f": 3,
    }
    assert not any(isinstance(v, float) and math.isnan(v) for v in json.loads(out).values())
