"""Images for iarmem: the bundled Fashion-MNIST demo subset, ImageFolder trees, conversions, augmentations.

Everything ends as a float tensor `x_B3HW` in [0, 1] (the adapters convert to their tokenizer's range).

- `load_demo(split)`: the bundled demo data (assets/demo_data), splits "train" (4000 unique training images,
  each once, with its duplication count), "heldout" (1000), "planted" (the 30 duplicated ones), "unique"
  (train minus planted) and "all"; `demo_training_indices(seed)` is the training stream with duplicates.
- `load_image_folder(root, size, ...)`: class subfolders sorted by name -> class index (ImageNet train
  layout), a class-stratified sample, lazily decoded; bad files are skipped and counted.
- `augment(x, "crop+flip", generator)` / `augment_views(x, aug, n_views, seed, keys)`: UnitMem's views.
- `ImageSet.describe()` / `data_fingerprint(s)`: a JSON-able identity of a selection for store keys.

Example:
    >>> s = load_demo("planted")
    >>> s.images([0, 1], size=32).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = Path(os.environ.get("IARMEM_DEMO_DATA", REPO / "assets" / "demo_data"))
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
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
DEMO_NATIVE_SIZE = 32  # 28x28 padded by 2 px of background
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


# ----------------------------------------------------------------------------------------------------------
# conversions


def resize_square(x_B3HW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [B,C,H,W] to [B,C,size,size] (bilinear, antialiased when shrinking), clamped to [0, 1]."""
    if x_B3HW.shape[-2:] == (size, size):
        return x_B3HW
    shrink = size < max(x_B3HW.shape[-2:])
    y = F.interpolate(x_B3HW, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.clamp_(0.0, 1.0)


def gray_to_input(
    images_BHW: np.ndarray | torch.Tensor, size: int = DEMO_NATIVE_SIZE, pad: int = 2, background: float = 0.0
) -> torch.Tensor:
    """Gray [B,H,W] or [H,W] (uint8 0..255, or float already in [0, 1]) -> float [B,3,size,size] in [0, 1].

    Pads `pad` px of background, repeats to 3 channels, then resizes if the padded size is not `size`
    (Fashion-MNIST's 28x28 -> 32x32 needs no resize)."""
    x = torch.as_tensor(np.asarray(images_BHW))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected gray images [B,H,W] or [H,W], got shape {tuple(x.shape)}")
    x_B1HW = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float())[:, None]
    x_B1HW = F.pad(x_B1HW, (pad, pad, pad, pad), value=background)
    return resize_square(x_B1HW, size).expand(-1, 3, -1, -1).contiguous()


