"""Similarity measures for the extraction attack (METHOD.md section 4), each named in every result.

An image counts as extracted when its similarity to the tokenizer's reconstruction of the candidate is
*strictly above* the measure's threshold (for a distance, strictly below).

| name             | inputs | default threshold                 | what                                  |
|------------------|--------|-----------------------------------|---------------------------------------|
| `sscd`           | images | 0.75, published (Kowalczuk et al.) | cosine of SSCD embeddings (user file) |
| `ssim`           | images | uncalibrated default              | per-image SSIM, torchmetrics          |
| `feature_cosine` | images | uncalibrated default              | cosine in a FeatureSpace (demo CNN)   |
| `token_match`    | tokens | uncalibrated default              | fraction of equal tokens              |

Names are spelled with underscores everywhere (results, CLI, app); `canonical_measure` also accepts the
hyphenated spelling. `score(name, ...)` is the one dispatcher the attack uses.

The offline measures' defaults are placeholders until `calibrate_threshold` has been run on pairs that
are known copies and known non-copies (the demo's planted duplicates and held-out images); the
calibrated value then replaces them via `similarity_measure(name, threshold=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from iarmem_core.metrics.spaces import FeatureSpace, SSCDFeatureSpace, check_images, resolve_space

Tokens = torch.Tensor | Sequence[torch.Tensor]  # [B, N], or VAR's list of per-scale maps [B, ...]


def ssim(a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM [B] of images in [0, 1] (torchmetrics, 11x11 Gaussian window, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = check_images(a_B3HW, "ssim a"), check_images(b_B3HW, "ssim b")
    if a.shape != b.shape:
        raise ValueError(f"ssim: image shapes differ, {list(a.shape)} vs {list(b.shape)}; resize one set")
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim: images of {a.shape[-2]}x{a.shape[-1]} are smaller than the 11x11 window")
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none").reshape(-1)


def feature_cosine(
    space: FeatureSpace,
    a_B3HW: torch.Tensor,
    b_B3HW: torch.Tensor | None,
    features_b_BD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine [B] between the features of paired images a[i], b[i] in `space`.

    `features_b_BD` are b's features when already computed (`space.features(b)`, e.g. a stored
    reconstruction's); then b is not embedded again and may be None."""
    fb = space.features(b_B3HW) if features_b_BD is None else features_b_BD.float().cpu()
    if a_B3HW.shape[0] != fb.shape[0]:
        raise ValueError(f"feature_cosine: {a_B3HW.shape[0]} vs {fb.shape[0]} images; pairs are needed")
    fa = space.features(a_B3HW)
    return F.cosine_similarity(fa, fb, dim=1, eps=1e-12)


