"""`iarmem extract`: the training-data extraction attack (candidates, greedy generation, similarity counts)."""

from __future__ import annotations

import argparse

from iarmem_core.cli import common

HELP = "training-data extraction attack: candidates, greedy generation from a prefix, similarity counts"


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """The options of an ExtractionConfig (also used by `intervene`)."""
    from iarmem_core.extraction import ExtractionConfig

    d = ExtractionConfig()
    p.add_argument(
        "--candidates-per-class",
        type=common.positive_int,
        default=d.candidates_per_class,
        help="top-k images per class by the per-image memorization score",
    )
    p.add_argument("--ids", help="explicit candidate image ids, comma separated (instead of top-k per class)")
    p.add_argument(
        "--prefix",
        help="prefix lengths in tokens, comma separated (VAR: whole scales); "
        "default: the paper's (VAR 4 scales; next-token 30/256 of the tokens)",
    )
    p.add_argument("--similarity", default=d.similarity, help="auto, sscd, token_match, ssim, feature_cosine")
    p.add_argument("--threshold", type=common.number(), help="decision threshold (default: calibrated / published)")
    p.add_argument("--sscd", help="path of sscd_disc_mixup.torchscript.pt (SSCD similarity, threshold 0.75)")
    p.add_argument("--cfg", type=common.number(0), default=d.cfg, help="classifier-free guidance (default 0: none)")
    p.add_argument("--top-k", type=common.nonneg_int, default=d.top_k, help="1 = greedy (the attack's default)")
    p.add_argument("--top-p", type=common.number(0, 1), default=d.top_p, help="0 = no truncation")
    p.add_argument("--temperature", type=common.number(0, open_lo=True), default=d.temperature)
    p.add_argument(
        "--batch-size",
        type=common.positive_int,
        default=d.batch_size,
        help="candidates per batch (halved on out-of-memory)",
    )
    p.add_argument("--no-heldout", action="store_true", help="do not attack held-out images")
    p.add_argument(
        "--heldout-n", type=common.positive_int, default=d.heldout_n, help="demo: held-out images attacked (false rate)"
    )
    p.add_argument(
        "--gallery-size",
        type=common.positive_int,
        default=d.gallery_size,
        help="stored images are at most this many px",
    )
    p.add_argument(
        "--decode-dtype",
        default=d.decode_dtype,
        choices=("fp32", "bf16"),
        help="precision of the tokenizer's decoder for the compared images (bf16: faster; rows near a threshold "
        "are rescored in fp32, so decisions stay those of fp32)",
    )


def config_from_args(args: argparse.Namespace):
    """The ExtractionConfig these options describe (the inverse of `attack_flags`)."""
    from iarmem_core.extraction import ExtractionConfig

    return ExtractionConfig(
        candidates_per_class=args.candidates_per_class,
        candidate_ids=tuple(i.strip() for i in args.ids.split(",") if i.strip()) if args.ids else None,
        prefix_tokens=common.parse_ints(args.prefix, "--prefix"),
        similarity=args.similarity,
        threshold=args.threshold,
        cfg=args.cfg,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        batch_size=args.batch_size,
        heldout=not args.no_heldout,
        seed=args.seed,
        heldout_n=args.heldout_n,
        gallery_size=args.gallery_size,
        decode_dtype=args.decode_dtype,
    )


def attack_flags(cfg) -> list[str]:
    """The options that give `cfg` (only those that differ from the defaults; seed is a model option)."""
    from iarmem_core.extraction import ExtractionConfig

    d = ExtractionConfig()
    out: list[str] = []
    simple = [
        ("candidates_per_class", "--candidates-per-class"),
        ("similarity", "--similarity"),
        ("threshold", "--threshold"),
        ("cfg", "--cfg"),
        ("top_k", "--top-k"),
        ("top_p", "--top-p"),
        ("temperature", "--temperature"),
        ("batch_size", "--batch-size"),
        ("heldout_n", "--heldout-n"),
        ("gallery_size", "--gallery-size"),
        ("decode_dtype", "--decode-dtype"),
    ]
    for field, flag in simple:
        v = getattr(cfg, field)
        if v != getattr(d, field) and v is not None:
            out += [flag, str(v)]
    if cfg.candidate_ids is not None:
        out += ["--ids", ",".join(cfg.candidate_ids)]
    if cfg.prefix_tokens is not None:
        out += ["--prefix", ",".join(map(str, cfg.prefix_tokens))]
    if not cfg.heldout:
        out.append("--no-heldout")
    if cfg.measures is not None:
        raise ValueError("ExtractionConfig.measures has no CLI option; leave it None to reproduce from the CLI")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from iarmem_core.extraction import DEFAULT_MAX_FALSE_RATE

    common.add_model_args(p)
    common.add_data_args(p)
    common.add_output_args(p)
    common.add_backend_args(p)
    add_attack_options(p)
    p.add_argument("--heldout-data", help="folder data: an ImageFolder of held-out images (e.g. ImageNet val)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="calibrate the offline thresholds on held-out images (demo: those not in the "
        "evaluation sample) and store them for this model",
    )
    p.add_argument("--max-false-rate", type=common.number(0, 1), default=DEFAULT_MAX_FALSE_RATE)


def run(args: argparse.Namespace) -> int:
    """Prints the counts (one JSON object with --json)."""
    from iarmem_core import data, extraction

    address = common.jobs_api_address(args)
    if address is not None:  # the whole job runs on the cluster; this process follows it
        return common.submit_to_cluster(args, address)
    model = common.load_model(args)
    image_set = common.load_data(args, model.image_size)
    st = common.get_store(args)
    cfg = config_from_args(args)
    heldout = None
    if args.heldout_data:
        heldout = data.load_image_folder(args.heldout_data, model.image_size, count=args.heldout_n, seed=args.seed)
    if args.calibrate:
        if args.data == "demo":
            _, calib = extraction.demo_heldout_sets(cfg.heldout_n, cfg.seed)
            planted = data.load_demo("planted")
        elif heldout is not None:
            calib, planted = heldout, None
        else:
            raise ValueError("--calibrate on folder data needs --heldout-data (images the model never saw)")
        out = extraction.calibrate(
            model,
            calib,
            cfg,
            store=st,
            max_false_rate=args.max_false_rate,
            planted_set=planted,
            sscd_path=args.sscd,
            on_progress=common.progress_printer("calibrate"),
            force=args.force,
        )
        out["calibration_images"] = len(calib)
        common.emit(out, args.json)
        return 0
    res = extraction.run_extraction(
        model,
        image_set,
        cfg,
        store=st,
        heldout_set=heldout,
        sscd_path=args.sscd,
        on_progress=common.progress_printer("extract"),
        force=args.force,
        backend=common.get_backend(args),
    )
    common.emit(res.summary(), args.json)
    return 0
