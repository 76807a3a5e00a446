"""The bundled demo data (assets/demo_data): the reader. (The builder is the demo factory's,
`iarmem_core.demo.bundle`.)

- `load_demo(split)`: demo world v2's splits (train = 4000 unique images + 60 planted items of three kinds at
  two doses; twins; control; control_twins; heldout; ...), with per-item kind, role and dose;
- `demo_training_indices(seed)`: the demo models' training stream (planted items `dose` times per epoch);
- `select_demo(n, seed)`: the data selection D' (every item of known kind plus a class-stratified sample).
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
    images_N28: np.ndarray  # train (4000 unique), items (planted, twins, control, control twins), heldout (1000)
    labels: np.ndarray  # the training label (mislabeled items: the shifted one)
    source_index: np.ndarray
    split: np.ndarray  # "train" (the demo models' training data), "twin", "control", "control_twin", "heldout"
    count: np.ndarray  # times per epoch in the demo models' training stream (0: never)
    kind: np.ndarray  # "unique", "natural", "mislabeled", "ood", "control", "heldout"
    role: np.ndarray  # "unique", "planted", "twin", "heldout"
    true_label: np.ndarray  # the Fashion-MNIST label (-1 for block canaries)
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
            f"or re-create it with python -m iarmem_core train-demo --only data."
        )
    if manifest.get("format") != 2:
        raise ValueError(
            f"{d}: demo data of format {manifest.get('format')}; this iarmem reads format 2 (demo world "
            f"v2). Restore assets/demo_data from git or re-create it (train-demo --only data)."
        )
    n_tr, n_ho, n_it = len(arrays["train_labels"]), len(arrays["heldout_labels"]), len(arrays["items_labels"])
    role_it = arrays["items_role"].astype(str)
    kind_it = arrays["items_kind"].astype(str)
    split_it = np.where(
        kind_it == "control",
        np.where(role_it == "twin", "control_twin", "control"),
        np.where(role_it == "twin", "twin", "train"),
    )
    images_N28 = np.concatenate([arrays["train_images"], arrays["items_images"], arrays["heldout_images"]])
    images_N28.setflags(write=False)  # shared by every ImageSet of the process
    cat = np.concatenate
    return _Bundle(
        images_N28=images_N28,
        labels=cat([arrays["train_labels"], arrays["items_labels"], arrays["heldout_labels"]]).astype(np.int64),
        source_index=cat(
            [arrays["train_source_index"], arrays["items_source_index"], arrays["heldout_source_index"]]
        ).astype(np.int64),
        split=cat([np.full(n_tr, "train"), split_it, np.full(n_ho, "heldout")]).astype("<U12"),
        count=cat(
            [np.ones(n_tr, np.int64), np.where(split_it == "train", arrays["items_dose"], 0), np.zeros(n_ho, np.int64)]
        ).astype(np.int64),
        kind=cat([np.full(n_tr, "unique"), kind_it, np.full(n_ho, "heldout")]).astype("<U10"),
        role=cat([np.full(n_tr, "unique"), role_it, np.full(n_ho, "heldout")]).astype("<U8"),
        true_label=cat([arrays["train_labels"], arrays["items_true_label"], arrays["heldout_labels"]]).astype(np.int64),
        ids=[f"train/{i:04d}" for i in range(n_tr)]
        + [str(v) for v in arrays["items_ids"]]
        + [f"heldout/{i:04d}" for i in range(n_ho)],
        manifest={**manifest, "n_items": n_it},
    )


def load_bundle(bundle_dir: str | os.PathLike | None = None) -> _Bundle:
    d = Path(bundle_dir or DEMO_DIR).resolve()
    f = d / "fashion_subset.npz"
    if not f.exists() or not (d / "split.json").exists():
        raise FileNotFoundError(
            f"demo data not found: expected {f} and {d / 'split.json'}. They ship with the repository "
            f"(git checkout -- assets/demo_data); to re-create them run python -m iarmem_core train-demo --only data "
            f"(needs the Debian package dataset-fashion-mnist)."
        )
    return _load_bundle_cached(str(d), f.stat().st_mtime_ns)


DEMO_SPLITS = ("train", "planted", "unique", "twins", "control", "control_twins", "heldout", "all")


def load_demo(split: str = "train", bundle_dir: str | os.PathLike | None = None) -> ImageSet:
    """The bundled demo images of `split` as an ImageSet.

    Splits: train (what the demo models are trained on: 4000 unique images and the 60 planted items), planted,
    unique, twins (never-trained twins of the planted kinds), control (the positive-control canaries, trained only
    into demo-var-ctl), control_twins, heldout (1000 never-trained Fashion-MNIST test images), all.
    meta: split, kind (unique, natural, mislabeled, ood, control, heldout), role (unique, planted, twin, heldout),
    count (times per epoch in the demo models' stream), dose, planted (bool), true_label, source_index."""
    b = load_bundle(bundle_dir)
    select = {
        "train": b.split == "train",
        "planted": (b.split == "train") & (b.role == "planted"),
        "unique": b.role == "unique",
        "twins": b.split == "twin",
        "control": b.split == "control",
        "control_twins": b.split == "control_twin",
        "heldout": b.split == "heldout",
        "all": np.ones(len(b.ids), bool),
    }
    if split not in select:
        raise ValueError(f"unknown demo split {split!r}: expected one of {', '.join(DEMO_SPLITS)}")
    idx = np.flatnonzero(select[split])
    source = {
        "source": "demo",
        "dataset": "fashion-mnist-subset-v2",
        "arrays_sha256": b.manifest["arrays_sha256"],
        "transform": "pad2-gray3",
    }
    backend = _DemoBackend(b.images_N28, source)
    meta = {
        "split": b.split[idx],
        "kind": b.kind[idx],
        "role": b.role[idx],
        "count": b.count[idx],
        "dose": b.count[idx],
        "planted": (b.role[idx] == "planted") & (b.split[idx] == "train"),
        "true_label": b.true_label[idx],
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
    """The demo's data selection D' for UnitMem and extraction: n images.

    For the training split with `include_planted` (the default D'): every item of known kind (the planted items,
    their never-trained twins, the control canaries and their twins; 160) and a class-stratified, seeded sample
    of the unique training images for the rest, so both "does the top unit fire for a planted image" and its
    null ("... for a never-trained twin") can be asked; with n below the 160, the 20 natural planted items (8x
    and 32x, one per class each) and unique images for the rest. Otherwise a class-stratified sample of
    `split`. n=None takes the whole split (and the items). The result keeps the bundle's order."""
    items_in = include_planted and split == "train"
    base = load_demo("all" if items_in else split, bundle_dir)
    if items_in:
        keep = base.meta["split"] != "heldout"
        base = base.subset(np.flatnonzero(keep), name="demo/train+items")
    forced = np.flatnonzero(base.meta["role"] != "unique") if items_in else np.array([], int)
    if n is None or n >= len(base):
        return base.subset(np.arange(len(base)), name=f"demo/{split}" + ("+items" if items_in else ""))
    if len(forced) > n:
        # fewer images than items (a quick look, tests): the natural planted items (both doses, one per class
        # each) and unique images for the rest; below 20, natural items taken in turn from each dose
        m = base.meta
        forced = np.flatnonzero((m["role"] == "planted") & (m["kind"] == "natural"))
        if len(forced) > n:
            dose = m["dose"][forced]
            within = np.array([np.sum(dose[:j] == dose[j]) for j in range(len(forced))])  # rank in its dose
            forced = np.sort(forced[np.lexsort((dose, within))[:n]])
        items_only = np.flatnonzero(m["role"] != "unique")
        pool = np.setdiff1d(np.arange(len(base)), items_only)
        rng = np.random.default_rng(seed)
        by_class = [pool[base.labels[pool] == c] for c in range(len(base.classes))]
        quotas = class_quotas([len(c) for c in by_class], None, n - len(forced), None, rng)
        picked = [rng.permutation(c)[:q] for c, q in zip(by_class, quotas)]
        idx = np.sort(np.concatenate([forced, *picked]).astype(np.int64))
        return base.subset(idx, name=f"demo/{split}[n={n},seed={seed},natural items]")
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(len(base)), forced)
    by_class = [pool[base.labels[pool] == c] for c in range(len(base.classes))]
    quotas = class_quotas([len(c) for c in by_class], None, n - len(forced), None, rng)
    picked = [rng.permutation(c)[:q] for c, q in zip(by_class, quotas)]
    idx = np.sort(np.concatenate([forced, *picked]).astype(np.int64))
    tag = "+items" if len(forced) else ""
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
