"""Demo bundle (counts, split, deterministic rebuild), conversions, ImageFolder loading, augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iarmem_core import data
from iarmem_core.demo import bundle as demo_bundle

DEBIAN = demo_bundle.DEBIAN_FASHION_DIR


# ---------------------------------------------------------------------------------------------------------
# the bundle


def test_bundle_splits_counts_and_balance():
    train, held, planted, unique, twins, ctl, ctl_t = (
        data.load_demo(s) for s in ("train", "heldout", "planted", "unique", "twins", "control", "control_twins")
    )
    assert (len(unique), len(held), len(planted), len(twins), len(ctl), len(ctl_t)) == (4000, 1000, 60, 60, 20, 20)
    assert len(train) == 4060 and sorted(train.ids) == sorted(unique.ids + planted.ids)
    assert np.bincount(unique.labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(held.labels, minlength=10).tolist() == [100] * 10
    assert unique.ids[12] == "train/0012" and held.ids[3] == "heldout/0003"
    assert len(set(data.load_demo("all").ids)) == 5160
    # planted: 10 per (kind, dose), one per class (natural, mislabeled: per true class; canaries: per label)
    for kind in demo_bundle.KINDS:
        for dose in demo_bundle.DOSES:
            m = (planted.meta["kind"] == kind) & (planted.meta["dose"] == dose)
            cls = planted.meta["true_label"][m] if kind != "ood" else planted.labels[m]
            assert sorted(cls.tolist()) == list(range(10)), (kind, dose)
    mis = planted.meta["kind"] == "mislabeled"
    assert (planted.labels[mis] == (planted.meta["true_label"][mis] + demo_bundle.MISLABEL_SHIFT) % 10).all()
    nat = planted.meta["kind"] == "natural"
    assert (planted.labels[nat] == planted.meta["true_label"][nat]).all()
    assert (planted.meta["true_label"][planted.meta["kind"] == "ood"] == -1).all()
    # counts: unique once, planted `dose` times; twins, control items and held-out never (for the demo models)
    assert set(unique.meta["count"].tolist()) == {1}
    assert (planted.meta["count"] == planted.meta["dose"]).all() and set(planted.meta["dose"].tolist()) == {8, 32}
    for s in (twins, ctl, ctl_t, held):
        assert set(s.meta["count"].tolist()) == {0} and not s.meta["planted"].any()
    assert sorted(set(twins.meta["kind"].tolist())) == sorted(demo_bundle.KINDS)
    assert all((twins.meta["kind"] == k).sum() == demo_bundle.N_TWINS for k in demo_bundle.KINDS)
    assert planted.meta["planted"].all() and not unique.meta["planted"].any()


def test_split_json_describes_every_item():
    m = data.demo_manifest()
    assert m["format"] == 2 and m["seed"] == 0
    assert m["train_ids"] == data.load_demo("unique").ids and m["heldout_ids"] == data.load_demo("heldout").ids
    items = {r["id"]: r for r in m["items"]}
    every = data.load_demo("all")
    for i, k in enumerate(every.ids):
        if every.meta["role"][i] in ("unique", "heldout"):
            continue
        r = items[k]
        assert (r["kind"], r["role"], r["label"]) == (every.meta["kind"][i], every.meta["role"][i], every.labels[i])
        assert r["description"] and (r["dose"] == every.meta["dose"][i] or r["role"] == "twin")
    assert len(items) == 160 and m["training_stream_length"] == 4000 + 10 * 3 * (8 + 32)


def test_items_are_distinct_and_natural_ones_are_new():
    b = data.demo.load_bundle()
    assert len({r.tobytes() for r in b.images_N28}) == len(b.images_N28)  # no pixel-identical images anywhere
    imgs = b.images_N28.reshape(len(b.images_N28), -1).astype(np.float64)
    flat = imgs - imgs.mean(1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    nat = np.flatnonzero(np.isin(b.kind, ["natural", "mislabeled"]))
    bundle_rows = set(b.source_index[b.role == "unique"].tolist())
    for i in nat:
        assert int(b.source_index[i]) not in bundle_rows
        corr = flat @ flat[i]
        corr[i] = -1
        assert corr.max() < demo_bundle.NEAR_DUP_CORR
    # canaries: cells on or off, and no two patterns (or a pattern and a mirror) within 2 cells
    can = np.flatnonzero(np.isin(b.kind, ["ood", "control"]))
    cells = b.images_N28[can][:, 2:26, 2:26].reshape(len(can), 4, 6, 4, 6)[:, :, 0, :, 0] > 0
    for a in range(len(can)):
        for c in range(a + 1, len(can)):
            assert min((cells[a] != cells[c]).sum(), (cells[a] != cells[c][:, ::-1]).sum()) >= 3


def test_training_stream_repeats_planted_items():
    train = data.load_demo("train")
    s0, s0b, s1 = data.demo_training_indices(0), data.demo_training_indices(0), data.demo_training_indices(1)
    assert len(s0) == int(train.meta["count"].sum()) == 5200
    assert np.array_equal(np.bincount(s0, minlength=len(train)), train.meta["count"])
    assert np.array_equal(s0, s0b) and not np.array_equal(s0, s1)


def test_default_selection_holds_every_item_and_their_nulls():
    d = data.select_demo(500, seed=0)
    role, split = d.meta["role"], d.meta["split"]
    assert len(d) == 500 and (role != "unique").sum() == 160 and (role == "unique").sum() == 340
    assert set(split.tolist()) == {"train", "twin", "control", "control_twin"}
    assert d.ids == sorted(d.ids, key=data.load_demo("all").ids.index)


def test_rebuild_from_debian_package_equals_committed_bundle(tmp_path):
    if not (DEBIAN / demo_bundle.SOURCE_FILES["train_images"]).exists():
        pytest.skip(
            f"Debian package dataset-fashion-mnist not installed ({DEBIAN} missing); "
            f"apt-get install dataset-fashion-mnist to test the rebuild"
        )
    split = demo_bundle.build_demo_bundle(tmp_path, source_dir=DEBIAN, seed=0)
    committed = json.loads((data.DEMO_DIR / "split.json").read_text())
    assert split == committed
    with np.load(tmp_path / "fashion_subset.npz") as a, np.load(data.DEMO_DIR / "fashion_subset.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    for f in ("LICENSE_fashion-mnist.txt", "README.md"):
        assert (tmp_path / f).read_text() == (data.DEMO_DIR / f).read_text()
    assert "Zalando SE" in (tmp_path / "LICENSE_fashion-mnist.txt").read_text()


def test_damaged_bundle_is_refused(tmp_path):
    for f in data.DEMO_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    m = json.loads((tmp_path / "split.json").read_text())
    m["arrays_sha256"] = "0" * 64
    (tmp_path / "split.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="does not match the arrays_sha256"):
        data.load_demo("train", bundle_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="train-demo --only data"):
        data.load_demo("train", bundle_dir=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# conversion and the ImageSet API


def test_gray_to_input_pads_and_replicates():
    g = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    x = data.gray_to_input(g)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[:, :, 2:30, 2:30], torch.from_numpy(g).float().div(255)[:, None].expand(-1, 3, -1, -1))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert x[:, :, border].abs().max() == 0  # background
    big = data.gray_to_input(g, size=64)
    assert big.shape == (5, 3, 64, 64) and 0 <= big.min() and big.max() <= 1
    # resizing 32 -> 64 -> keeps the mean brightness
    assert torch.allclose(big.mean((2, 3)), x.mean((2, 3)), atol=2e-3)


def test_imageset_api():
    s = data.load_demo("planted")
    x = s.images([0, 5, 29])
    assert x.shape == (3, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(s.labels_tensor([0, 5, 29]), torch.tensor(s.labels[[0, 5, 29]]))
    assert s.images([1], size=16).shape == (1, 3, 16, 16)
    seen = []
    for idx, xb, yb in s.iter_batches(batch_size=8):
        assert torch.equal(xb, s.images(idx)) and torch.equal(yb, s.labels_tensor(idx))
        seen.extend(idx.tolist())
    assert seen == list(range(60))
    meta = s.item_meta(4)
    assert meta["id"] == s.ids[4] and meta["count"] in (8, 32) and meta["planted"] is True
    json.dumps(meta)
    sub = s.subset([2, 3], name="two")
    assert sub.ids == s.ids[2:4] and torch.equal(sub.images(), s.images([2, 3]))
    # the "all" split indexes the same pixels
    all_ = data.load_demo("all")
    i = all_.ids.index(s.ids[7])
    assert torch.equal(all_.images([i]), s.images([7]))


def test_describe_identifies_the_selection():
    a, b = data.load_demo("planted"), data.load_demo("planted")
    da = data.data_fingerprint(a)
    assert da == b.describe() and json.loads(json.dumps(da)) == da
    assert da["n_images"] == 60 and da["source"] == "demo"
    assert data.load_demo("unique").describe()["ids_sha256"] != da["ids_sha256"]
    assert a.subset([0, 1]).describe() != da


# ---------------------------------------------------------------------------------------------------------
# ImageFolder


def _save(path: Path, img) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def folder(tmp_path):
    """root/{a_red, b_mixed, c_gray}: RGB, grayscale, RGBA, palette, 16-bit, odd sizes, plus junk."""
    from PIL import Image

    root = tmp_path / "imgs"
    for i in range(10):
        _save(root / "a_red" / f"r{i}.png", Image.new("RGB", (20 + i, 30), (255, 0, 0)))
    b = root / "b_mixed"
    _save(b / "gray.png", Image.new("L", (40, 30), 128))
    rgba = Image.new("RGBA", (24, 24), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 24, 12))  # top half fully transparent -> white
    _save(b / "rgba.png", rgba)
    pal = Image.new("P", (18, 18), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    _save(b / "palette.png", pal)
    halves = Image.new("RGB", (64, 32), (0, 0, 0))
    halves.paste((255, 255, 255), (32, 0, 64, 32))  # right half white
    _save(b / "wide.jpg", halves)
    _save(b / "deep16.png", Image.fromarray(np.full((20, 20), 65535, np.uint16)))
    for i in range(5):
        _save(b / f"odd{i}.bmp", Image.new("RGB", (17, 50), (10, 20, 30)))
    (b / "notes.txt").write_text("not an image")
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    good = (b / "gray.png").read_bytes()
    (b / "truncated.png").write_bytes(good[: len(good) // 2])
    for i in range(7):
        _save(root / "c_gray" / f"g{i}.jpeg", Image.new("L", (33, 33), 200))
    (root / "README.txt").write_text("stray file at the root")
    (root / "c_gray" / ".DS_Store").write_bytes(b"junk")
    return root


def test_image_folder_converts_every_mode(folder):
    s = data.load_image_folder(folder, size=16)
    assert s.classes == ["a_red", "b_mixed", "c_gray"]
    assert np.bincount(s.labels).tolist() == [10, 10, 7]
    x = s.images(None)
    assert x.shape == (27, 3, 16, 16) and 0 <= x.min() and x.max() <= 1

    def img(name):
        return x[s.ids.index(name)]

    assert torch.allclose(img("a_red/r3.png")[:, 8, 8], torch.tensor([1.0, 0, 0]))
    g = img("b_mixed/gray.png")
    assert torch.allclose(g, torch.full_like(g, 128 / 255), atol=1 / 255)
    rgba = img("b_mixed/rgba.png")
    assert torch.allclose(rgba[:, 2, 8], torch.ones(3)) and torch.allclose(rgba[:, 13, 8], torch.tensor([0, 0, 1.0]))
    assert torch.allclose(img("b_mixed/palette.png")[:, 8, 8], torch.tensor([0, 1.0, 0]))
    assert torch.allclose(img("b_mixed/deep16.png"), torch.ones(3, 16, 16))
    wide = img("b_mixed/wide.jpg")  # 64x32 -> 32x16 -> center crop: left half dark, right half light
    assert wide[:, :, :6].max() < 0.1 and wide[:, :, 10:].min() > 0.9
    assert torch.allclose(img("b_mixed/odd0.bmp")[:, 8, 8], torch.tensor([10, 20, 30]) / 255, atol=1e-3)
    rep = s.report
    assert dict(rep["skipped_files"]) == {
        "README.txt": "not inside a class folder",
        "c_gray/.DS_Store": "hidden file",
        "b_mixed/notes.txt": "not an image file (extension .txt)",
        "b_mixed/broken.png": "not a readable image (UnidentifiedImageError)",
        "b_mixed/truncated.png": "not a readable image (OSError)",  # PNG verify finds the missing chunks
    }
    assert rep["skipped_total"] == 5 and sum(rep["skipped"].values()) == 5
    assert rep["selected"] == 27 and rep["shortfall"] == {}


def test_image_folder_stratified_sampling_is_exact(folder):
    per = data.load_image_folder(folder, size=8, per_class=3, seed=1)
    assert np.bincount(per.labels).tolist() == [3, 3, 3]
    frac = data.load_image_folder(folder, size=8, fraction=0.5)
    assert np.bincount(frac.labels).tolist() == [5, 6, 4]  # round half up of 5, 6 (12 candidates), 3.5
    cnt = data.load_image_folder(folder, size=8, count=8, seed=3)
    assert len(cnt) == 8 and sorted(np.bincount(cnt.labels).tolist()) == [2, 3, 3]
    big = data.load_image_folder(folder, size=8, count=26)  # c_gray has only 7: the others take its share
    assert np.bincount(big.labels).tolist() == [10, 9, 7]
    # bad files in b_mixed are replaced by the next good ones, so per_class stays exact
    ten = data.load_image_folder(folder, size=8, per_class=10)
    assert np.bincount(ten.labels).tolist() == [10, 10, 7] and ten.report["shortfall"] == {"c_gray": 3}
    again = data.load_image_folder(folder, size=8, per_class=3, seed=1)
    other = data.load_image_folder(folder, size=8, per_class=3, seed=2)
    assert again.ids == per.ids and other.ids != per.ids
    assert again.describe() == per.describe() and other.describe() != per.describe()
    with pytest.raises(ValueError, match="at most one"):
        data.load_image_folder(folder, size=8, per_class=2, count=5)


def test_image_folder_errors_and_allowed_roots(folder, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no usable images in .*empty.*class subfolders"):
        data.load_image_folder(empty, size=8)
    with pytest.raises(data.PathNotAllowedError, match="outside the allowed data folders"):
        data.load_image_folder(folder, size=8, allowed_roots=[tmp_path / "elsewhere"])
    with pytest.raises(data.PathNotAllowedError):
        data.load_image_folder(tmp_path / "elsewhere" / ".." / "imgs", size=8, allowed_roots=[tmp_path / "elsewhere"])
    assert len(data.load_image_folder(folder, size=8, allowed_roots=[tmp_path])) == 27
    # a symlink inside the allowed root that points outside it is skipped
    outside = tmp_path / "outside.png"
    (folder / "a_red" / "r0.png").rename(outside)
    (folder / "a_red" / "r0.png").symlink_to(outside)
    s = data.load_image_folder(folder, size=8, allowed_roots=[folder])
    assert "a_red/r0.png" not in s.ids and s.report["skipped"]["links outside the allowed roots"] == 1


def test_image_folder_decodes_lazily(folder):
    s = data.load_image_folder(folder, size=8, per_class=2)
    victim = folder / s.ids[0]
    victim.write_bytes(victim.read_bytes()[:40])  # damaged after the scan: fails when read, naming the file
    with pytest.raises(data.ImageDecodeError, match=s.ids[0].split("/")[-1]):
        s.images([0])
    assert s.images([1, 2]).shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# augmentations


def _batch(n=16, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_augment_none_is_identity_and_names_checked():
    x = _batch()
    assert torch.equal(data.augment(x, "none", torch.Generator().manual_seed(0)), x)
    assert torch.equal(data.augment_views(x, "none", 4, seed=0, keys=range(16))[:, 3], x)
    with pytest.raises(ValueError, match="unknown augmentation"):
        data.augment(x, "rotate")
    assert data.parse_augmentation("Crop+Flip") == ["crop", "flip"]


@pytest.mark.parametrize("aug", ["shift", "crop", "flip", "crop+flip", "shift+flip"])
def test_augment_deterministic_under_generator(aug):
    x = _batch()
    a = data.augment(x, aug, torch.Generator().manual_seed(5))
    b = data.augment(x, aug, torch.Generator().manual_seed(5))
    c = data.augment(x, aug, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1


def test_augment_ops_do_what_they_say():
    x = _batch(32)
    g = torch.Generator().manual_seed(0)
    flipped = data.augment(x, "flip", g)
    is_flip = [torch.equal(f, xi.flip(-1)) for f, xi in zip(flipped, x)]
    assert all(torch.equal(f, xi) or fl for f, xi, fl in zip(flipped, x, is_flip)) and 0 < sum(is_flip) < 32
    shifted = data.augment(x, "shift", torch.Generator().manual_seed(1))
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for s, p in zip(shifted, pad):  # each output is a 32x32 window of the zero-padded input
        assert any(torch.equal(s, p[:, dy : dy + 32, dx : dx + 32]) for dy in range(5) for dx in range(5))
    cropped = data.augment(x, "crop", torch.Generator().manual_seed(2))
    big = torch.nn.functional.interpolate(x, size=(36, 36), mode="bilinear", align_corners=False).clamp(0, 1)
    offsets = set()
    for cr, bg in zip(cropped, big):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(cr, bg[:, dy : dy + 32, dx : dx + 32])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 5


def test_augment_views_do_not_depend_on_batching():
    x = _batch(6)
    v = data.augment_views(x, "crop+flip", 10, seed=3, keys=[10, 11, 12, 13, 14, 15])
    assert v.shape == (6, 10, 3, 32, 32)
    part = data.augment_views(x[4:], "crop+flip", 10, seed=3, keys=[14, 15])
    assert torch.equal(v[4:], part)
    assert not torch.equal(v[0, 0], v[0, 1])  # views differ
    assert not torch.equal(data.augment_views(x, "crop+flip", 10, seed=4, keys=range(10, 16)), v)