def pil_to_input(img, size: int) -> torch.Tensor:
    """A PIL image of any mode and size -> float [3,size,size] in [0, 1]: RGB, shorter side resized to
    `size` (bicubic), center crop. Transparency is composited over white; 16-bit images are scaled."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("L") clips 16/32-bit values at 255 instead of scaling them
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


# ----------------------------------------------------------------------------------------------------------
# ImageSet


class ImageDecodeError(ValueError):
    """An image file that passed the header check but failed to decode."""


class PathNotAllowedError(ValueError):
    """A data path that resolves outside the allowed roots."""


class _DemoBackend:
    """The bundled arrays; images are uint8 [N,28,28]."""

    native_size = DEMO_NATIVE_SIZE

    def __init__(self, images_N28: np.ndarray, source: dict):
        self.images_N28 = images_N28
        self.source = source

    def load(self, src_idx: np.ndarray, size: int) -> torch.Tensor:
        return gray_to_input(self.images_N28[src_idx], size=size)


class _FolderBackend:
    """Image files decoded on demand (threads: PIL releases the GIL while decoding)."""

    def __init__(
        self, root: Path, rel_paths: list[str], native_size: int, source: dict, num_workers: int = 4
    ):
        self.root = root
        self.rel_paths = rel_paths
        self.native_size = native_size
        self.source = source
        self.num_workers = num_workers
        self._pool: ThreadPoolExecutor | None = None

    def _one(self, i: int, size: int) -> torch.Tensor:
        from PIL import Image

        path = self.root / self.rel_paths[i]
        try:
            with Image.open(path) as img:
                return pil_to_input(img, size)
        except Exception as e:  # any decoder error becomes one clear message
            raise ImageDecodeError(
                f"{path}: the header looked fine but the image could not be decoded "
                f"({type(e).__name__}: {e}). Remove or replace the file, or load the folder with "
                f"check='decode' to skip such files."
            ) from e

    def load(self, src_idx: np.ndarray, size: int) -> torch.Tensor:
        idx = [int(i) for i in src_idx]
        if len(idx) <= 2 or self.num_workers <= 1:
            out = [self._one(i, size) for i in idx]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.num_workers, thread_name_prefix="iarmem-decode"
                )
            out = list(self._pool.map(lambda i: self._one(i, size), idx))
        return torch.stack(out) if out else torch.zeros(0, 3, size, size)


class ImageSet:
    """An indexable, labelled image collection; `images(indices, size)` -> float [B,3,size,size] in [0, 1].

    `ids` are stable strings ("train/0012", or a path relative to the folder root), `labels` an int64
    array, `meta` per-item arrays (demo: split, count = times in the training stream, planted,
    source_index; folder: path).
    """

    def __init__(
        self,
        backend,
        src_idx: np.ndarray,
        ids: list[str],
        labels: np.ndarray,
        classes: Sequence[str],
        meta: dict[str, np.ndarray],
        name: str,
        report: dict | None = None,
    ):
        self._backend = backend
        self._src = np.asarray(src_idx, dtype=np.int64)
        self.ids = list(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.meta = meta
        self.name = name
        self.report = report or {}  # folder sets: scanned / skipped counts with reasons
        self._ids_sha: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, n={len(self)}, classes={len(self.classes)})"

    @property
    def native_size(self) -> int:
        return self._backend.native_size

    def _idx(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(len(self))
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {self!r}: got {idx.min()}..{idx.max()}")
        return idx % max(len(self), 1)

    def images(self, indices=None, size: int | None = None) -> torch.Tensor:
        """Images at `indices` (default all) as float [B,3,size,size] in [0, 1]; size defaults to native."""
        return self._backend.load(self._src[self._idx(indices)], size or self.native_size)

    def labels_tensor(self, indices=None) -> torch.Tensor:
        """Labels at `indices` as int64 [B]."""
        return torch.from_numpy(self.labels[self._idx(indices)].copy())

    def item_meta(self, i: int) -> dict:
        """JSON-able metadata of item i: id, label, class name and the per-item meta fields."""
        d = {
            "index": int(i),
            "id": self.ids[i],
            "label": int(self.labels[i]),
            "class_name": self.classes[self.labels[i]],
        }
        for k, v in self.meta.items():
            x = v[i]
            d[k] = x.item() if hasattr(x, "item") else x
        return d

    def iter_batches(
        self,
        batch_size: int = 64,
        size: int | None = None,
        indices=None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Yields (indices [B], images [B,3,S,S], labels [B]) over `indices` (default all), in order."""
        idx = self._idx(indices)
        for s in range(0, len(idx), batch_size):
            b = idx[s : s + batch_size]
            yield b, self.images(b, size), self.labels_tensor(b)

    def subset(self, indices, name: str | None = None) -> ImageSet:
        """A new ImageSet of the items at `indices` (same backend, no copy of pixels)."""
        idx = self._idx(indices)
        return ImageSet(
            self._backend,
            self._src[idx],
            [self.ids[i] for i in idx],
            self.labels[idx],
            self.classes,
            {k: v[idx] for k, v in self.meta.items()},
            name or f"{self.name}[subset]",
            self.report,
        )

    def ids_sha256(self) -> str:
        if self._ids_sha is None:
            self._ids_sha = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
        return self._ids_sha

    def describe(self) -> dict:
        """JSON-able identity of this selection (source, root, sample spec, seed, n, hash of ids)."""
        return {
            **self._backend.source,
            "selection": self.name,
            "n_images": len(self),
            "ids_sha256": self.ids_sha256(),
        }


