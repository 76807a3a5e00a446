"""Safe checkpoint loading with errors that say what a file is and what was expected.

- `.pt`, `.pth`, `.bin`, `.ckpt`: ``torch.load(weights_only=True)`` only; a file that needs arbitrary
  unpickling is refused, never executed.
- `.safetensors`: through the safetensors library.
- Wrappers are unwrapped: ``{'model': sd}``, ``{'module': sd}``, ``{'state_dict': sd}``, ``{'ema': sd}``
  and VAR trainer checkpoints (``{'trainer': {'var_wo_ddp': sd, 'vae_local': sd}}``). A stray
  ``freqs_cis`` (some LlamaGen saves) is dropped.
- Before `load_state_dict(strict=True, assign=True)` the keys and shapes are compared with the model,
  and a mismatch names the likely registry model ("30 blocks found: this is var-d30").
- Declared sizes are checked before anything is read (`check_declared_size`): a zip member that would
  expand more than `MAX_EXPANSION` times (a zip bomb; torch.save never compresses) is refused, and so is a
  file that declares more than `max_checkpoint_bytes()` of content (default 64 GiB, raise it with
  ``$IARMEM_MAX_CHECKPOINT_GB`` or the `limit` argument). A safetensors header is parsed and checked
  (every tensor's bytes = its shape x dtype, inside the file) and, in `load_checked`, compared with the
  model's shapes before any tensor is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("model", "module", "state_dict", "ema", "model_ema")
_DROP_KEYS = ("freqs_cis",)
_SAFE_GLOBALS = [argparse.Namespace]
DEFAULT_MAX_CHECKPOINT_GB = 64.0  # the largest released training checkpoint (weights + optimizer) is ~40 GB
MAX_CHECKPOINT_ENV = "IARMEM_MAX_CHECKPOINT_GB"
MAX_EXPANSION = 16  # a compressed zip member may declare at most this many times its compressed size
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_ST_DTYPE = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming the file, the problem and the fix."""


class CheckpointTooLargeError(CheckpointError):
    """A checkpoint that declares more content than the limit (or a zip member that would expand too much)."""


def max_checkpoint_bytes(limit: int | None = None) -> int:
    """The most bytes of content a checkpoint may declare: `limit`, else $IARMEM_MAX_CHECKPOINT_GB, else 64 GiB."""
    if limit is not None:
        return int(limit)
    raw = os.environ.get(MAX_CHECKPOINT_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_CHECKPOINT_GB * (1 << 30))
    try:
        gb = float(raw)
        if not math.isfinite(gb) or gb <= 0:
            raise ValueError
    except ValueError:
        raise CheckpointError(
            f"${MAX_CHECKPOINT_ENV}={raw!r} is not a positive number of GiB (e.g. {MAX_CHECKPOINT_ENV}=128)"
        ) from None
    return int(gb * (1 << 30))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def _too_large(p: Path, what: str, declared: int, limit: int) -> CheckpointTooLargeError:
    return CheckpointTooLargeError(
        f"{p}: {what} declares {declared:,} bytes ({_gib(declared)}), more than the limit of {limit:,} bytes "
        f"({_gib(limit)}); nothing was read. If the file is genuine, raise the limit with "
        f"{MAX_CHECKPOINT_ENV}=<GiB> (e.g. {MAX_CHECKPOINT_ENV}={max(2 * limit / (1 << 30), 1):.0f})."
    )


def check_zip_sizes(p: Path, limit: int | None = None) -> bool:
    """Check a torch.save zip's declared member sizes before reading it; True if a member is compressed.

    Raises CheckpointTooLargeError for a member that would expand more than MAX_EXPANSION times (a zip bomb)
    or when the members declare more than `max_checkpoint_bytes(limit)` in all."""
    lim = max_checkpoint_bytes(limit)
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: the zip directory is unreadable ({e}); download or copy it again.") from None
    total, compressed = 0, False
    for i in infos:
        if i.file_size < 0 or i.compress_size < 0 or i.header_offset + i.compress_size > size:
            raise CheckpointError(
                f"{p}: member {i.filename!r} lies beyond the end of the file ({size:,} bytes): the file is "
                f"truncated or corrupt. Download or copy it again."
            )
        if i.compress_type != zipfile.ZIP_STORED:
            compressed = True
            if i.file_size > MAX_EXPANSION * max(i.compress_size, 1) + (1 << 20):
                raise CheckpointTooLargeError(
                    f"{p}: member {i.filename!r} declares {i.file_size:,} bytes from {i.compress_size:,} "
                    f"compressed ({i.file_size // max(i.compress_size, 1):,}x): a zip bomb, or a re-compressed "
                    f"checkpoint (torch.save never compresses). Refused before reading; re-save the weights "
                    f"with torch.save(model.state_dict(), path) or as .safetensors."
                )
        total += i.file_size
    if total > lim:
        raise _too_large(p, "the zip archive", total, lim)
    return compressed


