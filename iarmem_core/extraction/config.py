"""Configuration of the extraction attack: options, the paper's prefix, the demo's held-out sets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from iarmem_core import data, metrics
from iarmem_core.adapters.base import IARAdapter, check_precision

KIND = "extraction"
SCORE_KIND = "memscore"
CALIBRATION_KIND = "extraction-calibration"
VERSION = "2"  # bump when the algorithm's output changes (it goes into the store key)
TAIL_TOKENS = 99  # next-token models rank by the last 99 image tokens (METHOD.md section 3)
PAPER_PREFIX = 30  # 30 tokens: 4 scales of VAR-256, 30 of RAR's 256 tokens (Kowalczuk et al.)
PAPER_PREFIX_SCALES = 4
PAPER_NEXT_TOKEN_N = 256
MEASURES = metrics.MEASURES
SSCD_THRESHOLD = 0.75
MIN_SSIM_SIZE = 11  # SSIM's Gaussian window is 11x11
DEFAULT_MAX_FALSE_RATE = 0.0  # the highest score of any calibration held-out image (see the docstring)


# ---------------------------------------------------------------------------------------------------
# 2. Configuration
@dataclass(frozen=True)
class ExtractionConfig:
    """Options of an extraction attack. `similarity` and `threshold` only pick the decision (a recount)."""

    candidates_per_class: int = 5  # top-k per class by the per-image memorization score
    candidate_ids: tuple[str, ...] | None = None  # or an explicit list of image ids
    prefix_tokens: tuple[int, ...] | None = None  # None -> family default (VAR: whole scales); several = sweep
    similarity: str = "auto"  # sscd (needs sscd_path), ssim, feature_cosine, token_match, auto
    threshold: float | None = None  # None -> the measure's calibrated / published threshold
    cfg: float = 0.0  # greedy, class-conditional, no CFG: the paper's attack
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    batch_size: int = 16
    heldout: bool = True  # also attack held-out images (the false rate)
    seed: int = 0
    heldout_n: int = 200  # demo: class-stratified held-out images attacked (disjoint from calibration)
    gallery_size: int = 128  # stored images are downsampled to at most this many pixels a side
    measures: tuple[str, ...] | None = None  # None -> every measure available for this model
    # precision of the tokenizer's decoder for the compared images (generations and reconstructions; token ids
    # and teacher forcing stay fp32): "bf16" is ~2-3x faster on CPUs with AVX512-BF16 and on GPUs, shifts the
    # image similarities slightly (decisions of the demo attack unchanged, tests/test_extraction_cache.py)
    decode_dtype: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "similarity", metrics.canonical_measure(self.similarity))
        if self.candidate_ids is not None:
            object.__setattr__(self, "candidate_ids", tuple(str(i) for i in self.candidate_ids))
        if self.prefix_tokens is not None:
            p = self.prefix_tokens
            p = (p,) if isinstance(p, int) else tuple(int(v) for v in p)
            if not p:
                raise ValueError("prefix_tokens is empty: give at least one prefix length, or None")
            object.__setattr__(self, "prefix_tokens", p)
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(metrics.canonical_measure(m) for m in self.measures))
        if self.candidates_per_class < 1 and self.candidate_ids is None:
            raise ValueError(f"candidates_per_class must be >= 1, got {self.candidates_per_class}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        try:
            check_precision(self.decode_dtype)
        except ValueError as e:
            raise ValueError(f"ExtractionConfig.decode_dtype: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("candidate_ids", "prefix_tokens", "measures"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    def job_dict(self) -> dict:
        """The fields that determine the stored table (the decision fields are left out)."""
        d = self.to_dict()
        d.pop("similarity")
        d.pop("threshold")
        if d["decode_dtype"] == "fp32":
            d.pop("decode_dtype")  # the reference precision: keys of results from before the option stay valid
        return d


def default_prefix(adapter: IARAdapter) -> int:
    """The paper's prefix, carried over by its meaning: VAR 4 whole scales (30 tokens of VAR-256; fewer when
    the model has at most 4 scales), next-token models the same fraction of the image as 30 of RAR's 256
    tokens (30 for 16x16 grids, 8 for 8x8)."""
    if len(adapter.token_grids) > 1:
        n_scales = min(PAPER_PREFIX_SCALES, len(adapter.token_grids) - 1)
        return adapter.scale_slices[n_scales - 1].stop
    return max(1, round(PAPER_PREFIX * adapter.n_tokens / PAPER_NEXT_TOKEN_N))


def resolve_prefixes(adapter: IARAdapter, cfg: ExtractionConfig) -> list[int]:
    prefixes = list(cfg.prefix_tokens) if cfg.prefix_tokens is not None else [default_prefix(adapter)]
    for p in prefixes:
        adapter.check_prefix(p)
        if p >= adapter.n_tokens:
            raise ValueError(f"a prefix of {p} tokens leaves nothing to generate ({adapter.n_tokens} tokens)")
    return list(dict.fromkeys(prefixes))


def demo_heldout_sets(n_eval: int = 200, seed: int = 0) -> tuple[data.ImageSet, data.ImageSet]:
    """(evaluation, calibration): a class-stratified sample of the demo's held-out split and the rest."""
    base = data.load_demo("heldout")
    ev = data.select_demo(n=n_eval, seed=seed, split="heldout")
    rest = np.setdiff1d(np.arange(len(base)), [base.ids.index(i) for i in ev.ids])
    return ev, base.subset(rest, name=f"demo/heldout[calibration, not in n={n_eval},seed={seed}]")


def is_demo_set(image_set: data.ImageSet) -> bool:
    return image_set.describe().get("source") == "demo"
