"""Build the demo bundle (assets/demo_data) from Debian's dataset-fashion-mnist: the demo factory's data step."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from iarmem_core.data.demo import FASHION_CLASSES
from iarmem_core.store import arrays_sha256

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# bundle layout (build_demo_bundle); changing any of these changes the bundle, so they live in split.json too
N_TRAIN_PER_CLASS = 400
N_HELDOUT_PER_CLASS = 100
PLANTED_COUNTS = (4, 16, 64)  # one image per class at each count
INK_LEVEL = 51  # a pixel counts as ink above 20% intensity
NEAR_DUP_CORR = 0.95  # planted images have no other selected image with pixel correlation >= this


def read_idx(path: Path, offset: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file (Fashion-MNIST's format) after its `offset`-byte header."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pick_unique(
    idx_by_class: list[np.ndarray],
    images: np.ndarray,
    n_per_class: int,
    rng: np.random.Generator,
    seen: set[bytes],
) -> np.ndarray:
    """Per class, walk a seeded permutation and take the first n images whose pixels are not already taken."""
    picked = []
    for c, cand in enumerate(idx_by_class):
        got = []
        for i in rng.permutation(cand):
            h = hashlib.sha256(images[i].tobytes()).digest()
            if h in seen:
                continue
            seen.add(h)
            got.append(int(i))
            if len(got) == n_per_class:
                break
        if len(got) < n_per_class:
            raise ValueError(f"class {c} has only {len(got)} distinct images, {n_per_class} needed")
        picked.extend(got)
    return np.sort(np.array(picked, dtype=np.int64))


def _write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so a rebuild gives the same bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=6)  # 9 is 10x slower for 1% less
    os.replace(tmp, path)


_LICENSE_TEXT = """\
The images in fashion_subset.npz are a subset of Fashion-MNIST.

Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms.
Han Xiao, Kashif Rasul, Roland Vollgraf. arXiv:1708.07747, 2017.
https://github.com/zalandoresearch/fashion-mnist
Obtained from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

_README_TEXT = """\
# Demo data: a Fashion-MNIST subset with planted duplicates

Derived from Fashion-MNIST (Zalando SE, MIT licence: see LICENSE_fashion-mnist.txt; Xiao, Rasul, Vollgraf
2017) as shipped by the Debian package `dataset-fashion-mnist`.

- `fashion_subset.npz` (uint8, no pickles): `train_images` [4000,28,28] (400 distinct images per class from
  the Fashion-MNIST training file), `train_labels`, `train_source_index` (row in the training file),
  `train_counts` (how often the image appears in the demo training stream: 1, or 4/16/64 for the 30 planted
  duplicates, one image per class at each count); `heldout_images` [1000,28,28] (100 per class from the
  t10k file), `heldout_labels`, `heldout_source_index`.
- `split.json`: ids ("train/0012", "heldout/0003"), the planted images with their counts, the seed, the
  source files with sha256, counts per class, the selection rules and a hash of the arrays.

Read it with `iarmem_core.data.load_demo(split)` and `demo_training_indices(seed)`; models see the images
padded by 2 px of background to 32x32, as 3 channels in [0, 1].

Re-create it (deterministic; needs `apt-get install dataset-fashion-mnist`):

    python scripts/make_demo_data.py            # writes assets/demo_data/
    python scripts/make_demo_data.py --out DIR --seed 0 --source /usr/share/datasets/fashion-mnist
"""


