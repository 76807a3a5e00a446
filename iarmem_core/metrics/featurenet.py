"""The bundled feature network: a small CNN trained on Fashion-MNIST, for offline quality and similarity.

It stands in for Inception (Frechet distance) and SSCD (copy similarity) where their weights are not
available. Every number computed in its feature space is labelled ``demo-fashion-cnn`` and is not
comparable with Inception-FID or SSCD scores.

Input: images [B, 3, H, W] in [0, 1]; one channel is replicated to three, and other sizes are resized to
32x32 (bilinear, antialiased when shrinking). Fashion-MNIST's 28x28 grey images are zero-padded to 32x32
(`fashion_to_input`), which is what the network is trained on.

Files: `save_feature_net` writes the weights as ``.safetensors`` (the config rides in the safetensors
metadata, so the file alone rebuilds the network) and a JSON card beside it (same name, ``.json``).

Training it is the demo factory's (`iarmem_core.demo.features.train_feature_net`).

Example:
    >>> net = load_feature_net("assets/demo-fashion-cnn.safetensors")
    >>> feats_BD = net.features(images_B3HW)            # [B, 128]
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core.checkpoints import CheckpointError

FORMAT = "iarmem-feature-net"
FORMAT_VERSION = 1
FEATURE_SPACE_NAME = "demo-fashion-cnn"


@dataclass(frozen=True)
class FeatureNetConfig:
    width: int = 16  # channels of the first stage; the three stages have width, 2*width, 4*width
    feat_dim: int = 128  # size of the penultimate layer, i.e. of the feature space
    n_classes: int = 10
    in_size: int = 32  # inputs of any other size are resized to this (a multiple of 8)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    # conv3x3 -> BN -> ReLU -> 2x2 max pool: one conv per stage is enough for 0.9 on Fashion-MNIST and
    # keeps an epoch of 60k images under a minute of CPU
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
    )


def prepare_images(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, 1 or 3, H, W] (float in [0, 1] or uint8) -> float [B, 3, size, size] in [0, 1]."""
    if x_BCHW.ndim != 4 or x_BCHW.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 3, H, W] (or [B, 1, H, W]), got shape {list(x_BCHW.shape)}")
    x = x_BCHW.float() / 255.0 if x_BCHW.dtype == torch.uint8 else x_BCHW.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        shrink = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def fashion_to_input(images_BHW_uint8: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST uint8 [B, 28, 28] -> uint8 [B, 1, 32, 32], zero-padded by 2 pixels on each side."""
    return F.pad(images_BHW_uint8[:, None], (2, 2, 2, 2))


class FeatureNet(nn.Module):
    """Small CNN for 32x32 RGB in [0, 1]: `features` -> [B, feat_dim], `forward` -> logits [B, n_classes]."""

    def __init__(self, width: int = 16, feat_dim: int = 128, n_classes: int = 10, in_size: int = 32):
        super().__init__()
        if in_size % 8:
            raise ValueError(f"in_size must be a multiple of 8 (three 2x2 pools), got {in_size}")
        self.config = FeatureNetConfig(width, feat_dim, n_classes, in_size)
        self.stages = nn.Sequential(_stage(3, width), _stage(width, 2 * width), _stage(2 * width, 4 * width))
        self.fc = nn.Linear(4 * width * (in_size // 8) ** 2, feat_dim)
        self.head = nn.Linear(feat_dim, n_classes)

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> penultimate activations [B, feat_dim] (after ReLU)."""
        x = prepare_images(x_BCHW, self.config.in_size) * 2 - 1  # [-1, 1]
        h_BF = self.stages(x).flatten(1)
        return F.relu(self.fc(h_BF))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> class logits [B, n_classes]."""
        return self.head(self.features(x_BCHW))


# ---------------------------------------------------------------------------------------------------
# Files: weights as .safetensors with the config in its metadata, and a JSON card beside them.
def card_path(path: str | os.PathLike) -> Path:
    """The JSON card that belongs to a weights file: same name with the suffix .json."""
    return Path(path).with_suffix(".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written file


def save_feature_net(net: FeatureNet, path: str | os.PathLike, card: dict | None = None) -> Path:
    """Write `net` to `path` (.safetensors) and its card beside it (suffix .json); returns the card path."""
    from safetensors.torch import save

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{p}: the weights file must end in .safetensors")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(asdict(net.config))}
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(p, save(sd, metadata=meta))
    full_card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_space": FEATURE_SPACE_NAME,
        "weights_file": p.name,
        "config": asdict(net.config),
        "n_parameters": sum(v.numel() for v in sd.values() if v.is_floating_point()),
        **(card or {}),
    }
    cp = card_path(p)
    _atomic_write_bytes(cp, (json.dumps(full_card, indent=2, sort_keys=False) + "\n").encode())
    return cp


def load_feature_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a FeatureNet written by `save_feature_net` (eval mode, no gradients); clear errors otherwise."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(
            f"{p}: no such file. Expected the feature network's .safetensors file "
            f"(re-create it with `python -m iarmem_core train-demo`)."
        )
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{p}: a FeatureNet is stored as .safetensors (written by save_feature_net), "
            f"but this file ends in {p.suffix or '(no suffix)'}."
        )
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"{p}: not a readable safetensors file ({e}). It may be truncated or another "
            f"format renamed; re-create it with `python -m iarmem_core train-demo`."
        ) from None
    if meta.get("format") != FORMAT:
        keys = ", ".join(sorted(sd)[:6]) + (" ..." if len(sd) > 6 else "")
        raise CheckpointError(
            f"{p}: not an iarmem feature network: its metadata has format="
            f"{meta.get('format')!r}, expected {FORMAT!r}; tensors found: [{keys}]. "
            f"Give the file written by save_feature_net / train-demo."
        )
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: format version {meta['format_version']} is newer than this iarmem "
            f"understands ({FORMAT_VERSION}); update iarmem."
        )
    cfg = FeatureNetConfig(**json.loads(meta["config"]))
    net = FeatureNet(**asdict(cfg))
    ref = net.state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    bad = [k for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{p}: tensors do not fit the FeatureNet config {asdict(cfg)}: missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shape {bad[:4]}. The file "
            f"is damaged; re-create it with `python -m iarmem_core train-demo`."
        )
    net.load_state_dict(sd, strict=True)
    net.eval().to(device)
    for q in net.parameters():
        q.requires_grad_(False)
    return net


def load_feature_card(path: str | os.PathLike) -> dict:
    """The JSON card of a feature network weights file (or of the card path itself)."""
    cp = card_path(path)
    if not cp.is_file():
        raise FileNotFoundError(f"{cp}: no model card beside {Path(path).name}; save_feature_net writes one.")
    return json.loads(cp.read_text())
