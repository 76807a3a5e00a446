"""`iarmem localize`: which units carry one memorized image (attribution, minimal set, random sets, collateral)."""

from __future__ import annotations

import argparse

from iarmem_core.cli import common

HELP = "per-image causal localization: the minimal set of units that removes one extracted image, with controls"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iarmem_core import hooks
    from iarmem_core.localize import LocalizeConfig

    d = LocalizeConfig()
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_output_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--image", help="the image id (e.g. train/1143; `extract --json` lists extracted_ids)")
    who.add_argument("--all", action="store_true", help="every extracted image, then the union of their sets")
    p.add_argument("--prefix", type=int, help="prefix tokens (default: the attack's, VAR 4 scales)")
    p.add_argument("--op", default=d.op, choices=hooks.EDIT_OPS, help="how the set is removed (default: zero)")
    p.add_argument("--factor", type=float, default=d.factor, help="for fc1_scale / out_scale")
    p.add_argument("--max-units", type=int, help="budget of the search (default: a third of all units)")
    p.add_argument("--random-draws", type=int, default=d.random_draws, help="random same-size sets per image")
    p.add_argument("--similarity", default=d.similarity)
    p.add_argument("--threshold", type=float, help="decision threshold (default: the calibrated one)")
    p.add_argument("--nemo-z", type=float, default=d.nemo_z, help="NeMo units: z-score above this")
    p.add_argument(
        "--quality-samples",
        type=int,
        default=d.quality_samples,
        help="samples for the quality cost of the edit (0: skip)",
    )


def config_from_args(args: argparse.Namespace):
    from iarmem_core.localize import LocalizeConfig

    return LocalizeConfig(
        prefix_tokens=args.prefix,
        op=args.op,
        factor=args.factor,
        max_units=args.max_units,
        random_draws=args.random_draws,
        similarity=args.similarity,
        threshold=args.threshold,
        nemo_z=args.nemo_z,
        quality_samples=args.quality_samples,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from iarmem_core import localize

    model = common.load_model(args)
    image_set = common.load_data(args, model.image_size)
    st = common.get_store(args)
    cfg = config_from_args(args)
    if args.all:
        out = localize.localize_all(model, image_set, cfg, store=st, on_progress=common.progress_printer("localize"))
    else:
        out = localize.run_localization(
            model,
            image_set,
            args.image,
            cfg,
            store=st,
            force=args.force,
            on_progress=common.progress_printer("localize"),
        )
    common.emit(out, args.json)
    return 0
