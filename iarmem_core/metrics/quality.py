"""Quality metrics: Frechet distance between two feature sets, and class accuracy of a classifier.

Implementation of the Frechet distance: torchmetrics' `FrechetInceptionDistance`, used through its
public API with a pass-through `feature` module, so features come from any `FeatureSpace` (checked to run
with torch 2.13, torchmetrics 1.9, no torchvision and no network). torchmetrics accumulates the sums in
float64 and returns ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 * sum(sqrt(eig(S_a S_b))). Its covariance is
one-pass (sum x x^T - n mu mu^T), which cancels badly when the features sit far from the origin, so both
sets are first shifted by the mean of set a (the distance is translation invariant). With fewer samples
than dimensions the covariances are singular and the distance is biased upwards: compare only numbers
computed with the same sample sizes and the same feature space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from iarmem_core.metrics.spaces import FeatureSpace, check_images

FD_IMPLEMENTATION = "torchmetrics.image.fid.FrechetInceptionDistance (pass-through feature module, float64)"


class _PassThrough(nn.Module):
    """Hands precomputed features [B, D] to torchmetrics unchanged; `num_features` tells it D."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, feats_BD: torch.Tensor) -> torch.Tensor:
        return feats_BD


def frechet_distance(feats_a_ND: torch.Tensor, feats_b_MD: torch.Tensor, chunk: int = 4096) -> float:
    """Frechet distance between Gaussians fitted to features [N, D] and [M, D] (torchmetrics' FID formula).

    Symmetric, 0 for identical sets; round-off below zero is returned as 0.0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, f in (("feats_a", feats_a_ND), ("feats_b", feats_b_MD)):
        if not isinstance(f, torch.Tensor) or f.ndim != 2:
            raise ValueError(
                f"{name}: expected features [N, D], got "
                f"{list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}"
            )
        if f.shape[0] < 2:
            raise ValueError(f"{name}: needs at least 2 samples for a covariance, got {f.shape[0]}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name}: contains NaN or inf; the feature extractor or the images are broken")
    if feats_a_ND.shape[1] != feats_b_MD.shape[1]:
        raise ValueError(
            f"feature sizes differ: {feats_a_ND.shape[1]} vs {feats_b_MD.shape[1]}; both sets "
            f"must come from the same feature space"
        )
    dim = feats_a_ND.shape[1]
    a, b = feats_a_ND.detach().cpu().double(), feats_b_MD.detach().cpu().double()
    shift_D = a.mean(0)
    fid = FrechetInceptionDistance(feature=_PassThrough(dim), reset_real_features=True)
    for c in (a - shift_D).split(chunk):
        fid.update(c, real=True)
    for c in (b - shift_D).split(chunk):
        fid.update(c, real=False)
    return max(float(fid.compute()), 0.0)


@dataclass(frozen=True)
class FrechetResult:
    metric: str  # "FID" in Inception space, else "FD[<space>]" (not comparable with published FID)
    value: float
    feature_space: str
    comparable_to_published_fid: bool
    n_a: int
    n_b: int
    dim: int
    implementation: str = FD_IMPLEMENTATION

    def to_dict(self) -> dict:
        return asdict(self)


def frechet_distance_images(space: FeatureSpace, images_a: torch.Tensor, images_b: torch.Tensor) -> FrechetResult:
    """Frechet distance between two image sets [N, 3, H, W], [M, 3, H, W] in [0, 1], in `space`, labelled."""
    fa, fb = space.features(images_a), space.features(images_b)
    return frechet_result(space, fa, fb)


def frechet_result(space: FeatureSpace, feats_a_ND: torch.Tensor, feats_b_MD: torch.Tensor) -> FrechetResult:
    """Labelled Frechet distance of features already computed in `space` (e.g. accumulated over batches)."""
    is_fid = space.name == "inception-v3-fid"
    return FrechetResult(
        metric="FID" if is_fid else f"FD[{space.name}]",
        value=frechet_distance(feats_a_ND, feats_b_MD),
        feature_space=space.name,
        comparable_to_published_fid=is_fid,
        n_a=feats_a_ND.shape[0],
        n_b=feats_b_MD.shape[0],
        dim=feats_a_ND.shape[1],
    )


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of images [B, 3, H, W] in [0, 1] whose argmax of classifier(images) equals labels [B].

    Runs on the device the classifier's parameters live on (the classifier is never moved: it may be shared).
    """
    if classifier.training:
        raise ValueError(
            "the classifier is in training mode; call .eval() first (BatchNorm and dropout "
            "would change its predictions)"
        )
    x = check_images(images, "class_accuracy images")
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {labels.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("class_accuracy of an empty set is undefined")
    dev = next(classifier.parameters(), torch.empty(0)).device
    correct = 0
    for xb, yb in zip(x.split(batch_size), labels.split(batch_size)):
        pred_B = classifier(xb.to(dev)).argmax(dim=1).cpu()
        correct += int((pred_B == yb).sum())
    return correct / x.shape[0]
