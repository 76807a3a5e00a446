"""`iarmem unitmem`: localize memorization, streaming UnitMem per block and scale / position group."""

from __future__ import annotations

import argparse

from iarmem_core.cli import common

HELP = "localize memorization: streaming UnitMem per block and scale / position"
DETAIL_KINDS = ("row", "position")


def add_unitmem_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options of a UnitMem pass (also used by `intervene` and `sample`, which rank units by one)."""
    from iarmem_core.unitmem import REST_MODES, UnitMemConfig

    d = UnitMemConfig()
    p.add_argument(
        f"--{prefix}augs", type=common.positive_int, default=d.n_augs, help="A views per image (view 0 is the image)"
    )
    p.add_argument(
        f"--{prefix}augmentation",
        default=d.augmentation,
        help="default (the model's training augmentation), none, shift, crop, flip, crop+flip",
    )
    p.add_argument(f"--{prefix}rest", default=d.rest, choices=REST_MODES)
    p.add_argument(
        f"--{prefix}detail",
        default="auto",
        help="finer groups: auto (next-token models: grid rows; VAR: none), none, or a comma list of "
        "row,position (position: every token position, the token-grid view)",
    )
    p.add_argument(
        f"--{prefix}detail-scales",
        default="all",
        help="scales (0 = coarsest) that get the finer groups: 'all', 'none' or e.g. 3,4",
    )
    p.add_argument(
        f"--{prefix}top-images",
        type=common.positive_int,
        default=d.top_images,
        help="images kept per unit and scale group",
    )
    p.add_argument(f"--{prefix}dtype", default=d.dtype, choices=("fp32", "bf16"))
    p.add_argument(
        f"--{prefix}random-views",
        action="store_true",
        help="draw random views even where the augmentation family is finite (flip: by default the "
        "image and its mirror, the exact expectation)",
    )
    p.add_argument(
        f"--{prefix}block-images",
        type=int,
        default=d.block_images,
        help="images per reduction block (the fixed order behind batch-invariant results)",
    )


def config_from_args(args: argparse.Namespace, model_name: str, prefix: str = ""):
    """The UnitMemConfig these options describe (the inverse of `unitmem_flags`)."""
    from iarmem_core import unitmem

    get = lambda k: getattr(args, (prefix + k).replace("-", "_"))  # noqa: E731
    detail = get("detail")
    base = unitmem.default_config(model_name)
    if detail == "auto":
        kinds = base.group_kinds
    else:
        extra = tuple(k.strip() for k in detail.split(",") if k.strip() and k.strip() != "none")
        bad = [k for k in extra if k not in DETAIL_KINDS]
        if bad:
            raise ValueError(f"--{prefix}detail: unknown group kind(s) {bad}; use none, row, position or row,position")
        kinds = ("scale",) + extra
    ds = get("detail-scales")
    scales = None if ds == "all" else (() if ds == "none" else common.parse_ints(ds, f"--{prefix}detail-scales"))
    return unitmem.UnitMemConfig(
        n_augs=get("augs"),
        augmentation=get("augmentation"),
        rest=get("rest"),
        group_kinds=kinds,
        detail_scales=scales,
        top_images=get("top-images"),
        dtype=get("dtype"),
        seed=args.seed,
        batch_size=getattr(args, "batch_size", 16),
        exact_views=not get("random-views"),
        block_images=get("block-images"),
    )


def unitmem_flags(cfg, model_name: str, prefix: str = "") -> list[str]:
    """The options that give `cfg` (only those that differ from the defaults)."""
    from iarmem_core import unitmem

    base = unitmem.default_config(model_name)
    out: list[str] = []
    if cfg.n_augs != base.n_augs:
        out += [f"--{prefix}augs", str(cfg.n_augs)]
    if cfg.augmentation != base.augmentation:
        out += [f"--{prefix}augmentation", cfg.augmentation]
    if cfg.rest != base.rest:
        out += [f"--{prefix}rest", cfg.rest]
    if cfg.group_kinds != base.group_kinds:
        extra = [k for k in cfg.group_kinds if k != "scale"]
        out += [f"--{prefix}detail", ",".join(extra) or "none"]
    if cfg.detail_scales is not None:
        out += [f"--{prefix}detail-scales", ",".join(map(str, cfg.detail_scales)) or "none"]
    if cfg.top_images != base.top_images:
        out += [f"--{prefix}top-images", str(cfg.top_images)]
    if cfg.dtype != base.dtype:
        out += [f"--{prefix}dtype", cfg.dtype]
    if not cfg.exact_views:
        out.append(f"--{prefix}random-views")
    if cfg.block_images != base.block_images:
        out += [f"--{prefix}block-images", str(cfg.block_images)]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    common.add_data_args(p, null=True)
    common.add_output_args(p)
    common.add_backend_args(p)
    add_unitmem_options(p)
    p.add_argument(
        "--batch-size", type=common.positive_int, default=16, help="images per batch (never changes a result)"
    )
    p.add_argument("--top", type=common.nonneg_int, default=10, help="top units to list")


def run(args: argparse.Namespace) -> int:
    from iarmem_core import unitmem

    address = common.jobs_api_address(args)
    if address is not None:  # the whole job runs on the cluster; this process follows it
        return common.submit_to_cluster(args, address)
    model = common.load_model(args)
    cfg = config_from_args(args, model.spec.name)
    common.check_detail_scales(cfg.detail_scales, model)
    image_set = common.load_data(args, model.image_size)
    res = unitmem.run_unitmem(
        model,
        image_set,
        cfg,
        store=common.get_store(args),
        force=args.force,
        on_progress=common.progress_printer("unitmem"),
        backend=common.get_backend(args),
    )
    out = unitmem.summarize(res, top=args.top, kinds=("scale", "row") if "row" in cfg.group_kinds else ("scale",))
    out["skipped_files"] = image_set.report.get("skipped", {}) if image_set.report else {}
    common.emit(out, args.json)
    return 0
