"""`iarmem intervene` (edit units: extraction and quality before/after, the random control, --sweep) and
`iarmem sample` (class-conditional samples as a PNG grid, unedited and edited)."""

from __future__ import annotations

import argparse
import math

from iarmem_core.cli import common
from iarmem_core.cli.extract import add_attack_options
from iarmem_core.cli.extract import config_from_args as attack_config
from iarmem_core.cli.unitmem import add_unitmem_options
from iarmem_core.cli.unitmem import config_from_args as unitmem_config

HELP = "edit the top-k%% UnitMem units: extraction and quality before/after, random control, --sweep"
SAMPLE_HELP = "class-conditional samples as a PNG grid, unedited and with the top-k%% units edited"


def add_edit_options(p: argparse.ArgumentParser) -> None:
    from iarmem_core import hooks
    from iarmem_core import intervention as iv

    p.add_argument(
        "--top-percent",
        type=common.number(0, 100),
        default=iv.DEFAULT_TOP_PERCENT,
        help="edit the top k%% units by UnitMem",
    )
    p.add_argument("--factor", type=common.number(), default=iv.DEFAULT_FACTOR, help="fc1 rows x factor (paper: 0.5)")
    p.add_argument("--op", default=iv.DEFAULT_OP, choices=hooks.EDIT_OPS)
    p.add_argument("--ranking", default=iv.DEFAULT_RANKING, choices=iv.RANKINGS)
    p.add_argument(
        "--combine", default=iv.DEFAULT_COMBINE, help="VAR: max over scales, or one scale index / group name"
    )


def parse_percents(text: str) -> tuple[float, ...]:
    """'0,1,5,10' -> (0.0, 1.0, 5.0, 10.0) for --top-percents; each a finite number in [0, 100] (0: the unedited
    model)."""
    out = []
    for v in (t.strip() for t in text.split(",")):
        try:
            f = float(v)
        except ValueError:
            f = math.nan
        if not (math.isfinite(f) and 0 <= f <= 100):
            raise ValueError(f"--top-percents: {v!r} is not a percentage in [0, 100] (e.g. --top-percents 0,1,5,10)")
        out.append(f)
    return tuple(out)


