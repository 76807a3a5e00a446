"""Shared pieces of the demo factory (`iarmem_core.demo.world` builds the world with them): timing, logging,
weight files, the transformers' training loss, and the FeatureNet of the offline quality metrics.

    python -m iarmem_core train-demo --only features   # retrain the FeatureNet (assets/demo-fashion-cnn.*)

The FeatureNet (`iarmem_core.metrics`: class accuracy, Frechet distance, feature cosine) is trained on Debian's
full Fashion-MNIST train file when it is installed, else on the bundle's 4000 unique training images; images
pixel-identical to a held-out image are removed either way.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core import data
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.demo import bundle as demo_bundle
from iarmem_core.metrics.spaces import DEMO_FEATURE_NET_FILE
from iarmem_core.registry import ASSETS, ModelSpec

CARD_FORMAT = "iarmem-demo-model-card"
FEATURE_NET_FILE = DEMO_FEATURE_NET_FILE  # the file iarmem_core.metrics reads from assets/
Log = Callable[[str], None]


@dataclass(frozen=True)
class FeatureNetTrainConfig:
    epochs: int = 2
    batch_size: int = 128
    source: str = "auto"  # "auto" (Debian full train file if present), "debian" or "bundle"


class Clock:
    """Wall and CPU seconds of a block, with the 1-minute load average around it (the machine is shared)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.load = (0.0, 0.0)

    def __enter__(self) -> Clock:
        self._w, self._c, self._l = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c
        self.load = (round(self._l, 2), round(os.getloadavg()[0], 2))

    def elapsed(self) -> float:
        """Seconds since the block started (for progress lines)."""
        return time.perf_counter() - self._w

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1), "loadavg_1min": list(self.load)}


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _lr_at(step: int, warmup: int, total: int | None, lr: float, min_ratio: float = 1.0) -> float:
    """Linear warm-up, then cosine decay to min_ratio * lr over `total` steps (constant when total is None)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total is None or min_ratio >= 1.0:
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_weights(module: nn.Module, path: Path, meta: dict | None = None, fp16: bool = True) -> int:
    """Write the state dict as .safetensors (floating tensors in fp16); returns the file size in bytes."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        sd[k] = (v.half() if fp16 and v.is_floating_point() else v).contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)
    return path.stat().st_size


