"""`ImageSet`: an indexable, labelled image collection over a backend (bundled arrays or image files)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from iarmem_core.data.images import DEMO_NATIVE_SIZE, ImageTooLargeError, gray_to_input, open_image, pil_to_input


class ImageDecodeError(ValueError):
    """An image file that passed the header check but failed to decode."""


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

    def __init__(self, root: Path, rel_paths: list[str], native_size: int, source: dict, num_workers: int = 4):
        self.root = root
        self.rel_paths = rel_paths
        self.native_size = native_size
        self.source = source
        self.num_workers = num_workers
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        """Pickles without its decode threads (a worker of the ray backend starts its own)."""
        return {**vars(self), "_pool": None}

    def _one(self, i: int, size: int) -> torch.Tensor:
        path = self.root / self.rel_paths[i]
        try:
            with open_image(path) as img:
                return pil_to_input(img, size)
        except ImageTooLargeError as e:
            raise ImageDecodeError(str(e)) from None
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
                self._pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="iarmem-decode")
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


class _ConcatBackend:
    """Several ImageSets one after another (e.g. training images, then never-trained images for a null control)."""

    def __init__(self, parts: Sequence[ImageSet]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.native_size = max(p.native_size for p in self.parts)
        self.source = {"source": "concat", "parts": [p.describe() for p in self.parts]}

    def load(self, src_idx: np.ndarray, size: int) -> torch.Tensor:
        src_idx = np.asarray(src_idx, dtype=np.int64)
        part = np.searchsorted(self.offsets, src_idx, side="right") - 1
        out = torch.zeros(len(src_idx), 3, size, size)
        for k, p in enumerate(self.parts):
            sel = np.flatnonzero(part == k)
            if sel.size:
                out[torch.from_numpy(sel)] = p.images(src_idx[sel] - self.offsets[k], size=size)
        return out


def concat(sets: Sequence[ImageSet], trained: Sequence[bool] | None = None, name: str | None = None) -> ImageSet:
    """The images of `sets` one after another as one ImageSet (ids must not collide).

    `trained[k]` (optional) marks whether set k was in the model's training data; it becomes the per-image
    meta "trained" (the null control of UnitMem: D' mixed with never-trained images). Meta fields missing from
    a set are filled with neutral values (planted False, count 0, split "heldout" for untrained sets).
    """
    sets = list(sets)
    if not sets:
        raise ValueError("concat needs at least one ImageSet")
    ids = [i for s in sets for i in s.ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"image ids repeat across the sets (e.g. {dup}); D' cannot hold an image twice")
    classes = sets[0].classes
    for s in sets[1:]:
        if list(s.classes) != list(classes):
            raise ValueError(f"{s.name} has other classes than {sets[0].name}; their labels would not match")
    flags = list(trained) if trained is not None else None
    if flags is not None and len(flags) != len(sets):
        raise ValueError(f"trained has {len(flags)} flags for {len(sets)} sets")
    keys = sorted({k for s in sets for k in s.meta} | ({"trained"} if flags is not None else set()))
    meta = {}
    for k in keys:
        cols = []
        for si, s in enumerate(sets):
            if k == "trained" and flags is not None:
                cols.append(np.full(len(s), bool(flags[si])))
            elif k in s.meta:
                cols.append(np.asarray(s.meta[k]))
            else:
                untrained = flags is not None and not flags[si]
                fill = {
                    "planted": False,
                    "count": 0,
                    "split": "heldout" if untrained else "train",
                    "kind": "heldout" if untrained else "unique",
                }.get(k, -1)
                cols.append(np.full(len(s), fill))
        try:
            meta[k] = np.concatenate(cols)
        except (TypeError, ValueError):
            meta[k] = np.concatenate([c.astype(str) for c in cols])
    backend = _ConcatBackend(sets)
    labels = np.concatenate([s.labels for s in sets])
    name = name or " + ".join(s.name for s in sets)
    return ImageSet(backend, np.arange(len(ids)), ids, labels, classes, meta, name)


def data_fingerprint(image_set: ImageSet) -> dict:
    """The JSON-able identity of a data selection, for result-store keys (same as `image_set.describe()`)."""
    return image_set.describe()