def data_fingerprint(image_set: ImageSet) -> dict:
    """The JSON-able identity of a data selection, for result-store keys (same as `image_set.describe()`)."""
    return image_set.describe()


# ----------------------------------------------------------------------------------------------------------
# the bundled demo data


@dataclass
class _Bundle:
    images_N28: np.ndarray  # train (4000) then heldout (1000)
    labels: np.ndarray
    source_index: np.ndarray
    split: np.ndarray  # "train" / "heldout"
    count: np.ndarray  # times in the training stream (0 for held-out)
    ids: list[str]
    manifest: dict = field(default_factory=dict)


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@lru_cache(maxsize=4)
def _load_bundle_cached(path: str, mtime_ns: int) -> _Bundle:
    d = Path(path)
    with np.load(d / "fashion_subset.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads((d / "split.json").read_text())
    if _arrays_sha256(arrays) != manifest.get("arrays_sha256"):
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
        source_index=np.concatenate([arrays["train_source_index"], arrays["heldout_source_index"]]).astype(
            np.int64
        ),
        split=np.array(["train"] * n_tr + ["heldout"] * n_ho),
        count=np.concatenate([arrays["train_counts"], np.zeros(n_ho, np.int64)]).astype(np.int64),
        ids=[f"train/{i:04d}" for i in range(n_tr)] + [f"heldout/{i:04d}" for i in range(n_ho)],
        manifest=manifest,
    )


def _load_bundle(bundle_dir: str | os.PathLike | None = None) -> _Bundle:
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
    b = _load_bundle(bundle_dir)
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
    return ImageSet(
        backend, idx, [b.ids[i] for i in idx], b.labels[idx], FASHION_CLASSES, meta, f"demo/{split}"
    )


def demo_training_indices(
    seed: int = 0, epochs: int = 1, bundle_dir: str | os.PathLike | None = None
) -> np.ndarray:
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
    quotas = _quotas([len(c) for c in by_class], None, n - len(forced), None, rng)
    picked = [rng.permutation(c)[:q] for c, q in zip(by_class, quotas)]
    idx = np.sort(np.concatenate([forced, *picked]).astype(np.int64))
    tag = "+planted" if len(forced) else ""
    return base.subset(idx, name=f"demo/{split}[n={n},seed={seed}{tag}]")


def demo_manifest(bundle_dir: str | os.PathLike | None = None) -> dict:
    """The bundle's split.json (split, seed, sources, counts) as a dict."""
    return _load_bundle(bundle_dir).manifest


# ----------------------------------------------------------------------------------------------------------
# building the bundle from Debian's dataset-fashion-mnist


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
    tr_idx = _pick_unique(
        [np.flatnonzero(tr_y == c) for c in range(n_classes)], tr_x, N_TRAIN_PER_CLASS, rng, seen
    )
    ho_idx = _pick_unique(
        [np.flatnonzero(te_y == c) for c in range(n_classes)], te_x, N_HELDOUT_PER_CLASS, rng, seen
    )
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
        "arrays_sha256": _arrays_sha256(arrays),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_npz_deterministic(out / "fashion_subset.npz", arrays)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    (out / "LICENSE_fashion-mnist.txt").write_text(_LICENSE_TEXT)
    (out / "README.md").write_text(_README_TEXT)
    return split


# ----------------------------------------------------------------------------------------------------------
# ImageFolder trees


