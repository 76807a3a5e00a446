"""The CLI: a configuration turned into its command line parses back into the same configuration (the same
store key), and errors are one clear line."""

from __future__ import annotations

import io
import json
import shlex
from contextlib import redirect_stderr, redirect_stdout

import pytest

from iarmem_core import data, extraction, intervention, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.cli import build_parser, commands, main
from iarmem_core.cli.extract import config_from_args as attack_config
from iarmem_core.cli.intervene import edit_kwargs, top_percents
from iarmem_core.cli.unitmem import config_from_args as unitmem_config
from iarmem_core.store import ResultStore


def parse(cmd: str):
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "iarmem_core"]
    return build_parser().parse_args(argv[3:])


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rest": "median", "n_augs": 4},
        {"rest": "class", "exact_views": False, "augmentation": "flip"},
        {"group_kinds": ("scale", "row", "position"), "detail_scales": (0,), "top_images": 3, "block_images": 8},
        {"dtype": "bf16", "seed": 3},
    ],
)
def test_unitmem_command_round_trip(name, overrides):
    cfg = unitmem.default_config(name, **overrides)
    m, d = commands.ModelArgs(name, seed=cfg.seed), commands.DataArgs("demo", 500, heldout=50)
    args = parse(commands.unitmem_command(m, d, cfg))
    assert unitmem_config(args, name) == cfg
    assert (args.model, args.seed, args.data, args.n, args.heldout) == (name, cfg.seed, "demo", 500, 50)


def test_extract_and_intervene_commands_round_trip():
    ecfg = extraction.ExtractionConfig(
        candidates_per_class=3, prefix_tokens=(5, 14), similarity="ssim", threshold=0.91, heldout=False, seed=2
    )
    args = parse(commands.extract_command(commands.ModelArgs("demo-var", seed=2), commands.DataArgs(), ecfg))
    assert attack_config(args) == ecfg
    ucfg = unitmem.default_config("demo-rar", n_augs=4)
    m = commands.ModelArgs("demo-rar", seed=1)
    args = parse(
        commands.intervene_command(
            m, commands.DataArgs(), ucfg, top_percent=5.0, factor=0.25, op="zero", ranking="per_block", combine="max"
        )
    )
    assert unitmem_config(args, "demo-rar", prefix="unitmem-") == unitmem.default_config("demo-rar", n_augs=4, seed=1)
    assert (args.top_percent, args.factor, args.op, args.ranking, args.combine) == (
        5.0,
        0.25,
        "zero",
        "per_block",
        "max",
    )
    args = parse(commands.intervene_command(m, commands.DataArgs(), ucfg, units={3: (17, 2), 0: (5,)}))
    assert args.units == "0:5,3:2,3:17" and args.top_percent == intervention.DEFAULT_TOP_PERCENT
    with pytest.raises(ValueError, match="no units picked"):
        commands.intervene_command(m, commands.DataArgs(), ucfg, units={})


def test_the_sweep_command_reproduces_the_sweep_key(tmp_path):
    """What the Intervention page prints for its trade-off curve is the job the page looks up."""
    ad = load_adapter("demo-var", device="cpu")
    sel = data.select_demo(n=500, seed=0)
    st = ResultStore(tmp_path)
    ucfg = unitmem.default_config(ad, seed=0)
    res = unitmem.UnitMemResult({}, {"store_key": unitmem.result_key(ad, sel, ucfg, st)})
    page = {**intervention.sweep_defaults(), "factor": 0.25, "op": "zero", "ranking": "global", "seed": 0}
    want = intervention.sweep_key(ad, res, sel, st, **page)
    args = parse(
        commands.intervene_command(
            commands.ModelArgs("demo-var"),
            commands.DataArgs(),
            ucfg,
            sweep=True,
            factor=0.25,
            op="zero",
            ranking="global",
        )
    )
    assert unitmem.result_key(ad, sel, unitmem_config(args, "demo-var", prefix="unitmem-"), st) == res.store_key
    got = intervention.sweep_key(ad, res, sel, st, top_percents=top_percents(args), **edit_kwargs(args, 32))
    assert got == want


def test_errors_are_one_line_and_a_json_object(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(
            [
                "localize",
                "--model",
                "test-var",
                "--image",
                "train/9999",
                "--threshold",
                "0.9",
                "--store",
                str(tmp_path),
                "--json",
                "--n",
                "40",
                "--quality-samples",
                "0",
            ]
        )
    assert code == 2
    obj = json.loads(out.getvalue().strip().splitlines()[-1])
    assert obj["type"] == "KeyError" and "not in the data selection" in obj["error"]
    assert err.getvalue().strip().splitlines()[-1].startswith("error: ")


def test_localize_command_round_trip():
    from iarmem_core.cli.localize import config_from_args as localize_config
    from iarmem_core.localize import LocalizeConfig

    cfg = LocalizeConfig(
        prefix_tokens=14,
        op="fc1_scale",
        factor=0.25,
        max_units=64,
        random_draws=30,
        threshold=0.8,
        nemo_z=2.5,
        quality_samples=0,
        seed=4,
    )
    args = parse(
        commands.localize_command(commands.ModelArgs("demo-var", seed=4), commands.DataArgs(), "train/0012", cfg)
    )
    assert localize_config(args) == cfg and args.image == "train/0012" and not args.all
    args = parse(commands.localize_command(commands.ModelArgs("demo-var"), commands.DataArgs()))
    assert args.all and localize_config(args) == LocalizeConfig()


def test_curve_command_round_trip():
    from iarmem_core import dose, localize
    from iarmem_core.cli.intervene import curve_config

    ucfg = unitmem.default_config("demo-var")
    for cfg in (
        dose.CurveConfig(),
        dose.CurveConfig(
            percents=(0.5, 3.0),
            random_draws=30,
            ranking="per_block",
            combine="max",
            localize=localize.LocalizeConfig(op="fc1_scale", factor=0.25, prefix_tokens=14, threshold=0.8, seed=2),
        ),
    ):
        m = commands.ModelArgs("demo-var", seed=cfg.seed)
        args = parse(commands.curve_command(m, commands.DataArgs(), ucfg, cfg))
        assert args.curve and curve_config(args) == cfg
