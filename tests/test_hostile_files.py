"""Hostile files: checkpoints and images that claim more than they hold are refused before they are read.

Every hostile file is made here at run time (a zip bomb .pth, safetensors headers that lie, a 12000x12000
PNG of 40 KB, symlinked class folders, undecodable file names); the memory tests assert that the refusal
comes from the size check, before torch, safetensors or PIL read the payload, and that the peak stays small
(tracemalloc), so they never allocate what the files claim.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from iarmem_core import checkpoints, data
from iarmem_core.checkpoints import CheckpointError, CheckpointTooLargeError
from iarmem_core.data.images import ImageTooLargeError, open_image

MiB = 1 << 20


def _refuse_reads(monkeypatch):
    """Make every reader that would touch a checkpoint's payload fail the test if it is called."""

    def boom(*a, **k):
        raise AssertionError("the payload was read: the size check must refuse the file first")

    monkeypatch.setattr(torch, "load", boom)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", boom)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MiB


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def zip_bomb(path: Path, declared: int = 256 * MiB) -> Path:
    """A torch.save archive whose pickle member data.pkl is deflated and `declared` bytes long (the pickle,
    then zeros after its STOP): ~0.25 MB on disk for 256 MiB. torch.load reads data.pkl whole into memory,
    memory-mapped or not, so loading it inflates all of it. Written in 1 MiB chunks: making it costs no
    memory."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(16)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                with z.open(info.filename, "w", force_zip64=True) as f:
                    f.write(src.read(info.filename))
                    chunk = bytes(MiB)
                    for _ in range(declared // MiB):
                        f.write(chunk)
            else:
                z.writestr(info.filename, src.read(info.filename))
    return path


def test_zip_bomb_pth_is_refused_before_reading(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "bomb.pth")
    member = next(i for i in zipfile.ZipFile(bomb).infolist() if i.filename.endswith("data.pkl"))
    assert bomb.stat().st_size < 2 * MiB and member.file_size > 256 * MiB  # the bomb is what it claims
    assert member.compress_type == zipfile.ZIP_DEFLATED
    _refuse_reads(monkeypatch)

    def read():
        with pytest.raises(CheckpointTooLargeError, match=r"zip bomb") as e:
            checkpoints.read_state_dict(bomb)
        msg = str(e.value)
        assert f"{member.file_size:,} bytes" in msg and "pickled" not in msg and str(bomb) in msg

    assert _peak_mib(read) < 16  # the zip directory is read, the 256 MiB member never


def test_checkpoint_larger_than_the_limit_names_the_limit_and_how_to_raise_it(tmp_path, monkeypatch):
    f = tmp_path / "w.pth"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, f)
    st = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(st))
    for path in (f, st):
        with pytest.raises(CheckpointTooLargeError, match=r"more than the limit of 1,000 bytes") as e:
            checkpoints.read_state_dict(path, limit=1000)
        assert "IARMEM_MAX_CHECKPOINT_GB" in str(e.value) and "nothing was read" in str(e.value)
        monkeypatch.setenv("IARMEM_MAX_CHECKPOINT_GB", "0.000001")  # ~1 KiB
        with pytest.raises(CheckpointTooLargeError, match=r"limit of 1,073 bytes"):
            checkpoints.read_state_dict(path)
        monkeypatch.setenv("IARMEM_MAX_CHECKPOINT_GB", "1")  # raised: the same file loads
        assert torch.equal(checkpoints.read_state_dict(path)["w"], torch.arange(4096, dtype=torch.float32))
        monkeypatch.delenv("IARMEM_MAX_CHECKPOINT_GB")
    monkeypatch.setenv("IARMEM_MAX_CHECKPOINT_GB", "lots")
    with pytest.raises(CheckpointError, match=r"IARMEM_MAX_CHECKPOINT_GB='lots' is not a positive number"):
        checkpoints.read_state_dict(f)


def _safetensors(path: Path, header: dict, payload: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + payload)
    return path


def test_safetensors_header_that_lies_is_refused_before_reading(tmp_path, monkeypatch):
    _refuse_reads(monkeypatch)
    huge = _safetensors(
        tmp_path / "huge.safetensors",
        {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}},
        bytes(16),
    )
    with pytest.raises(CheckpointError, match=r"declares shape \[1048576, 1048576\] F32 \(4,398,046,511,104 bytes\)"):
        checkpoints.read_state_dict(huge)
    past_end = _safetensors(
        tmp_path / "past_end.safetensors",
        {"w": {"dtype": "F32", "shape": [1 << 15, 1 << 15], "data_offsets": [0, 4 << 30]}},
        bytes(16),
    )
    with pytest.raises(CheckpointError, match=r"the data part of the file has 16 bytes"):
        checkpoints.read_state_dict(past_end)
    header_bomb = tmp_path / "header.safetensors"
    header_bomb.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match=r"header claims 1,099,511,627,776 bytes but the file has 10"):
        checkpoints.read_state_dict(header_bomb)
    not_json = tmp_path / "not_json.safetensors"
    not_json.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    with pytest.raises(CheckpointError, match=r"not valid JSON"):
        checkpoints.read_state_dict(not_json)


def test_safetensors_shapes_are_compared_with_the_model_before_reading(tmp_path, monkeypatch):
    from iarmem_core.adapters import adapter_class
    from iarmem_core.registry import get_spec

    spec = get_spec("test-var")
    with torch.device("meta"):
        model = adapter_class("var").build_transformer(spec)
    ref = model.state_dict()
    # the right keys, one tensor declared 1000x too large (and the file really holds it: a consistent header)
    big_key = max(ref, key=lambda k: ref[k].numel())
    header, off = {}, 0
    for k, v in ref.items():
        shape = [v.shape[0] * 1000, *v.shape[1:]] if k == big_key else list(v.shape)
        n = int(np.prod(shape)) * 4
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    f = tmp_path / "wrong.safetensors"
    h = json.dumps(header).encode()
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h)
        fh.truncate(8 + len(h) + off)  # sparse: the payload takes no disk and is never read
    _refuse_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"Shape mismatch at {big_key}"):
        checkpoints.load_checked(model, f, expected="test-var", component="transformer")


def test_non_checkpoints_are_not_called_pickled_objects(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as e:
        checkpoints.read_state_dict(garbage)
    assert "pickled" not in str(e.value) and "not a valid PyTorch checkpoint" in str(e.value)
    plain = tmp_path / "plain.pth"
    import pickle

    plain.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match=r"not one written by torch.save") as e:
        checkpoints.read_state_dict(plain)
    assert "pickled Python objects" not in str(e.value)
    page = tmp_path / "page.pth"
    page.write_text("<html>404</html>")
    with pytest.raises(CheckpointError, match=r"neither a zip archive nor a pickle"):
        checkpoints.read_state_dict(page)


class _Runs:
    """Unpickling this runs os.system: a checkpoint that would execute code if it were loaded unsafely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    for legacy in (False, True):
        f = tmp_path / f"evil-{legacy}.pth"
        torch.save({"w": torch.zeros(2), "x": _Runs(str(marker))}, f, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=r"pickled Python objects .*posix\.system|pickled Python objects"):
            checkpoints.read_state_dict(f)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# images