def resolve_inside(path: str | os.PathLike, allowed_roots: Sequence[str | os.PathLike] | None) -> Path:
    """`path` resolved (symlinks followed); with allowed_roots, PathNotAllowedError unless inside one."""
    p = Path(path).expanduser().resolve()
    if allowed_roots is None:
        return p
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    if not any(p == r or p.is_relative_to(r) for r in roots):
        raise PathNotAllowedError(
            f"{path} resolves to {p}, which is outside the allowed data folders "
            f"({', '.join(map(str, roots)) or 'none configured'}). Put the data under one of them, or add "
            f"its folder to the allowed roots."
        )
    return p


def _check_file(path: Path, check: str) -> str | None:
    """None if the file opens as an image (header, or full decode with check='decode'); else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if check == "decode":
                img.load()
            else:
                img.verify()  # reads the structure (PNG chunks and CRCs) without decoding pixels
        return None
    except Exception as e:  # every failure is a skip reason, never fatal
        return f"not a readable image ({type(e).__name__})"


def _quotas(
    n_avail: list[int],
    fraction: float | None,
    count: int | None,
    per_class: int | None,
    rng: np.random.Generator,
) -> list[int]:
    n_cls = len(n_avail)
    if fraction is not None:
        # round half up per class, at least one: 1% of ImageNet gives 13 of 1300 and 7 of 732
        return [min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0 for n in n_avail]
    if per_class is not None:
        return [min(n, per_class) for n in n_avail]
    if count is not None:
        quota = [0] * n_cls
        left = count
        # fill evenly; classes that run out give their share to the others (seeded tie order)
        while left > 0:
            open_ = [c for c in range(n_cls) if quota[c] < n_avail[c]]
            if not open_:
                break
            share, extra = divmod(left, len(open_))
            lucky = set(rng.permutation(open_)[:extra].tolist())
            for c in open_:
                add = min(share + (c in lucky), n_avail[c] - quota[c])
                quota[c] += add
                left -= add
        return quota
    return list(n_avail)


def load_image_folder(
    root: str | os.PathLike,
    size: int,
    fraction: float | None = None,
    count: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    check: str = "header",
    num_workers: int = 4,
) -> ImageSet:
    """An ImageFolder tree (class subfolders sorted by name -> class index) as a lazily decoded ImageSet.

    Sample: `fraction` of each class (round half up, at least 1), a total `count` (spread evenly over the
    classes), or `per_class` images per class; at most one of them; none = everything. Each class draws from a
    seeded permutation and replaces files that fail `check` ("header": PIL opens and verifies the header;
    "decode": full decode, slower) by the next ones, so the counts are exact while enough good files exist.
    Skipped files are counted by reason in `.report`. Images convert to RGB, shorter side -> `size`, center
    crop.
    """
    if sum(x is not None for x in (fraction, count, per_class)) > 1:
        raise ValueError(
            f"give at most one of fraction, count, per_class (got fraction={fraction}, count={count}, "
            f"per_class={per_class})"
        )
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    for name, v in (("count", count), ("per_class", per_class), ("size", size)):
        if v is not None and (int(v) != v or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if check not in ("header", "decode"):
        raise ValueError(f"check must be 'header' or 'decode', got {check!r}")
    root_p = resolve_inside(root, allowed_roots)
    if not root_p.is_dir():
        raise NotADirectoryError(
            f"{root}: not a folder. Expected an ImageFolder tree: <root>/<class name>/<image files>."
        )
    allowed = [Path(r).expanduser().resolve() for r in allowed_roots] if allowed_roots is not None else None

    skipped: Counter[str] = Counter()
    skipped_files: list[tuple[str, str]] = []

    def skip(rel: str, reason: str) -> None:
        skipped[reason] += 1
        if len(skipped_files) < 100:
            skipped_files.append((rel, reason))

    classes = sorted(e.name for e in os.scandir(root_p) if e.is_dir() and not e.name.startswith("."))
    for e in os.scandir(root_p):
        if e.is_file():
            skip(e.name, "not inside a class folder")
    files_by_class: list[list[str]] = []
    n_scanned = 0
    for c in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(root_p / c):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                n_scanned += 1
                rel = Path(dirpath, fn).relative_to(root_p).as_posix()
                if fn.startswith("."):
                    skip(rel, "hidden file")
                elif not fn.lower().endswith(IMAGE_EXTENSIONS):
                    skip(rel, f"not an image file (extension {Path(fn).suffix or 'none'})")
                else:
                    files.append(rel)
        files_by_class.append(files)

    rng = np.random.default_rng(seed)
    quotas = _quotas([len(f) for f in files_by_class], fraction, count, per_class, rng)
    sampled = any(x is not None for x in (fraction, count, per_class))
    chosen: list[tuple[str, int]] = []
    shortfall = {}
    for c, (files, q) in enumerate(zip(files_by_class, quotas)):
        order = rng.permutation(len(files)) if q < len(files) else np.arange(len(files))
        got = 0
        for j in order:
            if got == q:
                break
            rel = files[j]
            path = root_p / rel
            if allowed is not None and not any(path.resolve().is_relative_to(r) for r in allowed):
                skip(rel, "links outside the allowed roots")
                continue
            reason = _check_file(path, check)
            if reason:
                skip(rel, reason)
                continue
            chosen.append((rel, c))
            got += 1
        wanted = per_class if per_class is not None else q  # a class smaller than per_class is short too
        if got < wanted and sampled:
            shortfall[classes[c]] = wanted - got

    if not chosen:
        raise FileNotFoundError(
            f"no usable images in {root_p}: expected class subfolders holding image files "
            f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {root_p}/n01440764/n01440764_10026.JPEG as ImageNet "
            f"train is laid out. Found {len(classes)} subfolders and {n_scanned} files"
            + (f"; skipped: {dict(skipped)}" if skipped else "")
            + "."
        )
    chosen.sort()
    rel_paths = [r for r, _ in chosen]
    labels = np.array([c for _, c in chosen], dtype=np.int64)
    sample = (
        {"fraction": fraction}
        if fraction is not None
        else {"count": count}
        if count is not None
        else {"per_class": per_class}
        if per_class is not None
        else {"all": True}
    )
    source = {
        "source": "folder",
        "root": str(root_p),
        "sample": sample,
        "seed": seed,
        "check": check,
        "classes_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
        "transform": "rgb-resize-shorter-bicubic-center-crop",
    }
    report = {
        "classes": len(classes),
        "scanned_files": n_scanned,
        "candidates": sum(map(len, files_by_class)),
        "selected": len(chosen),
        "skipped": dict(skipped),
        "skipped_total": sum(skipped.values()),
        "skipped_files": skipped_files,
        "shortfall": shortfall,
        "empty_classes": [classes[c] for c, f in enumerate(files_by_class) if not f],
    }
    backend = _FolderBackend(root_p, rel_paths, size, source, num_workers)
    meta = {"path": np.array(rel_paths)}
    return ImageSet(backend, np.arange(len(rel_paths)), rel_paths, labels, classes, meta, "folder", report)


# ----------------------------------------------------------------------------------------------------------
# augmentations for UnitMem's A views

AUGMENTATIONS = {
    "none": "identity",
    "shift": "random translation by up to 2 px in x and y (integer), uncovered pixels filled with background",
    "crop": "VAR's training augmentation: bilinear resize to 1.125x the size, random crop back to the size",
    "flip": "random horizontal flip with probability 0.5",
}
SHIFT_PX = 2
CROP_RATIO = 1.125


def parse_augmentation(aug: str) -> list[str]:
    """'crop+flip' -> ['crop', 'flip'] (applied in that order); 'none' -> []. Unknown names raise."""
    parts = [p.strip() for p in aug.lower().split("+") if p.strip()]
    bad = [p for p in parts if p not in AUGMENTATIONS]
    if bad or not parts:
        raise ValueError(
            f"unknown augmentation {aug!r}: expected one of {', '.join(AUGMENTATIONS)} or a '+' combination "
            f"such as 'crop+flip'"
        )
    return [p for p in parts if p != "none"]


def _crop_at(x_BCHW: torch.Tensor, top_B: torch.Tensor, left_B: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image crops [B,C,h,w] of x at the given offsets (one gather, no Python loop)."""
    dev = x_BCHW.device
    rows_Bh = top_B.to(dev)[:, None] + torch.arange(h, device=dev)
    cols_Bw = left_B.to(dev)[:, None] + torch.arange(w, device=dev)
    b = torch.arange(x_BCHW.shape[0], device=dev)[:, None, None]
    return (
        x_BCHW.permute(0, 2, 3, 1)[b, rows_Bh[:, :, None], cols_Bw[:, None, :]]
        .permute(0, 3, 1, 2)
        .contiguous()
    )


