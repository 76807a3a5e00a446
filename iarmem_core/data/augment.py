"""Augmentations for UnitMem's A views, seeded per image so results do not depend on batching."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

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
    return x_BCHW.permute(0, 2, 3, 1)[b, rows_Bh[:, :, None], cols_Bw[:, None, :]].permute(0, 3, 1, 2).contiguous()


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
            big = F.interpolate(x_B3HW, size=(big_h, big_w), mode="bilinear", align_corners=False).clamp_(0, 1)
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


def apply_view(x_B3HW: torch.Tensor, op: str) -> torch.Tensor:
    """One deterministic member of a finite augmentation family: "none" (the image) or "flip" (its mirror)."""
    if op == "none":
        return x_B3HW
    if op == "flip":
        return x_B3HW.flip(-1)
    raise ValueError(f"no deterministic view {op!r}: expected none or flip")
