"""Similarity and quality metrics (METHOD.md sections 4 and 6).

- `featurenet`: the bundled Fashion-MNIST CNN (definition, save, load) behind the offline feature space.
- `spaces`: feature spaces with stable names: ``demo-fashion-cnn`` (bundled), ``inception-v3-fid``
  (user-supplied ``inception-2015-12-05.pt``), ``sscd-disc-mixup`` (user-supplied
  ``sscd_disc_mixup.torchscript.pt``).
- `quality`: Frechet distance (torchmetrics' FID engine on features) and class accuracy.
- `similarity`: SSIM, feature cosine, token match rate, SSCD cosine; a registry of named measures with
  thresholds, and `calibrate_threshold`.

Example:
    >>> from iarmem_core.metrics import DemoFeatureSpace, frechet_distance_images, similarity_measure
    >>> space = DemoFeatureSpace()                       # assets/demo-fashion-cnn.safetensors
    >>> frechet_distance_images(space, samples_B3HW, heldout_B3HW).to_dict()["metric"]
    'FD[demo-fashion-cnn]'
    >>> similarity_measure("ssim", threshold=0.8)(generated_B3HW, recon_B3HW).similar    # bool [B]
"""

from iarmem_core.metrics.featurenet import (
    FEATURE_SPACE_NAME,
    FeatureNet,
    FeatureNetConfig,
    fashion_to_input,
    load_feature_card,
    load_feature_net,
    save_feature_net,
)
from iarmem_core.metrics.quality import (
    FrechetResult,
    class_accuracy,
    frechet_distance,
    frechet_distance_images,
    frechet_result,
)
from iarmem_core.metrics.similarity import (
    MEASURES,
    SIMILARITY_MEASURES,
    Calibration,
    MeasureInfo,
    SimilarityMeasure,
    SimilarityResult,
    calibrate_threshold,
    canonical_measure,
    embeds,
    feature_cosine,
    score,
    score_features,
    similarity_measure,
    sscd_cosine,
    ssim,
    token_match_rate,
)
from iarmem_core.metrics.spaces import (
    FEATURE_SPACES,
    DemoFeatureSpace,
    FeatureSpace,
    InceptionFeatureSpace,
    SSCDFeatureSpace,
    feature_space,
    load_torchscript,
    resolve_space,
)

__all__ = [
    "FEATURE_SPACE_NAME",
    "FeatureNet",
    "FeatureNetConfig",
    "fashion_to_input",
    "load_feature_card",
    "load_feature_net",
    "save_feature_net",
    "FrechetResult",
    "class_accuracy",
    "frechet_distance",
    "frechet_distance_images",
    "frechet_result",
    "MEASURES",
    "SIMILARITY_MEASURES",
    "Calibration",
    "canonical_measure",
    "score",
    "score_features",
    "embeds",
    "MeasureInfo",
    "SimilarityMeasure",
    "SimilarityResult",
    "calibrate_threshold",
    "feature_cosine",
    "similarity_measure",
    "ssim",
    "sscd_cosine",
    "token_match_rate",
    "FEATURE_SPACES",
    "feature_space",
    "DemoFeatureSpace",
    "FeatureSpace",
    "InceptionFeatureSpace",
    "SSCDFeatureSpace",
    "load_torchscript",
    "resolve_space",
]