def build_demo_bundle(
    out_dir: str | os.PathLike, source_dir: str | os.PathLike = DEBIAN_FASHION_DIR, seed: int = 0
) -> dict:
    """Build the demo bundle from the Fashion-MNIST idx.gz files in `source_dir` into `out_dir`; returns
    split.json.

    Deterministic in (source files, seed). Selection: per class, a seeded permutation of that class's
    images, taking the first distinct ones (400 train, 100 held-out). Planted: per class 3 images drawn
    (seeded) from those with ink fraction at least the class median and no other selected image with
    pixel correlation >= 0.95, assigned counts 4, 16, 64 in draw order."""
    src, out = Path(source_dir), Path(out_dir)
    missing = [n for n in SOURCE_FILES.values() if not (src / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing in {src}: {', '.join(missing)}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist) or pass source_dir= a folder holding the four "
            f"idx .gz files."
        )
    tr_x = read_idx(src / SOURCE_FILES["train_images"], 16).reshape(-1, 28, 28)
    tr_y = read_idx(src / SOURCE_FILES["train_labels"], 8)
    te_x = read_idx(src / SOURCE_FILES["test_images"], 16).reshape(-1, 28, 28)
    te_y = read_idx(src / SOURCE_FILES["test_labels"], 8)
    n_classes = len(FASHION_CLASSES)

    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()  # exact duplicates never enter twice (train and held-out are disjoint in pixels)
    tr_idx = _pick_unique([np.flatnonzero(tr_y == c) for c in range(n_classes)], tr_x, N_TRAIN_PER_CLASS, rng, seen)
    ho_idx = _pick_unique([np.flatnonzero(te_y == c) for c in range(n_classes)], te_x, N_HELDOUT_PER_CLASS, rng, seen)
    train_x, train_y = tr_x[tr_idx], tr_y[tr_idx].astype(np.int64)
    ho_x, ho_y = te_x[ho_idx], te_y[ho_idx].astype(np.int64)

    # planted: recognisable (ink >= class median) and distinctive (no near-duplicate among the selected
    # images), so that extracting one is unambiguous and a held-out look-alike cannot pass for it
    ink = (train_x > INK_LEVEL).mean(axis=(1, 2))
    flat = np.concatenate([train_x, ho_x]).reshape(len(train_x) + len(ho_x), -1).astype(np.float64)
    flat -= flat.mean(1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True) + 1e-12
    counts = np.ones(len(train_x), np.int64)
    planted = []
    for c in range(n_classes):
        cls = np.flatnonzero(train_y == c)
        cand = cls[ink[cls] >= np.median(ink[cls])]
        corr = flat[cand] @ flat.T
        corr[np.arange(len(cand)), cand] = -1.0  # self
        cand = cand[corr.max(1) < NEAR_DUP_CORR]
        if len(cand) < len(PLANTED_COUNTS):
            raise ValueError(f"class {c}: only {len(cand)} images qualify for planting")
        for i, n in zip(rng.choice(cand, size=len(PLANTED_COUNTS), replace=False), PLANTED_COUNTS):
            counts[i] = n
            planted.append(
                {
                    "id": f"train/{i:04d}",
                    "index": int(i),
                    "label": int(c),
                    "class_name": FASHION_CLASSES[c],
                    "count": int(n),
                    "source_index": int(tr_idx[i]),
                    "ink_fraction": round(float(ink[i]), 4),
                }
            )
    planted.sort(key=lambda p: (p["count"], p["label"]))

    arrays = {
        "train_images": train_x,
        "train_labels": train_y,
        "train_source_index": tr_idx,
        "train_counts": counts,
        "heldout_images": ho_x,
        "heldout_labels": ho_y,
        "heldout_source_index": ho_idx,
    }
    train_ids = [f"train/{i:04d}" for i in range(len(train_x))]
    split = {
        "format": 1,
        "dataset": "Fashion-MNIST subset with planted duplicates",
        "seed": seed,
        "classes": list(FASHION_CLASSES),
        "source": {
            "package": "dataset-fashion-mnist (Debian), /usr/share/datasets/fashion-mnist",
            "files": {n: {"sha256": _sha256_file(src / n)} for n in SOURCE_FILES.values()},
            "licence": "MIT, Copyright (c) 2017 Zalando SE",
            "citation": "Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747",
        },
        "conversion": (
            "Images kept as in the source: uint8 28x28 grayscale, 0 = background. The loaders pad 2 px of "
            "background to 32x32 and repeat to 3 channels, float in [0, 1]; other sizes are resized "
            "(bilinear) from 32x32."
        ),
        "selection": {
            "train": (
                f"per class, a seeded permutation of the class's training-file rows; the first "
                f"{N_TRAIN_PER_CLASS} images whose pixels differ from every image taken before; sorted by "
                f"source row"
            ),
            "heldout": (
                f"the same on the t10k file, {N_HELDOUT_PER_CLASS} per class, excluding pixel-identical "
                f"copies of training images"
            ),
            "planted": (
                f"per class {len(PLANTED_COUNTS)} training images drawn with the same generator from those "
                f"with ink fraction (pixels > {INK_LEVEL}) >= the class median and whose highest pixel "
                f"correlation with any other selected image is < {NEAR_DUP_CORR}; counts "
                f"{list(PLANTED_COUNTS)} in draw order"
            ),
            "ids": "train/NNNN and heldout/NNNN index the arrays in fashion_subset.npz",
        },
        "n_train_unique_images": int(len(train_x)),
        "n_heldout": int(len(ho_x)),
        "n_planted": len(planted),
        "training_stream_length": int(counts.sum()),
        "counts_per_class": {
            "train": np.bincount(train_y, minlength=n_classes).tolist(),
            "heldout": np.bincount(ho_y, minlength=n_classes).tolist(),
            "planted": np.bincount(train_y[counts > 1], minlength=n_classes).tolist(),
        },
        "planted": planted,
        "train_ids": train_ids,
        "unique_ids": [t for t, n in zip(train_ids, counts) if n == 1],
        "heldout_ids": [f"heldout/{i:04d}" for i in range(len(ho_x))],
        "arrays_sha256": arrays_sha256(arrays),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_npz_deterministic(out / "fashion_subset.npz", arrays)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    (out / "LICENSE_fashion-mnist.txt").write_text(_LICENSE_TEXT)
    (out / "README.md").write_text(_README_TEXT)
    return split
