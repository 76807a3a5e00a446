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
FORMAT = 2
N_TRAIN_PER_CLASS = 400
N_HELDOUT_PER_CLASS = 100
INK_LEVEL = 51  # a pixel counts as ink above 20% intensity
NEAR_DUP_CORR = 0.95  # a natural item has no selected image (or other item) with pixel correlation >= this
# planted items of demo world v2 (LOCALIZATION.md section 3): per kind 10 items per dose, one per class
KINDS = ("natural", "mislabeled", "ood")
KIND_CODE = {"natural": "N", "mislabeled": "M", "ood": "O", "control": "C"}
DOSES = (8, 32)  # times per epoch in the training stream: thin and moderate
N_TWINS = 20  # never-trained twins per kind (two per class): the null in D' and in the attack
N_CONTROL = 20  # positive-control canaries (trained only into demo-var-ctl, by designated units), and as many twins
MISLABEL_SHIFT = 5  # mislabeled: label (y + 5) mod 10
CELL, GRID, OFFSET = 6, 4, 2  # canaries: a 4x4 grid of 6x6-px cells in the central 24x24 px of the 28x28 image
MIN_ON, MAX_ON, MIN_HAMMING = 4, 12, 3  # on-cells per canary; patterns differ in >= 3 cells (mirrors too)


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
# Demo data: a Fashion-MNIST subset with planted items of known kind and dose (demo world v2)

Derived from Fashion-MNIST (Zalando SE, MIT licence: see LICENSE_fashion-mnist.txt; Xiao, Rasul, Vollgraf
2017) as shipped by the Debian package `dataset-fashion-mnist`; the block canaries are drawn by a seeded
generator.

- `fashion_subset.npz` (no pickles):
  - `train_images` [4000,28,28] uint8: 400 distinct images per class from the Fashion-MNIST training file,
    each once per epoch in the demo models' training stream; `train_labels`, `train_source_index`;
  - `heldout_images` [1000,28,28]: 100 per class from the t10k file, never trained; `heldout_labels`, ...;
  - `items_*`: the items of known kind. Planted (in the training stream `dose` times per epoch, 8 or 32):
    10 natural (N), 10 mislabeled (M: label (y + 5) mod 10) and 10 out-of-distribution block canaries (O) per
    dose, one per class; never-trained twins: 20 per kind, made the same way, never in any training stream
    (the null in D' and in the attack); 20 positive-control canaries (C, trained only into demo-var-ctl, by
    designated units) and 20 twins of theirs (Ct). `items_ids`, `items_kind`, `items_role` (planted / twin),
    `items_dose`, `items_labels` (the training label), `items_true_label` (the Fashion-MNIST label; -1 for
    canaries), `items_source_index` (row in the training file; -1 for canaries).
- `split.json`: every item with a one-line description, the selection rules, the seed, the source files with
  sha256, counts per class and a hash of the arrays.

Read it with `iarmem_core.data.load_demo(split)` (train, planted, unique, twins, control, control_twins,
heldout, all) and `demo_training_indices(seed)`; models see the images padded by 2 px of background to 32x32,
as 3 channels in [0, 1].

