"""Images for iarmem: the bundled demo subset, ImageFolder trees, conversions, augmentations, typed paths.

Everything ends as a float tensor `x_B3HW` in [0, 1] (the adapters convert to their tokenizer's range).

- `imageset`: `ImageSet` (indexable, labelled, lazily decoded) and `data_fingerprint` (its identity for
  store keys);
- `demo`: the bundled Fashion-MNIST demo data (`load_demo`, `select_demo`, `demo_training_indices`);
- `folders`: `load_image_folder` (ImageNet train layout, a class-stratified sample, bad files skipped);
- `augment`: UnitMem's views (`augment`, `augment_views`, seeded per image);
- `images`: conversions (`gray_to_input`, `pil_to_input`, `resize_square`, `to_uint8`);
- `paths`: `resolve_inside` (typed paths inside the allowed roots).

Example:
    >>> s = load_demo("planted")
    >>> s.images([0, 1], size=32).shape
    torch.Size([2, 3, 32, 32])
"""

from iarmem_core.data.augment import (
    AUGMENTATIONS,
    apply_view,
    augment,
    augment_views,
    parse_augmentation,
    view_seed,
)
from iarmem_core.data.demo import (
    DEMO_DIR,
    DEMO_SPLITS,
    FASHION_CLASSES,
    demo_manifest,
    demo_training_indices,
    load_demo,
    select_demo,
    select_demo_with_null,
)
from iarmem_core.data.folders import IMAGE_EXTENSIONS, load_image_folder
from iarmem_core.data.images import DEMO_NATIVE_SIZE, gray_to_input, pil_to_input, resize_square, to_uint8
from iarmem_core.data.imageset import ImageDecodeError, ImageSet, concat, data_fingerprint
from iarmem_core.data.paths import PathNotAllowedError, resolve_inside

__all__ = [
    "AUGMENTATIONS",
    "apply_view",
    "DEMO_DIR",
    "DEMO_NATIVE_SIZE",
    "DEMO_SPLITS",
    "FASHION_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageSet",
    "PathNotAllowedError",
    "augment",
    "augment_views",
    "concat",
    "data_fingerprint",
    "demo_manifest",
    "demo_training_indices",
    "gray_to_input",
    "load_demo",
    "load_image_folder",
    "parse_augmentation",
    "pil_to_input",
    "resize_square",
    "resolve_inside",
    "select_demo",
    "select_demo_with_null",
    "to_uint8",
    "view_seed",
]
