"""The command line that reproduces a result: one function per command, from the same configuration objects the
app and the library use. Each returns a string that `build_parser` parses back into that configuration
(tests/test_cli.py checks the round trip: same store key)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PROG = "python -m iarmem_core"


@dataclass(frozen=True)
class ModelArgs:
    """What --model, --checkpoint, --tokenizer-checkpoint, --device and --seed say."""

    name: str
    checkpoint: str | None = None
    tokenizer_checkpoint: str | None = None
    device: str = "auto"
    seed: int = 0

    def flags(self) -> list[str]:
        out = ["--model", self.name]
        if self.checkpoint:
            out += ["--checkpoint", self.checkpoint]
        if self.tokenizer_checkpoint:
            out += ["--tokenizer-checkpoint", self.tokenizer_checkpoint]
        if self.device != "auto":
            out += ["--device", self.device]
        return out + ["--seed", str(int(self.seed))]


@dataclass(frozen=True)
class DataArgs:
    """What --data and --n say (demo, or an ImageFolder path), and --heldout (never-trained images added to D'
    for UnitMem's null control; --heldout-folder holds them for folder data)."""

    source: str = "demo"
    n: int = 500
    heldout: int = 0
    heldout_folder: str | None = None

    def flags(self) -> list[str]:
        out = ["--data", self.source, "--n", str(int(self.n))]
        if self.heldout:
            out += ["--heldout", str(int(self.heldout))]
            if self.heldout_folder:
                out += ["--heldout-folder", self.heldout_folder]
        return out


def _join(command: str, parts: Sequence[str]) -> str:
    return f"{PROG} {command} " + shlex.join(parts)


def unitmem_command(model: ModelArgs, data: DataArgs, cfg) -> str:
    """`unitmem` for a UnitMemConfig."""
    from iarmem_core.cli.unitmem import unitmem_flags

    return _join("unitmem", model.flags() + data.flags() + unitmem_flags(cfg, model.name) + ["--json"])


def extract_command(model: ModelArgs, data: DataArgs, cfg=None) -> str:
    """`extract` for an ExtractionConfig (None: the defaults)."""
    from iarmem_core.cli.extract import attack_flags

    return _join("extract", model.flags() + data.flags() + (attack_flags(cfg) if cfg is not None else []) + ["--json"])


def _units_flag(units: Mapping[int, Sequence[int]]) -> list[str]:
    pairs = [f"{int(b)}:{int(u)}" for b, us in sorted(units.items()) for u in sorted(us)]
    if not pairs:
        raise ValueError("no units picked: pick at least one unit (or use top-k%) to get a command")
    return ["--units", ",".join(pairs)]


def _edit_flags(top_percent, units, factor, op, ranking, combine) -> list[str]:
    from iarmem_core import intervention as iv

    out = _units_flag(units) if units is not None else []
    if units is None and top_percent is not None and float(top_percent) != iv.DEFAULT_TOP_PERCENT:
        out += ["--top-percent", f"{float(top_percent):g}"]
    if float(factor) != iv.DEFAULT_FACTOR:
        out += ["--factor", f"{float(factor):g}"]
    if op != iv.DEFAULT_OP:
        out += ["--op", op]
    if units is None and ranking != iv.DEFAULT_RANKING:
        out += ["--ranking", ranking]
    if units is None and str(combine) != iv.DEFAULT_COMBINE:
        out += ["--combine", str(combine)]
    return out


def intervene_command(
    model: ModelArgs,
    data: DataArgs,
    unitmem_cfg,
    *,
    top_percent: float | None = None,
    units: Mapping[int, Sequence[int]] | None = None,
    factor: float = 0.5,
    op: str = "fc1_scale",
    ranking: str = "global",
    combine="generated",
    sweep: bool = False,
    random_draws: int | None = None,
    n_samples: int | None = None,
) -> str:
    """`intervene` (one edit, or `sweep=True` for the trade-off table) on the units ranked by `unitmem_cfg`."""
    from iarmem_core import intervention as iv
    from iarmem_core.cli.unitmem import unitmem_flags

    parts = model.flags() + data.flags()
    parts += ["--sweep"] if sweep else []
    parts += _edit_flags(None if sweep else top_percent, None if sweep else units, factor, op, ranking, combine)
    if random_draws is not None:
        parts += ["--random-draws", str(int(random_draws))]
    if n_samples is not None and int(n_samples) != iv.DEFAULT_N_SAMPLES:
        parts += ["--n-samples", str(int(n_samples))]
    parts += unitmem_flags(unitmem_cfg, model.name, prefix="unitmem-")
    return _join("intervene", parts + ["--json"])


def curve_command(model: ModelArgs, data: DataArgs, unitmem_cfg, cfg=None) -> str:
    """`intervene --curve` (the dose-response curves, iarmem_core.dose) for a CurveConfig (None: the defaults);
    its seed is the one of `model` (--seed)."""
    from iarmem_core import dose
    from iarmem_core import intervention as iv
    from iarmem_core.cli.unitmem import unitmem_flags

    d, cfg = dose.CurveConfig(), cfg or dose.CurveConfig()
    parts = model.flags() + data.flags() + ["--curve"]
    if cfg.percents != d.percents:
        parts += ["--curve-percents", ",".join(f"{k:g}" for k in cfg.percents)]
    if cfg.op != d.op:
        parts += ["--curve-op", cfg.op]
    if cfg.factor != d.factor:
        parts += ["--curve-factor", f"{cfg.factor:g}"]
    if cfg.random_draws != d.random_draws:
        parts += ["--random-draws", str(cfg.random_draws)]
    if cfg.ranking != iv.DEFAULT_RANKING:
        parts += ["--ranking", cfg.ranking]
    if str(cfg.combine) != iv.DEFAULT_COMBINE:
        parts += ["--combine", str(cfg.combine)]
    lc, ld = cfg.localize, dose.CurveConfig().localize
    if lc.prefix_tokens is not None:
        parts += ["--prefix", str(lc.prefix_tokens)]
    if lc.similarity != ld.similarity:
        parts += ["--similarity", lc.similarity]
    if lc.threshold is not None:
        parts += ["--threshold", f"{lc.threshold:g}"]
    parts += unitmem_flags(unitmem_cfg, model.name, prefix="unitmem-")
    return _join("intervene", parts + ["--json"])


def sample_command(
    model: ModelArgs,
    data: DataArgs,
    unitmem_cfg,
    *,
    labels: Sequence[int],
    top_percent: float | None = None,
    units: Mapping[int, Sequence[int]] | None = None,
    factor: float = 0.5,
    op: str = "fc1_scale",
    ranking: str = "global",
    combine="generated",
    random_units: bool = False,
    out: str = "samples.png",
) -> str:
    """`sample` before/after an edit, written as a PNG grid."""
    from iarmem_core.cli.unitmem import unitmem_flags

    parts = model.flags() + data.flags() + ["--labels", ",".join(str(int(c)) for c in labels)]
    edit = _edit_flags(top_percent, units, factor, op, ranking, combine)
    if units is None and top_percent is not None and "--top-percent" not in edit:
        edit = ["--top-percent", f"{float(top_percent):g}"] + edit  # sample's default is 0 (no edit)
    parts += edit + (["--random-units"] if random_units else [])
    parts += unitmem_flags(unitmem_cfg, model.name, prefix="unitmem-") + ["--out", out]
    return _join("sample", parts)


def localize_command(model: ModelArgs, data: DataArgs, image_id: str | None = None, cfg=None) -> str:
    """`localize` of one image (or `--all` when image_id is None), with a LocalizeConfig (None: the defaults)."""
    from iarmem_core.localize import LocalizeConfig

    d, cfg = LocalizeConfig(), cfg or LocalizeConfig()
    parts = model.flags() + data.flags() + (["--image", image_id] if image_id else ["--all"])
    for field, flag in (
        ("prefix_tokens", "--prefix"),
        ("op", "--op"),
        ("factor", "--factor"),
        ("max_units", "--max-units"),
        ("random_draws", "--random-draws"),
        ("similarity", "--similarity"),
        ("threshold", "--threshold"),
        ("nemo_z", "--nemo-z"),
        ("quality_samples", "--quality-samples"),
    ):
        v = getattr(cfg, field)
        if v != getattr(d, field) and v is not None:
            parts += [flag, f"{v:g}" if isinstance(v, float) else str(v)]
    return _join("localize", parts + ["--json"])