def png_bomb(path: Path, w: int = 12000, h: int = 12000) -> Path:
    """A 1-bit grey PNG of w x h pixels, all black: ~40 KB on disk, 432 MB once decoded to RGB. Written
    row by row through zlib, so making it takes no memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _small_png(path: Path, value: int = 100) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (value, 0, 0)).save(path)


def test_image_with_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000

    def refuse():
        with pytest.raises(ImageTooLargeError) as e, open_image(bomb):
            pass
        msg = str(e.value)
        assert "12000x12000 = 144,000,000 pixels" in msg and "limit of 50,000,000" in msg
        assert "IARMEM_MAX_IMAGE_PIXELS" in msg

    assert _peak_mib(refuse) < 16
    # in a folder: skipped with the limit and how to raise it; the other images stay usable
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(3):
            _small_png(root / c / f"{i}.png", 40 * i)
    (root / "a" / "big.png").write_bytes(bomb.read_bytes())
    holder = {}
    assert _peak_mib(lambda: holder.update(s=data.load_image_folder(root, 8))) < 32
    s = holder["s"]
    reason = "more than 50,000,000 pixels (raise the limit with IARMEM_MAX_IMAGE_PIXELS)"
    assert "a/big.png" not in s.ids and len(s) == 6 and s.report["skipped"] == {reason: 1}
    assert ("a/big.png", reason) in s.report["skipped_files"]
    # the limit can be raised (the header check then passes; nothing is decoded here)
    monkeypatch.setenv("IARMEM_MAX_IMAGE_PIXELS", "200000000")
    assert "a/big.png" in data.load_image_folder(root, 8).ids
    monkeypatch.delenv("IARMEM_MAX_IMAGE_PIXELS")
    # a file replaced by a bomb after the scan fails when decoded, naming the limit, without decoding it
    victim = root / s.ids[0]
    victim.write_bytes(bomb.read_bytes())
    with pytest.raises(data.ImageDecodeError, match=r"144,000,000 pixels, more than the limit"):
        s.images([0], size=8)


def test_symlinked_class_folder_outside_the_allowed_roots_is_not_walked(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(2):
            _small_png(root / c / f"{i}.png")
    outside = tmp_path / "outside"
    for i in range(5):
        _small_png(outside / "deep" / f"secret{i}.png")
    (root / "etc").symlink_to(outside, target_is_directory=True)
    (root / "inside").symlink_to(root / "a", target_is_directory=True)  # a link that stays inside is fine
    why = "class folder links outside the allowed roots (not read)"
    for roots in ([root], None):  # the app's allowed roots, and the CLI's default (the data folder itself)
        s = data.load_image_folder(root, 8, allowed_roots=roots)
        assert s.classes == ["a", "b", "inside"] and len(s) == 6
        assert s.report["scanned_files"] == 6  # nothing under the link was listed
        assert s.report["skipped"] == {why: 1} and ("etc/", why) in s.report["skipped_files"]
        assert not any("secret" in i for i in s.ids)
    # allowed explicitly: then it is read
    s = data.load_image_folder(root, 8, allowed_roots=[tmp_path])
    assert "etc" in s.classes and sum("secret" in i for i in s.ids) == 5


def test_badly_encoded_file_names_are_skipped_and_named(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(2):
            _small_png(root / c / f"{i}.png")
    good = (root / "a" / "0.png").read_bytes()
    with open(os.fsencode(root / "a") + b"/caf\xe9.png", "wb") as f:  # not UTF-8: Latin-1 e-acute
        f.write(good)
    bad_class = os.fsencode(root) + b"/cl\xff"
    os.mkdir(bad_class)
    with open(bad_class + b"/x.png", "wb") as f:
        f.write(good)
    s = data.load_image_folder(root, 8)
    assert s.classes == ["a", "b"] and len(s) == 4
    assert s.report["skipped"] == {
        "file name is not valid UTF-8 (rename the file)": 1,
        "class folder name is not valid UTF-8 (rename the folder)": 1,
    }
    named = dict(s.report["skipped_files"])
    assert "a/caf\\xe9.png" in named and "cl\\xff/" in named
    json.dumps(s.report)  # the report is plain text
    assert data.data_fingerprint(s)["ids_sha256"]  # and the set can be keyed and used
    assert s.images([0, 1, 2, 3], size=8).shape == (4, 3, 8, 8)
