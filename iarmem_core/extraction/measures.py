"""The similarity measures of one attack: which can be computed here, and their scores per batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from iarmem_core import metrics
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.extraction.config import MEASURES, MIN_SSIM_SIZE, ExtractionConfig


def available_measures(adapter: IARAdapter, cfg: ExtractionConfig, sscd_path) -> tuple[list[str], dict]:
    """(measures to compute, {measure: why it is skipped})."""
    want = list(cfg.measures) if cfg.measures is not None else list(MEASURES)
    skipped = {}
    out = []
    for m in want:
        if m == "sscd" and sscd_path is None:
            skipped[m] = "no SSCD file (sscd_disc_mixup.torchscript.pt) given"
        elif m == "ssim" and adapter.image_size < MIN_SSIM_SIZE:
            skipped[m] = f"images of {adapter.image_size} px are smaller than SSIM's 11x11 window"
        elif m == "feature_cosine" and cfg.measures is None and adapter.spec.kind == "released":
            skipped[m] = "the bundled feature space is a Fashion-MNIST CNN; not meaningful for this model"
        elif m == "feature_cosine" and demo_space() is None:
            skipped[m] = "the bundled feature network (assets/demo-fashion-cnn.safetensors) is missing"
        else:
            out.append(m)
    sim = cfg.similarity
    if sim != "auto" and sim not in out:
        raise ValueError(f"similarity {sim!r} cannot be computed here: {skipped.get(sim, 'not requested')}")
    return out, skipped


def demo_space() -> metrics.FeatureSpace | None:
    """The bundled demo feature space, or None when its file is absent or broken (that only removes a measure)."""
    try:
        return metrics.resolve_space(None)
    except Exception:  # noqa: BLE001 - a missing or broken asset only removes feature_cosine
        return None


def compute_similarities(
    measures: Sequence[str],
    gen_B3HW: torch.Tensor,
    recon_B3HW: torch.Tensor,
    gen_BN: torch.Tensor,
    true_BN: torch.Tensor,
    prefix: int,
    sscd_path=None,
    *,
    recon_features: Mapping[str, torch.Tensor] | None = None,
    spaces: Mapping[str, metrics.FeatureSpace] | None = None,
) -> dict[str, np.ndarray]:
    """{measure: [B] float32} for generated vs reconstructed images (tokens for token_match).

    `recon_features` {measure: [B, D]}: the reconstruction's features for measures that embed images,
    computed before (`metrics.score_features`, e.g. stored with the reconstruction); `spaces` the resolved
    feature spaces (default: resolved here).
    """
    out = {}
    for m in measures:
        space = None
        if metrics.embeds(m):
            space = (spaces or {}).get(m)
            if space is None:
                space = metrics.resolve_space("sscd", sscd_path) if m == "sscd" else demo_space()
        s = metrics.score(
            m,
            images_a=gen_B3HW,
            images_b=recon_B3HW,
            tokens_a=gen_BN.cpu(),
            tokens_b=true_BN.cpu(),
            token_start=prefix,
            space=space,
            features_b=(recon_features or {}).get(m),
        )
        out[m] = s.float().numpy().astype(np.float32)
    return out
