"""Safe checkpoint loading with errors that say what a file is and what was expected.

- `.pt`, `.pth`, `.bin`, `.ckpt`: ``torch.load(weights_only=True)`` only; a file that needs arbitrary
  unpickling is refused, never executed.
- `.safetensors`: through the safetensors library.
- Wrappers are unwrapped: ``{'model': sd}``, ``{'module': sd}``, ``{'state_dict': sd}``, ``{'ema': sd}``
  and VAR trainer checkpoints (``{'trainer': {'var_wo_ddp': sd, 'vae_local': sd}}``). A stray
  ``freqs_cis`` (some LlamaGen saves) is dropped.
- Before `load_state_dict(strict=True, assign=True)` the keys and shapes are compared with the model,
  and a mismatch names the likely registry model ("30 blocks found: this is var-d30").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming the file, the problem and the fix."""


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
    path: str | os.PathLike, component: str | None = None, mmap: bool = True
) -> dict[str, torch.Tensor]:
    """Read a state dict from `path` safely (never unpickles arbitrary objects); tensors on CPU."""
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
        try:
            # Training checkpoints (LlamaGen's vq_train.py / train_c2i.py) also pickle the argparse Namespace
            # under "args": a plain attribute bag, safe to rebuild (its values still pass the weights-only
            # checks).
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and head[:2] == b"PK")
        except Exception as e:
            msg = str(e)
            if "Weights only load failed" in msg or "Unsupported global" in msg or "unpickl" in msg.lower():
                first = msg.strip().splitlines()[0][:200]
                raise CheckpointError(
                    f"{p}: contains pickled Python objects that a weights-only load refuses ({first}). iarmem never "
                    f"unpickles arbitrary objects. Re-save the weights with torch.save(model.state_dict(), path) or "
                    f"as .safetensors."
                ) from None
            if "central directory" in msg or "failed reading zip" in msg or "EOF" in msg or "truncated" in msg:
                raise CheckpointError(
                    f"{p}: the file is truncated or corrupt ({size} bytes; {msg.splitlines()[0][:120]}). "
                    f"Download or copy it again."
                ) from None
            raise CheckpointError(f"{p}: not a torch checkpoint ({msg.splitlines()[0][:200]}).") from None
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
    copy, so a full-size model never needs twice its memory.
    """
    if sd is None:
        sd = read_state_dict(path, component=component)
    check_state_dict(model, sd, path=path, expected=expected, component=component)
    ref = model.state_dict()
    sd = {k: (v.to(ref[k].dtype) if v.dtype != ref[k].dtype and v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model