def combine_arg(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iarmem_core import dose, hooks
    from iarmem_core import intervention as iv

    common.add_model_args(p)
    common.add_data_args(p)
    common.add_output_args(p)
    add_edit_options(p)
    p.add_argument("--cfg-half", default="both", choices=hooks.CFG_HALVES)
    p.add_argument("--units", help="explicit units instead of the ranking: 'block:unit,block:unit,...'")
    p.add_argument("--sweep", action="store_true", help="the trade-off table over --top-percents")
    p.add_argument("--top-percents", default=",".join(f"{k:g}" for k in iv.DEFAULT_TOP_PERCENTS))
    p.add_argument(
        "--curve",
        action="store_true",
        help="dose-response: copies still extracted vs units edited for UnitMem-ranked, random (5-95%% band), "
        "the union of per-image minimal sets and a greedy cover (iarmem_core.dose)",
    )
    p.add_argument(
        "--curve-percents",
        default=",".join(f"{k:g}" for k in dose.DEFAULT_PERCENTS),
        help="--curve: %% of all units on the UnitMem / random curves",
    )
    p.add_argument(
        "--curve-op",
        default="zero",
        choices=hooks.EDIT_OPS,
        help="--curve: how every curve's units are edited (default: zeroed, as the minimal sets are found)",
    )
    p.add_argument("--curve-factor", type=common.number(), default=0.0, help="--curve: factor of a scaling op")
    p.add_argument(
        "--random-draws",
        type=common.positive_int,
        help="random-unit draws of the control (extraction after each, all in one batched attack; "
        "quality for the first; p_value and rank compare the ranked edit with "
        "them); default 20 on demo and test models, 1 on released ones",
    )
    p.add_argument(
        "--n-samples", type=common.positive_int, default=iv.DEFAULT_N_SAMPLES, help="samples for FD and class accuracy"
    )
    p.add_argument(
        "--inception",
        help="NVIDIA's TorchScript inception-2015-12-05.pt: real FID (else the "
        "bundled demo feature space, demo models only)",
    )
    p.add_argument("--reference-data", help="ImageFolder of real images for FD (default: demo held-out)")
    add_unitmem_options(p, prefix="unitmem-")
    add_attack_options(p)


def top_percents(args: argparse.Namespace) -> tuple[float, ...]:
    return parse_percents(args.top_percents)


def curve_config(args: argparse.Namespace):
    """The dose.CurveConfig these options describe (the localization uses the attack's prefix and threshold)."""
    from iarmem_core import dose, localize

    lcfg = localize.LocalizeConfig(
        op=args.curve_op,
        factor=args.curve_factor,
        prefix_tokens=common.parse_ints(args.prefix, "--prefix")[0] if args.prefix else None,
        similarity=args.similarity,
        threshold=args.threshold,
        seed=args.seed,
    )
    return dose.CurveConfig(
        percents=parse_percents(args.curve_percents),
        random_draws=dose.CurveConfig().random_draws if args.random_draws is None else args.random_draws,
        ranking=args.ranking,
        combine=combine_arg(args.combine),
        localize=lcfg,
    )


def edit_kwargs(args: argparse.Namespace, image_size: int) -> dict:
    """The keywords of run_intervention / run_sweep these options describe (the store is added by the caller)."""
    from iarmem_core import data

    ref = None
    if args.reference_data:
        ref = data.load_image_folder(args.reference_data, image_size, count=args.n_samples, seed=args.seed)
    return dict(
        factor=args.factor,
        op=args.op,
        ranking=args.ranking,
        combine=combine_arg(args.combine),
        cfg_half=args.cfg_half,
        extraction_cfg=attack_config(args),
        n_samples=args.n_samples,
        feature_space=args.inception,
        reference_set=ref,
        seed=args.seed,
        sscd_path=args.sscd,
        random_draws=args.random_draws,
    )


def run(args: argparse.Namespace) -> int:
    """One JSON object (--sweep: the table as {"rows": [...]}; --curve: the dose-response curves)."""
    from iarmem_core import dose, intervention, unitmem

    model = common.load_model(args)
    ucfg = unitmem_config(args, model.spec.name, prefix="unitmem-")
    common.check_detail_scales(ucfg.detail_scales, model, "--unitmem-detail-scales")
    units = common.parse_units(args.units) if args.units else None
    if units is not None:
        common.check_units(units, model)
    if args.sweep:
        top_percents(args)  # a bad list fails before any work
    if args.curve:
        curve_config(args)  # a bad list fails before any work
    image_set = common.load_data(args, model.image_size)
    st = common.get_store(args)
    um = unitmem.run_unitmem(
        model,
        image_set,
        ucfg,
        store=st,
        on_progress=common.progress_printer("unitmem"),
    )
    kw = edit_kwargs(args, model.image_size)
    kw["store"] = st
    if args.curve:
        res = dose.run_dose_response(
            model, image_set, um, curve_config(args), store=st, on_progress=common.progress_printer("curve")
        )
        common.emit(res, args.json)
        return 0
    if args.sweep:
        df = intervention.run_sweep(
            model,
            um,
            image_set,
            top_percents=top_percents(args),
            force=args.force,
            on_progress=common.progress_printer("sweep"),
            **kw,
        )
        out = {
            "store_key": df.attrs["store_key"],
            "how": df.attrs["how"],
            "columns": list(df.columns),
            "rows": df.to_dict(orient="records"),
        }
        common.emit(out, args.json)
        return 0
    out = intervention.run_intervention(
        model,
        um,
        image_set,
        top_percent=args.top_percent,
        units=units,
        on_progress=common.progress_printer("intervene"),
        **kw,
    )
    common.emit(out.to_dict(), args.json)
    return 0


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    common.add_data_args(p)
    p.add_argument("--store", help="result store folder (UnitMem results for --top-percent)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9", help="class labels, comma separated")
    add_edit_options(p)
    p.set_defaults(top_percent=0.0)
    p.add_argument("--units", help="explicit units instead of the ranking: 'block:unit,block:unit,...'")
    p.add_argument("--random-units", action="store_true", help="edit random units of the same size instead")
    add_unitmem_options(p, prefix="unitmem-")
    p.add_argument("--sampling", default="", help="overrides of the published settings, e.g. 'cfg=2,top_k=50'")
    p.add_argument("--out", default="samples.png", help="PNG: row 1 unedited, row 2 edited (when editing)")


def run_sample(args: argparse.Namespace) -> int:
    """Samples at --seed, unedited and (with --top-percent or --units) edited, written as one PNG grid."""
    import torch
    from PIL import Image

    from iarmem_core import intervention, unitmem

    model = common.load_model(args)
    labels = list(common.parse_ints(args.labels, "--labels"))
    bad = [c for c in labels if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"--labels: class ids {bad} are outside 0..{model.num_classes - 1} of {model.spec.name}")
    sampling = {}
    for kv in filter(None, args.sampling.split(",")):
        try:
            k, v = (t.strip() for t in kv.split("="))
        except ValueError:
            raise ValueError(f"--sampling: {kv!r} is not key=value (e.g. --sampling cfg=2,top_k=50)") from None
        sampling[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    units = None
    ucfg = unitmem_config(args, model.spec.name, prefix="unitmem-")
    common.check_detail_scales(ucfg.detail_scales, model, "--unitmem-detail-scales")
    if args.units:
        units = common.parse_units(args.units)
        common.check_units(units, model)
    elif args.top_percent > 0:
        image_set = common.load_data(args, model.image_size)
        um = unitmem.run_unitmem(
            model,
            image_set,
            ucfg,
            store=common.get_store(args),
            on_progress=common.progress_printer("unitmem"),
        )
        units = intervention.select_units(um, args.top_percent, args.ranking, combine_arg(args.combine))
    if units is not None and args.random_units:
        units = intervention.random_control(units, model.n_units, seed=args.seed)
    edit = intervention.make_edit(units, args.op, args.factor) if units else None
    rows = [intervention.generate_images(model, labels, None, seed=args.seed, sampling=sampling)]
    if edit is not None:
        rows.append(intervention.generate_images(model, labels, edit, seed=args.seed, sampling=sampling))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # [3, rows*H, B*W]
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(args.out)
    out = {
        "out": str(args.out),
        "labels": labels,
        "seed": args.seed,
        "sampling": intervention.sampling_kwargs(model, sampling),
        "edit": edit.to_dict() if edit else None,
        "mean_abs_change": float((rows[1] - rows[0]).abs().mean()) if edit is not None else None,
    }
    common.emit(out, args.json)
    return 0
