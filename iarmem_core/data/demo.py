"""The bundled demo data (assets/demo_data): the reader. (The builder is the demo factory's,
`iarmem_core.demo.bundle`.)

- `load_demo(split)`: splits "train" (4000 unique training images, each once, with its duplication count),
  "heldout" (1000), "planted" (the duplicated ones), "unique" (train minus planted) and "all";
- `demo_training_indices(seed)`: the training stream with duplicates;
- `select_demo(n, seed)`: the data selection D' (every planted image plus a class-stratified sample).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from iarmem_core.data.imageset import ImageSet, _DemoBackend
from iarmem_core.data.sampling import class_quotas
from iarmem_core.store import arrays_sha256

REPO = Path(__file__).resolve().parent.parent.parent
DEMO_DIR = Path(os.environ.get("IARMEM_DEMO_DATA", REPO / "assets" / "demo_data"))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass
class _Bundle:
    images_N28: np.ndarray  # train (4000) then heldout (1000)
    labels: np.ndarray
    source_index: np.ndarray
    split: np.ndarray  # "train" / "heldout"
    count: np.ndarray  # times in the training stream (0 for held-out)
    ids: list[str]
    manifest: dict = field(default_factory=dict)


@lru_cache(maxsize=4)
def _load_bundle_cached(path: str, mtime_ns: int) -> _Bundle:
    d = Path(path)
    with np.load(d / "fashion_subset.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads((d / "split.json").read_text())
    if arrays_sha256(arrays) != manifest.get("arrays_sha256"):
        raise ValueError(
            f"{d / 'fashion_subset.npz'}: its content does not match the arrays_sha256 in split.json (the "
            f"file is damaged or from another build). Restore it from git (git checkout -- assets/demo_data) "
            f"or re-create it with python scripts/make_demo_data.py."
        )
    n_tr, n_ho = len(arrays["train_labels"]), len(arrays["heldout_labels"])
    images_N28 = np.concatenate([arrays["train_images"], arrays["heldout_images"]])
    images_N28.setflags(write=False)  # shared by every ImageSet of the process
    return _Bundle(
        images_N28=images_N28,
        labels=np.concatenate([arrays["train_labels"], arrays["heldout_labels"]]).astype(np.int64),
        source_index=np.concatenate([arrays["train_source_index"], arrays["heldout_source_index"]]).astype(np.int64),
        split=np.array(["train"] * n_tr + ["heldout"] * n_ho),
        count=np.concatenate([arrays["train_counts"], np.zeros(n_ho, np.int64)]).astype(np.int64),
        ids=[f"train/{i:04d}" for i in range(n_tr)] + [f"heldout/{i:04d}" for i in range(n_ho)],
        manifest=manifest,
    )


def load_bundle(bundle_dir: str | os.PathLike | None = None) -> _Bundle:
    d = Path(bundle_dir or DEMO_DIR).resolve()
    f = d / "fashion_subset.npz"
    if not f.exists() or not (d / "split.json").exists():
        raise FileNotFoundError(
            f"demo data not found: expected {f} and {d / 'split.json'}. They ship with the repository "
            f"(git checkout -- assets/demo_data); to re-create them run python scripts/make_demo_data.py "
            f"(needs the Debian package dataset-fashion-mnist)."
        )
    return _load_bundle_cached(str(d), f.stat().st_mtime_ns)


DEMO_SPLITS = ("train", "heldout", "planted", "unique", "all")


def load_demo(split: str = "train", bundle_dir: str | os.PathLike | None = None) -> ImageSet:
    """The bundled Fashion-MNIST demo images of `split` (train, heldout, planted, unique, all) as an ImageSet.

    meta: split ("train"/"heldout"), count (times in the training stream; 0 for held-out), planted (bool),
    source_index (index in the Fashion-MNIST source file)."""
    b = load_bundle(bundle_dir)
    is_train = b.split == "train"
    select = {
        "train": is_train,
        "heldout": ~is_train,
        "planted": is_train & (b.count > 1),
        "unique": is_train & (b.count == 1),
        "all": np.ones(len(b.ids), bool),
    }
    if split not in select:
        raise ValueError(f"unknown demo split {split!r}: expected one of {', '.join(DEMO_SPLITS)}")
    idx = np.flatnonzero(select[split])
    source = {
        "source": "demo",
        "dataset": "fashion-mnist-subset",
        "arrays_sha256": b.manifest["arrays_sha256"],
        "transform": "pad2-gray3",
    }
    backend = _DemoBackend(b.images_N28, source)
    meta = {
        "split": b.split[idx],
        "count": b.count[idx],
        "planted": b.count[idx] > 1,
        "source_index": b.source_index[idx],
    }
    return ImageSet(backend, idx, [b.ids[i] for i in idx], b.labels[idx], FASHION_CLASSES, meta, f"demo/{split}")


def demo_training_indices(seed: int = 0, epochs: int = 1, bundle_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The demo training stream: indices into load_demo("train"), image i repeated count[i] times,
    shuffled independently each epoch with a seeded generator; length epochs * sum(count)."""
    train = load_demo("train", bundle_dir)
    stream = np.repeat(np.arange(len(train)), train.meta["count"])
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(stream) for _ in range(epochs)]) if epochs > 0 else stream[:0]


def select_demo(
    n: int | None = 500,
    seed: int = 0,
    include_planted: bool = True,
    split: str = "train",
    bundle_dir: str | os.PathLike | None = None,
) -> ImageSet:
    """The demo's data selection D' for UnitMem and extraction: n images of `split`.

    With `include_planted` (training split only) every planted duplicate is in D' and the rest is a
    class-stratified, seeded sample of the other images, so "does the top unit fire for a planted image"
    can be asked at all; otherwise the whole sample is class-stratified. n=None takes the whole split.
    The result keeps the bundle's order (sorted by position in the split)."""
    base = load_demo(split, bundle_dir)
    if n is None or n >= len(base):
        return base.subset(np.arange(len(base)), name=f"demo/{split}")
    forced = np.flatnonzero(base.meta["planted"]) if include_planted and split == "train" else np.array([], int)
    if len(forced) > n:
        raise ValueError(f"n={n} is smaller than the {len(forced)} planted images; use n >= {len(forced)}")
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(len(base)), forced)
    by_class = [pool[base.labels[pool] == c] for c in range(len(base.classes))]
    quotas = class_quotas([len(c) for c in by_class], None, n - len(forced), None, rng)
    picked = [rng.permutation(c)[:q] for c, q in zip(by_class, quotas)]
    idx = np.sort(np.concatenate([forced, *picked]).astype(np.int64))
    tag = "+planted" if len(forced) else ""
    return base.subset(idx, name=f"demo/{split}[n={n},seed={seed}{tag}]")


def select_demo_with_null(
    n: int | None = 500, n_heldout: int = 500, seed: int = 0, bundle_dir: str | os.PathLike | None = None
) -> ImageSet:
    """D' for UnitMem's null control: `select_demo(n, seed)` followed by `n_heldout` never-trained held-out images
    (class-stratified, seeded); meta "trained" says which is which."""
    from iarmem_core.data.imageset import concat

    train = select_demo(n=n, seed=seed, bundle_dir=bundle_dir)
    if n_heldout <= 0:
        return train
    held = select_demo(n=n_heldout, seed=seed, split="heldout", bundle_dir=bundle_dir)
    return concat([train, held], trained=[True, False], name=f"{train.name} + {held.name} (never trained)")


def demo_manifest(bundle_dir: str | os.PathLike | None = None) -> dict:
    """The bundle's split.json (split, seed, sources, counts) as a dict."""
    return load_bundle(bundle_dir).manifest