def _flat_tokens(t: Tokens, what: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        if t.ndim < 2:
            raise ValueError(f"{what}: expected tokens [B, N], got shape {list(t.shape)}")
        return t.reshape(t.shape[0], -1)
    return torch.cat([s.reshape(s.shape[0], -1) for s in t], dim=1)  # VAR: scales coarse to fine


def token_match_rate(tokens_a_BN: Tokens, tokens_b_BN: Tokens, start: int = 0) -> torch.Tensor:
    """Fraction [B] of flat token positions n >= start where a and b agree (start = prefix length to skip)."""
    a, b = _flat_tokens(tokens_a_BN, "tokens_a"), _flat_tokens(tokens_b_BN, "tokens_b")
    if a.shape != b.shape:
        raise ValueError(f"token_match_rate: shapes differ, {list(a.shape)} vs {list(b.shape)}")
    if not 0 <= start < a.shape[1]:
        raise ValueError(f"token_match_rate: start={start} leaves no token of {a.shape[1]} to compare")
    return (a[:, start:] == b[:, start:]).float().mean(dim=1)


def sscd_cosine(
    space: SSCDFeatureSpace,
    a_B3HW: torch.Tensor,
    b_B3HW: torch.Tensor | None,
    features_b_BD: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSCD similarity [B]: cosine of L2-normalised sscd_disc_mixup embeddings (copy when > 0.75)."""
    return feature_cosine(space, a_B3HW, b_B3HW, features_b_BD)


# ---------------------------------------------------------------------------------------------------
# Registry
@dataclass(frozen=True)
class MeasureInfo:
    name: str
    fn: Callable  # the raw score function; feature_cosine and sscd take the space first: fn(space, a, b)
    default_threshold: float
    description: str
    higher_is_more_similar: bool
    inputs: str  # "images" ([B, 3, H, W] in [0, 1]) or "tokens" ([B, N] or per-scale list)
    needs: str | None  # "feature_space", "sscd" (a path or SSCDFeatureSpace), or None
    threshold_source: str  # where the default comes from


_UNCALIBRATED = "uncalibrated default: calibrate on the demo"
SIMILARITY_MEASURES: dict[str, MeasureInfo] = {
    m.name: m
    for m in [
        MeasureInfo(
            "sscd",
            sscd_cosine,
            0.75,
            "cosine of SSCD sscd_disc_mixup embeddings (320x320, ImageNet normalisation); the protocol of "
            "Kowalczuk et al.",
            True,
            "images",
            "sscd",
            "published (Kowalczuk et al. 2025, cosine > 0.75)",
        ),
        MeasureInfo(
            "ssim",
            ssim,
            0.9,
            "per-image SSIM in [0, 1] pixels (torchmetrics, 11x11 Gaussian window); blank backgrounds "
            "inflate it, so read it next to token match",
            True,
            "images",
            None,
            _UNCALIBRATED,
        ),
        MeasureInfo(
            "feature_cosine",
            feature_cosine,
            0.95,
            "cosine of features in a FeatureSpace (default: the bundled demo-fashion-cnn)",
            True,
            "images",
            "feature_space",
            _UNCALIBRATED,
        ),
        MeasureInfo(
            "token_match",
            token_match_rate,
            0.9,
            "fraction of generated token positions equal to the candidate's true tokens (prefix excluded)",
            True,
            "tokens",
            None,
            _UNCALIBRATED,
        ),
    ]
}
MEASURES = ("sscd", "token_match", "ssim", "feature_cosine")  # the order results list them in
assert set(MEASURES) == set(SIMILARITY_MEASURES)


def canonical_measure(name: str, allow_auto: bool = True) -> str:
    """'feature-cosine' / 'Feature_Cosine' -> 'feature_cosine'; 'auto' stays (if allowed); unknown names raise."""
    n = str(name).strip().lower().replace("-", "_")
    if (n == "auto" and allow_auto) or n in SIMILARITY_MEASURES:
        return n
    raise ValueError(
        f"unknown similarity {name!r}: expected {'auto or ' if allow_auto else ''}one of "
        f"{', '.join(SIMILARITY_MEASURES)}"
    )


def _score_images(x: torch.Tensor) -> torch.Tensor:
    return x.float().cpu().clamp(0, 1)  # what every image measure sees


def embeds(name: str) -> bool:
    """True for the measures that compare images through a feature space (feature_cosine, sscd)."""
    return SIMILARITY_MEASURES[canonical_measure(name, allow_auto=False)].needs is not None


@torch.no_grad()
def score_features(name: str, images: torch.Tensor, space: FeatureSpace) -> torch.Tensor:
    """The features [B, D] that `score(name, ...)` computes for `images` (images_b): computed once, they can
    be passed back as `features_b` (same numbers, bit for bit, for the same batch of images)."""
    if not embeds(name):
        raise ValueError(f"measure {name} does not embed images in a feature space")
    return space.features(_score_images(images))


@torch.no_grad()
def score(
    name: str,
    *,
    images_a: torch.Tensor | None = None,
    images_b: torch.Tensor | None = None,
    tokens_a: Tokens | None = None,
    tokens_b: Tokens | None = None,
    token_start: int = 0,
    space: FeatureSpace | None = None,
    features_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [B] of measure `name` for pairs (a[i], b[i]): images in [0, 1] or tokens, as the measure needs.

    `space` is the feature space of feature_cosine and sscd (`iarmem_core.metrics.resolve_space`);
    `features_b` replaces embedding images_b there (`score_features`: b's features computed before).
    """
    m = SIMILARITY_MEASURES[canonical_measure(name, allow_auto=False)]
    if m.inputs == "tokens":
        return m.fn(tokens_a, tokens_b, start=token_start)
    a = _score_images(images_a)
    if m.needs is None:
        return m.fn(a, _score_images(images_b))
    if space is None:
        raise ValueError(f"measure {m.name} needs a feature space (resolve_space)")
    if features_b is not None:
        return m.fn(space, a, None, features_b)
    return m.fn(space, a, _score_images(images_b))


@dataclass(frozen=True)
class SimilarityResult:
    measure: str  # e.g. "ssim", "feature_cosine[demo-fashion-cnn]", "sscd"
    scores: torch.Tensor  # [B]
    threshold: float
    similar: torch.Tensor  # bool [B]: counted as a copy / extracted
    higher_is_more_similar: bool
    threshold_source: str

    def to_dict(self) -> dict:
        return {
            "measure": self.measure,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "higher_is_more_similar": self.higher_is_more_similar,
            "scores": self.scores.tolist(),
            "similar": self.similar.tolist(),
        }


@dataclass(frozen=True)
class SimilarityMeasure:
    """A named similarity with its threshold: `measure(a, b)` -> SimilarityResult."""

    name: str
    score_fn: Callable[[object, object], torch.Tensor] = field(repr=False)  # (a, b) -> [B]
    threshold: float
    description: str
    higher_is_more_similar: bool = True
    inputs: str = "images"
    threshold_source: str = "user"

    def decide(self, scores_B: torch.Tensor) -> torch.Tensor:
        """Bool [B]: strictly above the threshold (strictly below for a distance)."""
        return scores_B > self.threshold if self.higher_is_more_similar else scores_B < self.threshold

    def __call__(self, a, b) -> SimilarityResult:
        scores_B = self.score_fn(a, b).float().cpu()
        return SimilarityResult(
            self.name,
            scores_B,
            self.threshold,
            self.decide(scores_B),
            self.higher_is_more_similar,
            self.threshold_source,
        )

    def with_threshold(self, threshold: float, source: str = "calibrated") -> SimilarityMeasure:
        return replace(self, threshold=float(threshold), threshold_source=source)


def similarity_measure(
    name: str,
    *,
    threshold: float | None = None,
    threshold_source: str | None = None,
    feature_space: FeatureSpace | None = None,
    sscd: SSCDFeatureSpace | str | None = None,
    token_start: int = 0,
) -> SimilarityMeasure:
    """Build a registered measure; `threshold` overrides the default (e.g. with a calibrated value).

    `feature_cosine` uses `feature_space` (default: the bundled demo-fashion-cnn), `sscd` needs the SSCD
    file (path or SSCDFeatureSpace), `token_match` skips the first `token_start` tokens (the given prefix).
    """
    name = canonical_measure(name, allow_auto=False)
    info = SIMILARITY_MEASURES[name]
    label = name
    if name == "sscd":
        if sscd is None:
            raise ValueError(
                "the sscd measure needs the SSCD weights file sscd_disc_mixup.torchscript.pt "
                "(pass sscd=path); without it use ssim, feature_cosine or token_match"
            )
        space = sscd if isinstance(sscd, SSCDFeatureSpace) else resolve_space("sscd", sscd)
        fn = lambda a, b: sscd_cosine(space, a, b)  # noqa: E731
    elif name == "ssim":
        fn = ssim
    elif name == "feature_cosine":
        space = feature_space if feature_space is not None else resolve_space(None)
        label = f"feature_cosine[{space.name}]"
        fn = lambda a, b: feature_cosine(space, a, b)  # noqa: E731
    else:  # token_match
        fn = lambda a, b: token_match_rate(a, b, start=token_start)  # noqa: E731
    if threshold is None:
        thr, source = info.default_threshold, info.threshold_source
    else:
        thr, source = float(threshold), threshold_source or "user"
    return SimilarityMeasure(label, fn, thr, info.description, info.higher_is_more_similar, info.inputs, source)


# ---------------------------------------------------------------------------------------------------
# Threshold calibration
@dataclass(frozen=True)
class Calibration:
    threshold: float  # decision: score > threshold (higher-is-similar) or score < threshold (distance)
    false_rate: float  # fraction of 'different' pairs counted as similar at this threshold
    true_rate: float  # fraction of 'same' pairs counted as similar at this threshold
    max_false_rate: float
    n_same: int
    n_different: int
    higher_is_more_similar: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate_threshold(
    scores_same: torch.Tensor,
    scores_different: torch.Tensor,
    max_false_rate: float,
    higher_is_more_similar: bool = True,
) -> Calibration:
    """Most permissive threshold whose false-positive rate on 'different' pairs is at most `max_false_rate`.

    For a similarity (decision score > t) this is the lowest such t; it is always one of the 'different'
    scores: with M of them sorted ascending and m = floor(max_false_rate * M) false positives allowed,
    t = sorted[M - m - 1]. For a distance (score < t) it is the highest such t. The returned Calibration
    also reports the achieved false rate and the true rate on the 'same' pairs.
    """
    if not 0.0 <= max_false_rate < 1.0:
        raise ValueError(f"max_false_rate must lie in [0, 1), got {max_false_rate}")
    same = torch.as_tensor(scores_same, dtype=torch.float64).reshape(-1)
    diff = torch.as_tensor(scores_different, dtype=torch.float64).reshape(-1)
    if diff.numel() == 0:
        raise ValueError("calibrate_threshold needs at least one 'different' score")
    if not (torch.isfinite(same).all() and torch.isfinite(diff).all()):
        raise ValueError("calibrate_threshold: scores contain NaN or inf")
    sign = 1.0 if higher_is_more_similar else -1.0  # a distance is calibrated as a negated similarity
    d_sorted = (sign * diff).sort().values
    m_allowed = math.floor(max_false_rate * d_sorted.numel() + 1e-9)
    t = float(d_sorted[d_sorted.numel() - m_allowed - 1])
    false_rate = float((sign * diff > t).double().mean())
    true_rate = float((sign * same > t).double().mean()) if same.numel() else float("nan")
    return Calibration(
        sign * t + 0.0, false_rate, true_rate, float(max_false_rate), same.numel(), diff.numel(), higher_is_more_similar
    )