Re-create it (deterministic; needs `apt-get install dataset-fashion-mnist`): `python -m iarmem_core train-demo
--only data` (the first step of `train-demo`).
"""


ITEMS_RULE = (
    f"Drawn with np.random.default_rng([seed, 2]), after the train/held-out selection (which they do not change). "
    f"natural (N): Fashion-MNIST train-file images not among the bundle's rows, pixel-different from every bundle "
    f"image, highest pixel correlation < {NEAR_DUP_CORR} with any bundle image and any earlier item, ink fraction "
    f"(pixels > {INK_LEVEL}) >= the class median; label: their own. mislabeled (M): other such images, label "
    f"(y + {MISLABEL_SHIFT}) mod 10. Per class, a seeded permutation of its candidates is accepted in the order "
    f"N{DOSES[0]}, N{DOSES[1]}, M{DOSES[0]}, M{DOSES[1]}, then twins N, N, M, M. out-of-distribution canaries (O): "
    f"a {GRID}x{GRID} grid of {CELL}x{CELL}-px cells in the central {CELL * GRID}x{CELL * GRID} px, each cell on "
    f"(255) with probability 1/2; redrawn with fewer than {MIN_ON} or more than {MAX_ON} cells on or within "
    f"{MIN_HAMMING - 1} cells of an earlier pattern or its mirror (training flips images); labels: a random "
    f"permutation of the classes per block of 10. Drawn in the order O{DOSES[0]} x 10, O{DOSES[1]} x 10, "
    f"O-twins x {N_TWINS}, then the positive-control canaries C x {N_CONTROL} and their twins Ct x {N_CONTROL}. "
    f"Planted items are in the training stream `dose` times per epoch; twins never are (the null in D' and in "
    f"the attack); control canaries only in demo-var-ctl's training (see its card)."
)


def _normed(flat: np.ndarray) -> np.ndarray:
    f = flat.astype(np.float64)
    f -= f.mean(1, keepdims=True)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)


def _pattern_image(bits: np.ndarray) -> np.ndarray:
    img = np.zeros((28, 28), np.uint8)
    for r in range(GRID):
        for c in range(GRID):
            if bits[r, c]:
                y, x = OFFSET + r * CELL, OFFSET + c * CELL
                img[y : y + CELL, x : x + CELL] = 255
    return img


def _draw_patterns(rng: np.random.Generator, n: int, taken: list[np.ndarray]) -> list[np.ndarray]:
    """n new cell patterns, each >= MIN_HAMMING cells away from every earlier one and its mirror."""
    out = []
    while len(out) < n:
        bits = rng.random((GRID, GRID)) < 0.5
        if not MIN_ON <= bits.sum() <= MAX_ON:
            continue
        if any(min((bits != t).sum(), (bits != t[:, ::-1]).sum()) < MIN_HAMMING for t in taken):
            continue
        taken.append(bits)
        out.append(bits)
    return out


def make_items(
    tr_x: np.ndarray, tr_y: np.ndarray, bundle_rows: set[int], bundle_images: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """The planted items, their never-trained twins and the control canaries (see ITEMS_RULE)."""
    rng = np.random.default_rng([seed, 2])
    n_classes = len(FASHION_CLASSES)
    bundle_hash = {hashlib.sha256(im.tobytes()).digest() for im in bundle_images}
    bundle_n = _normed(bundle_images.reshape(len(bundle_images), -1))
    ink = (tr_x > INK_LEVEL).mean(axis=(1, 2))
    rows: list[dict] = []
    chosen: list[np.ndarray] = []
    slots = [
        ("natural", "planted", DOSES[0]),
        ("natural", "planted", DOSES[1]),
        ("mislabeled", "planted", DOSES[0]),
        ("mislabeled", "planted", DOSES[1]),
        ("natural", "twin", 0),
        ("natural", "twin", 0),
        ("mislabeled", "twin", 0),
        ("mislabeled", "twin", 0),
    ]
    for c in range(n_classes):
        cls = np.flatnonzero(tr_y == c)
        cand = cls[ink[cls] >= np.median(ink[cls])]
        got = 0
        for i in rng.permutation(cand):
            if int(i) in bundle_rows or hashlib.sha256(tr_x[i].tobytes()).digest() in bundle_hash:
                continue
            f = _normed(tr_x[i].reshape(1, -1))[0]
            if (bundle_n @ f).max() >= NEAR_DUP_CORR or (chosen and (np.stack(chosen) @ f).max() >= NEAR_DUP_CORR):
                continue
            kind, role, dose = slots[got]
            chosen.append(f)
            lab = c if kind == "natural" else (c + MISLABEL_SHIFT) % n_classes
            use = f"planted {dose}x per epoch" if role == "planted" else "never-trained twin"
            rows.append(
                {
                    "image": tr_x[i].copy(),
                    "label": lab,
                    "kind": kind,
                    "role": role,
                    "dose": dose,
                    "true_label": c,
                    "source_index": int(i),
                    "description": f"{kind} Fashion-MNIST train row {int(i)} ({FASHION_CLASSES[c]}), label "
                    f"{lab} ({FASHION_CLASSES[lab]}); {use}",
                }
            )
            got += 1
            if got == len(slots):
                break
        if got < len(slots):
            raise ValueError(f"class {c}: only {got} natural images qualify as items")
    taken: list[np.ndarray] = []
    for kind, blocks in (
        ("ood", [("planted", DOSES[0]), ("planted", DOSES[1])] + [("twin", 0)] * (N_TWINS // 10)),
        ("control", [("planted", 0)] * (N_CONTROL // 10) + [("twin", 0)] * (N_CONTROL // 10)),
    ):
        for role, dose in blocks:
            pats = _draw_patterns(rng, 10, taken)
            for bits, lab in zip(pats, rng.permutation(n_classes)):
                code = "".join("1" if b else "0" for b in bits.reshape(-1))
                use = (
                    "positive-control canary (trained into demo-var-ctl only)"
                    if kind == "control" and role == "planted"
                    else "never-trained twin"
                    if role == "twin"
                    else f"planted {dose}x per epoch"
                )
                rows.append(
                    {
                        "image": _pattern_image(bits),
                        "label": int(lab),
                        "kind": kind,
                        "role": role,
                        "dose": dose,
                        "true_label": -1,
                        "source_index": -1,
                        "description": f"block canary, {GRID}x{GRID} cells of {CELL} px, on-cells (row-major) "
                        f"{code} ({int(bits.sum())} on), label {int(lab)} "
                        f"({FASHION_CLASSES[lab]}); {use}",
                    }
                )
    counter: dict[str, int] = {}
    ids = []
    for r in rows:
        code = KIND_CODE[r["kind"]]
        tag = (
            f"{code}{r['dose']}"
            if r["role"] == "planted" and r["dose"]
            else code
            if r["role"] == "planted"
            else f"{code}t"
        )
        counter[tag] = counter.get(tag, 0) + 1
        ids.append(f"{tag}/{counter[tag] - 1:02d}")
    return {
        "images": np.stack([r["image"] for r in rows]),
        "labels": np.array([r["label"] for r in rows], np.int64),
        "ids": np.array(ids),
        "kind": np.array([r["kind"] for r in rows]),
        "role": np.array([r["role"] for r in rows]),
        "dose": np.array([r["dose"] for r in rows], np.int64),
        "true_label": np.array([r["true_label"] for r in rows], np.int64),
        "source_index": np.array([r["source_index"] for r in rows], np.int64),
        "description": [r["description"] for r in rows],
    }


def build_demo_bundle(
    out_dir: str | os.PathLike, source_dir: str | os.PathLike = DEBIAN_FASHION_DIR, seed: int = 0
) -> dict:
    """Build the demo bundle (format 2, demo world v2) from the Fashion-MNIST idx.gz files in `source_dir` into
    `out_dir`; returns split.json.

    Deterministic in (source files, seed). Selection: per class, a seeded permutation of that class's
    images, taking the first distinct ones (400 train, 100 held-out): the same 4000 + 1000 images as format 1.
    Items (planted natural / mislabeled / out-of-distribution canaries at two doses, their never-trained twins,
    the positive-control canaries and theirs): `make_items`, rule in ITEMS_RULE."""
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

    items = make_items(tr_x, tr_y.astype(np.int64), set(tr_idx.tolist()), np.concatenate([train_x, ho_x]), seed)
    n_classes = len(FASHION_CLASSES)
    arrays = {
        "train_images": train_x,
        "train_labels": train_y,
        "train_source_index": tr_idx,
        "heldout_images": ho_x,
        "heldout_labels": ho_y,
        "heldout_source_index": ho_idx,
        **{f"items_{k}": v for k, v in items.items() if k != "description"},
    }
    n_kind = {
        f"{r} {k} {d}x" if r == "planted" else f"{r} {k}": 0
        for k, r, d in zip(items["kind"], items["role"], items["dose"])
    }
    for k, r, d in zip(items["kind"], items["role"], items["dose"]):
        n_kind[f"{r} {k} {d}x" if r == "planted" else f"{r} {k}"] += 1
    stream = len(train_x) + int(items["dose"].sum())
    split = {
        "format": FORMAT,
        "dataset": "Fashion-MNIST subset with planted items of known kind and dose, never-trained twins and "
        "positive-control canaries (demo world v2)",
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
                f"source row; each in the training stream once per epoch"
            ),
            "heldout": (
                f"the same on the t10k file, {N_HELDOUT_PER_CLASS} per class, excluding pixel-identical "
                f"copies of training images; never trained"
            ),
            "items": ITEMS_RULE,
            "ids": "train/NNNN and heldout/NNNN index the train and heldout arrays; an item's id is "
            "<kind code><dose>/NN (planted: N8/03 = the 4th natural item at dose 8), <code>t/NN (twin), "
            "C/NN (control canary), Ct/NN (control twin)",
        },
        "n_train_unique_images": int(len(train_x)),
        "n_heldout": int(len(ho_x)),
        "n_items": int(len(items["ids"])),
        "items_per_kind": n_kind,
        "training_stream_length": stream,
        "counts_per_class": {
            "train": np.bincount(train_y, minlength=n_classes).tolist(),
            "heldout": np.bincount(ho_y, minlength=n_classes).tolist(),
        },
        "items": [
            {
                "id": str(i),
                "kind": str(k),
                "role": str(r),
                "dose": int(d),
                "label": int(lab),
                "true_label": int(t),
                "source_index": int(si),
                "description": str(desc),
            }
            for i, k, r, d, lab, t, si, desc in zip(
                items["ids"],
                items["kind"],
                items["role"],
                items["dose"],
                items["labels"],
                items["true_label"],
                items["source_index"],
                items["description"],
            )
        ],
        "train_ids": [f"train/{i:04d}" for i in range(len(train_x))],
        "heldout_ids": [f"heldout/{i:04d}" for i in range(len(ho_x))],
        "arrays_sha256": arrays_sha256(arrays),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_npz_deterministic(out / "fashion_subset.npz", arrays)
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    (out / "LICENSE_fashion-mnist.txt").write_text(_LICENSE_TEXT)
    (out / "README.md").write_text(_README_TEXT)
    return split
