"""ImageFolder trees (ImageNet train layout): class subfolders sorted by name -> class index, a
class-stratified sample, lazily decoded; bad files are skipped and counted."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iarmem_core.data.images import MAX_PIXELS_ENV, ImageTooLargeError, max_image_pixels, open_image
from iarmem_core.data.imageset import ImageSet, _FolderBackend
from iarmem_core.data.paths import resolve_inside
from iarmem_core.data.sampling import class_quotas

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def _check_file(path: Path, check: str) -> str | None:
    """None if the file opens as an image (header, or full decode with check='decode'); else the reason.

    The pixel count is checked from the header first (`open_image`): an image over the limit is skipped
    without being decoded."""
    try:
        with open_image(path) as img:
            if check == "decode":
                img.load()
            else:
                img.verify()  # reads the structure (PNG chunks and CRCs) without decoding pixels
        return None
    except ImageTooLargeError:
        return f"more than {max_image_pixels():,} pixels (raise the limit with {MAX_PIXELS_ENV})"
    except Exception as e:  # every failure is a skip reason, never fatal
        return f"not a readable image ({type(e).__name__})"


def _bad_name(name: str) -> bool:
    """True for a file name that is not valid UTF-8 (Python holds its bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _shown(name: str) -> str:
    """A file name as printable text: undecodable bytes as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _inside(path: Path, roots: list[Path]) -> bool:
    r = path.resolve()
    return any(r == a or r.is_relative_to(a) for a in roots)


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
    Skipped files are counted by reason in `.report` (and the first 100 named in `report["skipped_files"]`):
    files whose name is not valid UTF-8, images over the pixel limit (`open_image`), and links that leave
    the allowed roots. Symlinks are resolved before that check, for class folders too (a class folder that
    links to /etc is not walked); without `allowed_roots`, links must stay inside `root`. Images convert to
    RGB, shorter side -> `size`, center crop.
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
    # links (class folders, files) must resolve inside these; without allowed_roots, inside the data folder
    allowed = [Path(r).expanduser().resolve() for r in allowed_roots] if allowed_roots is not None else [root_p]

    skipped: Counter[str] = Counter()
    skipped_files: list[tuple[str, str]] = []

    def skip(rel: str, reason: str) -> None:
        skipped[reason] += 1
        if len(skipped_files) < 100:
            skipped_files.append((_shown(rel), reason))

    classes = []
    for e in sorted(os.scandir(root_p), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        if not e.is_dir():
            if e.is_file():
                skip(e.name, "not inside a class folder")
        elif _bad_name(e.name):
            skip(e.name + "/", "class folder name is not valid UTF-8 (rename the folder)")
        elif e.is_symlink() and not _inside(Path(e.path), allowed):
            skip(e.name + "/", "class folder links outside the allowed roots (not read)")
        else:
            classes.append(e.name)
    files_by_class: list[list[str]] = []
    n_scanned = 0
    for c in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(root_p / c):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                n_scanned += 1
                rel = Path(dirpath, fn).relative_to(root_p).as_posix()
                if _bad_name(rel):
                    skip(rel, "file name is not valid UTF-8 (rename the file)")
                elif fn.startswith("."):
                    skip(rel, "hidden file")
                elif not fn.lower().endswith(IMAGE_EXTENSIONS):
                    skip(rel, f"not an image file (extension {Path(fn).suffix or 'none'})")
                else:
                    files.append(rel)
        files_by_class.append(files)

    rng = np.random.default_rng(seed)
    quotas = class_quotas([len(f) for f in files_by_class], fraction, count, per_class, rng)
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
            if not _inside(path, allowed):
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