def safetensors_header(path: str | os.PathLike, limit: int | None = None) -> dict[str, dict]:
    """The tensors a .safetensors file declares, {name: {"dtype", "shape", "data_offsets"}}, checked
    against the file before any tensor is read: header size, byte count = shape x dtype, offsets inside
    the file, the total under `max_checkpoint_bytes(limit)`."""
    p = Path(path)
    size = p.stat().st_size
    lim = max_checkpoint_bytes(limit)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointError(
                f"{p}: not a readable safetensors file: its header claims {n:,} bytes but the file has {size:,} "
                f"(the format allows at most {MAX_SAFETENSORS_HEADER:,}). It may be truncated or not a "
                f"safetensors file; download it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file (its header is not valid JSON: {e})") from None
    data = size - 8 - n
    out, total = {}, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
            a, b = int(a), int(b)
            if dtype not in _ST_ITEMSIZE or any(d < 0 for d in shape):
                raise ValueError(f"dtype {dtype!r}, shape {shape}")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: tensor {name!r} has a malformed header entry ({e})") from None
        want = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if not 0 <= a <= b <= data or b - a != want:
            raise CheckpointError(
                f"{p}: tensor {name!r} declares shape {shape} {dtype} ({want:,} bytes) at bytes {a:,}..{b:,}, "
                f"but the data part of the file has {data:,} bytes: the header does not match the file "
                f"(corrupt or crafted). Nothing was read; download it again."
            )
        total += want
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}
    if total > lim:
        raise _too_large(p, "the safetensors header", total, lim)
    return out


def _meta_state_dict(header: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """Tensors on the meta device with the shapes (and dtypes) a safetensors header declares: no data."""
    return {
        k: torch.empty(v["shape"], dtype=_ST_DTYPE.get(v["dtype"], torch.uint8), device="meta")
        for k, v in header.items()
    }


def _pickle_reason(msg: str) -> tuple[str, str]:
    """('objects' | 'corrupt', the informative line) of a weights-only load failure."""
    m = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+(\S+)", msg)
    if m:
        return "objects", f"it needs the Python global {m.group(1)}"
    tag = "WeightsUnpickler error:"
    if tag in msg:
        rest = [ln.strip() for ln in msg.split(tag, 1)[1].splitlines() if ln.strip()]
        return "corrupt", (rest[0] if rest else "unreadable")[:160]
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and "torch.load" not in ln]
    return "corrupt", (lines[-1] if lines else "unreadable")[:160]


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a file for store keys: size, mtime and a hash of its first and last MiB."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{p.name}:{st.st_size}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: object, path: Path, component: str | None) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        trainer = obj.get("trainer")
        if isinstance(trainer, Mapping):  # VAR trainer checkpoint ar-ckpt-*.pth
            key = "vae_local" if component == "tokenizer" else "var_wo_ddp"
            if _is_tensor_dict(trainer.get(key)):
                return dict(trainer[key])
        for key in _WRAPPER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key])
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(
            f"{path}: no state dict found. The file holds a dict with keys [{keys}], none of which is a "
            f"mapping of parameter names to tensors (expected the raw state dict or one under "
            f"{'/'.join(_WRAPPER_KEYS)}). Re-save it with torch.save(model.state_dict(), path)."
        )
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__}, not a state dict. Re-save it with torch.save(model.state_dict(), path)."
    )