def _tokenize_all(adapter: IARAdapter, images_B3HW: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Flat tokens [B, N] of the images, tokenized in batches."""
    out = [adapter.flatten(adapter.tokenize(x)).cpu() for x in images_B3HW.split(batch)]
    return torch.cat(out)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def build_transformer_for_training(spec: ModelSpec, seed: int) -> nn.Module:
    """A freshly initialised transformer of `spec` (the official init of each family) in train mode."""
    torch.manual_seed(seed)
    if spec.family == "var":
        from iarmem_core.models.var import VAR

        tok = spec.tokenizer
        m = VAR(vocab_size=tok["vocab_size"], Cvae=tok["z_channels"], **spec.transformer)
        m.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
        return m.train()
    if spec.family == "rar":
        from iarmem_core.models.rar import RAR

        return RAR(**spec.transformer).train()
    raise ValueError(f"train-demo trains VAR and RAR transformers, not {spec.family!r} ({spec.name})")


def _transformer_loss(
    model: nn.Module,
    tok: nn.Module,
    family: str,
    flat_BN: torch.Tensor,
    labels_B: torch.Tensor,
    scale_slices: Sequence[slice],
    label_dropout: float,
    gen: torch.Generator,
    from_token: int = 0,
) -> torch.Tensor:
    """Teacher-forced cross entropy over the tokens from `from_token` on (0: all), with label dropout to the null
    class."""
    if family == "var":
        with torch.no_grad():
            x_BLCv = tok.quantize.idxBl_to_var_input([flat_BN[:, s] for s in scale_slices])
        drop = torch.rand(labels_B.shape, generator=gen) < label_dropout
        labels_B = torch.where(drop, model.num_classes, labels_B)
        logits_BLV = model(labels_B, x_BLCv)  # (VAR's own label dropout is off: cond_drop_rate set to 0 below)
        logits_BLV, flat_BN = logits_BLV[:, from_token:], flat_BN[:, from_token:]
        return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), flat_BN.reshape(-1))
    labels_B = torch.where(torch.rand(labels_B.shape, generator=gen) < label_dropout, -1, labels_B)
    logits_BNV, targets_BN = model(flat_BN, labels_B)
    logits_BNV, targets_BN = logits_BNV[:, from_token:], targets_BN[:, from_token:]
    return F.cross_entropy(logits_BNV.reshape(-1, logits_BNV.shape[-1]), targets_BN.reshape(-1))


def train_features(
    out_dir: Path,
    cfg: FeatureNetTrainConfig,
    seed: int,
    log: Log = _stderr_log,
    bundle_dir: str | os.PathLike | None = None,
) -> dict:
    """Train and save the FeatureNet (`out_dir`/demo-fashion-cnn.safetensors + .json); returns its card."""
    from iarmem_core.demo.features import train_feature_net
    from iarmem_core.metrics import class_accuracy, fashion_to_input, save_feature_net
    from iarmem_core.metrics.featurenet import prepare_images

    bundle = data.demo.load_bundle(bundle_dir)
    held = bundle.split == "heldout"
    unique = (bundle.split == "train") & (bundle.role == "unique")
    held_x = bundle.images_N28[held]
    held_y = torch.from_numpy(bundle.labels[held])
    src = demo_bundle.DEBIAN_FASHION_DIR
    files = demo_bundle.SOURCE_FILES
    use_debian = cfg.source == "debian" or (
        cfg.source == "auto" and all((src / files[k]).exists() for k in ("train_images", "train_labels"))
    )
    if use_debian:
        x = demo_bundle.read_idx(src / demo_bundle.SOURCE_FILES["train_images"], 16).reshape(-1, 28, 28)
        y = demo_bundle.read_idx(src / demo_bundle.SOURCE_FILES["train_labels"], 8).astype(np.int64)
        source = f"Fashion-MNIST full train file ({src / demo_bundle.SOURCE_FILES['train_images']}, Debian)"
    else:
        x, y = bundle.images_N28[unique], bundle.labels[unique]
        source = "bundled demo training split (assets/demo_data: its 4000 unique images)"
    # the held-out images come from the t10k file; drop any training image with the same pixels anyway
    held_hash = {hashlib.sha256(h.tobytes()).digest() for h in held_x}
    keep = np.array([hashlib.sha256(im.tobytes()).digest() not in held_hash for im in x])
    x, y = x[keep], y[keep]
    log(f"[features] training on {len(x)} images from {source}")
    clock = Clock()
    with clock:
        net, stats = train_feature_net(
            fashion_to_input(torch.from_numpy(x.copy())),
            torch.from_numpy(y),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=seed,
        )
    acc = class_accuracy(net, prepare_images(fashion_to_input(torch.from_numpy(held_x.copy())), 32), held_y)
    log(f"[features] held-out accuracy {acc:.4f} in {clock.wall:.0f}s")
    card = {
        "data": {
            "source": source,
            "n_train": int(len(x)),
            "removed_equal_to_heldout": int((~keep).sum()),
            "heldout_kept_out": "the bundled held-out images (t10k file) are not trained on",
        },
        "heldout_accuracy": round(acc, 4),
        "training": _json_safe(stats),
        "timing": clock.to_dict(),
        "command": "python -m iarmem_core train-demo --only features",
    }
    save_feature_net(net, out_dir / FEATURE_NET_FILE, card=card)
    return card


def load_demo_feature_net(out_dir: str | os.PathLike | None = None) -> nn.Module | None:
    """The FeatureNet in `out_dir` (default assets/), or None when it has not been trained yet."""
    from iarmem_core.metrics import load_feature_net

    p = Path(out_dir or ASSETS) / FEATURE_NET_FILE
    return load_feature_net(p) if p.is_file() else None