def augment(
    x_B3HW: torch.Tensor, aug: str, generator: torch.Generator | None = None, fill: float = 0.0
) -> torch.Tensor:
    """Apply augmentation `aug` ("none", "shift", "crop", "flip" or a '+' combination) to [B,C,H,W] -> same
    shape.

    Random parameters are drawn per image from the CPU `generator`, so the result is a function of
    (x, aug, generator state). `fill` is the background value for "shift" (0 = black, as in Fashion-MNIST)."""
    B, _, H, W = x_B3HW.shape
    for op in parse_augmentation(aug):
        if op == "shift":
            d_B2 = torch.randint(0, 2 * SHIFT_PX + 1, (B, 2), generator=generator)
            padded = F.pad(x_B3HW, (SHIFT_PX,) * 4, value=fill)
            x_B3HW = _crop_at(padded, d_B2[:, 0], d_B2[:, 1], H, W)
        elif op == "crop":
            big_h, big_w = round(H * CROP_RATIO), round(W * CROP_RATIO)
            big = F.interpolate(x_B3HW, size=(big_h, big_w), mode="bilinear", align_corners=False).clamp_(
                0, 1
            )
            top = torch.randint(0, big_h - H + 1, (B,), generator=generator)
            left = torch.randint(0, big_w - W + 1, (B,), generator=generator)
            x_B3HW = _crop_at(big, top, left, H, W)
        elif op == "flip":
            flip_B = (torch.rand(B, generator=generator) < 0.5).to(x_B3HW.device)
            x_B3HW = torch.where(flip_B[:, None, None, None], x_B3HW.flip(-1), x_B3HW)
    return x_B3HW


def view_seed(seed: int, key: int | str) -> int:
    """A 63-bit generator seed for image `key` under `seed` (independent of batch composition)."""
    return int.from_bytes(hashlib.sha256(f"iarmem-views:{seed}:{key}".encode()).digest()[:8], "little") >> 1


def augment_views(
    x_B3HW: torch.Tensor, aug: str, n_views: int, seed: int, keys: Sequence[int | str], fill: float = 0.0
) -> torch.Tensor:
    """`n_views` augmented views of each image -> [B, n_views, C, H, W]; image b's views depend only on
    (x[b], aug, seed, keys[b]), so results do not change with batching or when a job resumes mid-dataset."""
    if len(keys) != x_B3HW.shape[0]:
        raise ValueError(f"need one key per image: {x_B3HW.shape[0]} images, {len(keys)} keys")
    if not parse_augmentation(aug):
        return x_B3HW[:, None].expand(-1, n_views, -1, -1, -1)
    out = []
    for b, k in enumerate(keys):
        g = torch.Generator().manual_seed(view_seed(seed, k))
        out.append(augment(x_B3HW[b : b + 1].expand(n_views, -1, -1, -1), aug, g, fill))
    return torch.stack(out)