def read_state_dict(
    path: str | os.PathLike, component: str | None = None, mmap: bool = True, limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from `path` safely (never unpickles arbitrary objects); tensors on CPU.

    Declared sizes are checked first (zip members, safetensors header, `max_checkpoint_bytes(limit)`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such file. Check the path (it must point to a .pth/.pt/.bin/.safetensors file)."
        )
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; give the checkpoint file inside it.")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: the file is empty (0 bytes); the download or copy did not finish.")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        safetensors_header(p, limit)  # sizes and offsets checked before any tensor is read
        try:
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"{p}: not a readable safetensors file ({e}). It may be truncated: compare its size "
                f"({size} bytes) with the original, and download it again."
            ) from None
    elif suffix in TORCH_SUFFIXES:
        with open(p, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK" and not zipfile.is_zipfile(p):
            raise CheckpointError(
                f"{p}: the file is truncated ({size} bytes; its zip directory is missing). Download or copy it again."
            )
        if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive, or (legacy) a pickle
            raise CheckpointError(
                f"{p}: not a PyTorch checkpoint: it is neither a zip archive nor a pickle (it starts with {head!r}). "
                f"Check that the path names the weights file (e.g. var_d16.pth) and not a page or a text file."
            )
        if head[:2] == b"PK":
            compressed = check_zip_sizes(p, limit)  # a zip bomb is refused before torch reads a byte of it
        else:
            compressed = False
            lim = max_checkpoint_bytes(limit)
            if size > lim:  # the legacy format is read whole into memory
                raise _too_large(p, "the legacy (pickle) checkpoint", size, lim)
        try:
            # Training checkpoints (LlamaGen's vq_train.py / train_c2i.py) also pickle the argparse Namespace
            # under "args": a plain attribute bag, safe to rebuild (its values still pass the weights-only
            # checks). Stored (uncompressed) members are memory-mapped, not read.
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(
                    p, map_location="cpu", weights_only=True, mmap=mmap and head[:2] == b"PK" and not compressed
                )
        except Exception as e:
            msg = str(e)
            if "Weights only load failed" in msg or "Unsupported global" in msg:
                why, detail = _pickle_reason(msg)
                if why == "objects":
                    raise CheckpointError(
                        f"{p}: contains pickled Python objects that a weights-only load refuses ({detail}). iarmem "
                        f"never unpickles arbitrary objects. Re-save the weights with "
                        f"torch.save(model.state_dict(), path) or as .safetensors."
                    ) from None
                raise CheckpointError(
                    f"{p}: not a valid PyTorch checkpoint: its pickle data is corrupt or is not a weights file "
                    f"({detail}; {size} bytes). Download or copy it again, or check that the path names the "
                    f"weights file."
                ) from None
            if "Invalid magic number" in msg:
                raise CheckpointError(
                    f"{p}: a pickle file, but not one written by torch.save (no PyTorch header). Re-save the "
                    f"weights with torch.save(model.state_dict(), path) or as .safetensors."
                ) from None
            if "central directory" in msg or "failed reading zip" in msg or "EOF" in msg or "truncated" in msg:
                raise CheckpointError(
                    f"{p}: the file is truncated or corrupt ({size} bytes; {msg.splitlines()[0][:120]}). "
                    f"Download or copy it again."
                ) from None
            first = (msg.strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(
                f"{p}: not a readable torch checkpoint ({type(e).__name__}: {first}); it may be truncated or "
                f"corrupt ({size} bytes). Download or copy it again."
            ) from None
        sd = _unwrap(obj, p, component)
    else:
        raise CheckpointError(
            f"{p}: unsupported file type {suffix or '(none)'}; expected one of "
            f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}."
        )
    for k in _DROP_KEYS:
        sd.pop(k, None)
    return sd


# ---------------------------------------------------------------------------------------------------
# What is this file? Key signatures of each family's tokenizer and transformer.
def identify(sd: Mapping[str, torch.Tensor]) -> dict:
    """Guess the family and component of a state dict: {'family', 'component', 'depth', 'width', 'label'}."""
    keys = set(sd)

    def count_blocks(prefix: str) -> int:
        idx = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    if "lvl_1L" in keys or "pos_start" in keys or any(k.endswith("ffn.fc1.weight") for k in keys):
        depth = count_blocks("blocks")
        w = sd["pos_start"].shape[-1] if "pos_start" in sd else 0
        return {
            "family": "var",
            "component": "transformer",
            "depth": depth,
            "width": int(w),
            "shared_aln": "shared_ada_lin.1.weight" in keys,
            "label": "a VAR transformer checkpoint",
        }
    if "target_aware_pos_embed" in keys or any(
        k.endswith("adaLN_modulation.1.weight") and k.startswith("blocks.") for k in keys
    ):
        depth = count_blocks("blocks")
        w = sd["cls_token"].shape[-1] if "cls_token" in sd else 0
        return {
            "family": "rar",
            "component": "transformer",
            "depth": depth,
            "width": int(w),
            "label": "a RAR transformer checkpoint",
        }
    if any(k.startswith("layers.") and "feed_forward" in k for k in keys):
        depth = count_blocks("layers")
        w = sd["tok_embeddings.weight"].shape[-1] if "tok_embeddings.weight" in sd else 0
        return {
            "family": "llamagen",
            "component": "transformer",
            "depth": depth,
            "width": int(w),
            "label": "a LlamaGen GPT checkpoint",
        }
    if any(k.startswith("quantize.quant_resi") for k in keys) or "quantize.ema_vocab_hit_SV" in keys:
        return {
            "family": "var",
            "component": "tokenizer",
            "depth": 0,
            "width": 0,
            "label": "a VAR multi-scale VQVAE checkpoint",
        }
    if "quantize.codebook_used" in keys or any(k.startswith("encoder.conv_blocks.") for k in keys):
        return {
            "family": "llamagen",
            "component": "tokenizer",
            "depth": 0,
            "width": 0,
            "label": "a LlamaGen VQ tokenizer checkpoint",
        }
    if "quantize.embedding.weight" in keys and any(k.startswith("encoder.down.") for k in keys):
        return {
            "family": "rar",
            "component": "tokenizer",
            "depth": 0,
            "width": 0,
            "label": "a MaskGIT-VQGAN tokenizer checkpoint (RAR)",
        }
    return {"family": None, "component": None, "depth": 0, "width": 0, "label": "not a VAR, RAR or LlamaGen checkpoint"}


def likely_models(info: dict) -> list[str]:
    from iarmem_core.registry import all_specs

    if info["component"] != "transformer":
        return []
    return [
        s.name
        for s in all_specs()
        if s.family == info["family"]
        and s.depth == info["depth"]
        and (not info["width"] or s.width == info["width"])
        and s.kind != "test"
    ]


def _summ(keys: list[str], n: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, path: str | os.PathLike, expected: str, component: str
) -> None:
    """Raise CheckpointError unless `sd` has exactly the keys and shapes of `model.state_dict()`.

    `expected` is the registry name the user asked for, `component` "transformer" or "tokenizer".
    """
    from iarmem_core.registry import get_spec

    spec = None
    try:
        spec = get_spec(expected)
    except KeyError:
        pass
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shape_bad = [(k, tuple(sd[k].shape), tuple(ref[k].shape)) for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if not (missing or unexpected or shape_bad):
        return
    info = identify(sd)
    lines = [f"{path}: does not fit {expected} ({component})."]
    if spec is not None and info["family"] is not None and info["family"] != spec.family:
        lines.append(f"This is {info['label']}, but {expected} is a {spec.family.upper()} model.")
    elif spec is not None and info["component"] is not None and info["component"] != component:
        lines.append(f"This is {info['label']}; it belongs in the {info['component']} slot, not the {component} slot.")
    elif info["component"] == "transformer" and spec is not None and info["depth"] != spec.depth:
        likely = likely_models(info)
        what = f"this is {' or '.join(likely)}" if likely else "no registry model has that depth"
        lines.append(f"{info['depth']} blocks found but {expected} expects {spec.depth}: {what}.")
    elif info["component"] == "transformer" and spec is not None and info["width"] and info["width"] != spec.width:
        likely = likely_models(info)
        what = f"this is {' or '.join(likely)}" if likely else "no registry model has that width"
        lines.append(f"width {info['width']} found but {expected} expects {spec.width}: {what}.")
    if missing:
        lines.append(f"Missing {len(missing)} keys: {_summ(missing)}.")
    if unexpected:
        lines.append(f"Unexpected {len(unexpected)} keys: {_summ(unexpected)}.")
    for k, got, want in shape_bad[:6]:
        lines.append(f"Shape mismatch at {k}: file has {list(got)}, model expects {list(want)}.")
    if len(shape_bad) > 6:
        lines.append(f"(+{len(shape_bad) - 6} more shape mismatches)")
    lines.append("Choose the registry model that matches the file, or give the file that matches the model.")
    raise CheckpointError(" ".join(lines))


def load_checked(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    expected: str,
    component: str,
    sd: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Read `path` (or use `sd`), validate it against `model`, and load it strictly with assign=True.

    `model` may live on the meta device: assign=True then takes the file's tensors without a second
    copy, so a full-size model never needs twice its memory. A .safetensors file's header is compared with
    the model before any tensor is read, so a file that does not fit costs no memory.
    """
    if sd is None:
        if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES and Path(path).is_file():
            header = safetensors_header(path)
            for k in _DROP_KEYS:
                header.pop(k, None)
            check_state_dict(model, _meta_state_dict(header), path=path, expected=expected, component=component)
        sd = read_state_dict(path, component=component)
    check_state_dict(model, sd, path=path, expected=expected, component=component)
    ref = model.state_dict()
    sd = {k: (v.to(ref[k].dtype) if v.dtype != ref[k].dtype and v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model
