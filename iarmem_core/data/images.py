"""Conversions into iarmem's image convention: float `x_B3HW` in [0, 1] (the adapters convert to their
tokenizer's range), and back to uint8 for display and storage; `open_image` opens a file with a pixel-count
limit checked before anything is decoded."""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

DEMO_NATIVE_SIZE = 32  # Fashion-MNIST's 28x28 padded by 2 px of background
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 megapixels: ~150 MB as RGB; ImageNet's largest is ~12 MP
MAX_PIXELS_ENV = "IARMEM_MAX_IMAGE_PIXELS"


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than the limit; refused before decoding."""


def max_image_pixels(limit: int | None = None) -> int:
    """The most pixels an image may have: `limit`, else $IARMEM_MAX_IMAGE_PIXELS, else 50 million."""
    if limit is not None:
        return int(limit)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        v = float(raw)
        if not math.isfinite(v) or v < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"${MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels (e.g. 200000000)") from None
    return int(v)


@contextmanager
def open_image(path, limit: int | None = None):
    """PIL's Image.open with the pixel count checked from the header before any pixel is decoded.

    Raises ImageTooLargeError naming the size, the limit and how to raise it ($IARMEM_MAX_IMAGE_PIXELS);
    a 140 KB PNG of 12000x12000 pixels would otherwise decode to over a gigabyte."""
    from PIL import Image

    lim = max_image_pixels(limit)
    if Image.MAX_IMAGE_PIXELS is not None and lim > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = lim  # PIL's own guard refuses at twice its limit; ours is the one that counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is checked below
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(
                f"{path}: {e}; refused before decoding. Raise the limit with {MAX_PIXELS_ENV}=<pixels>."
            ) from None
    try:
        w, h = img.size
        if w * h > lim:
            raise ImageTooLargeError(
                f"{path}: {w}x{h} = {w * h:,} pixels, more than the limit of {lim:,}; refused before decoding "
                f"(it would take about {3 * w * h / 2**20:,.0f} MiB as RGB). If the image is genuine, raise the "
                f"limit with {MAX_PIXELS_ENV}={max(w * h, 2 * lim)}."
            )
        yield img
    finally:
        img.close()


def resize_square(x_B3HW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [B,C,H,W] to [B,C,size,size] (bilinear, antialiased when shrinking), clamped to [0, 1]."""
    if x_B3HW.shape[-2:] == (size, size):
        return x_B3HW
    shrink = size < max(x_B3HW.shape[-2:])
    y = F.interpolate(x_B3HW, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.clamp_(0.0, 1.0)


def gray_to_input(
    images_BHW: np.ndarray | torch.Tensor, size: int = DEMO_NATIVE_SIZE, pad: int = 2, background: float = 0.0
) -> torch.Tensor:
    """Gray [B,H,W] or [H,W] (uint8 0..255, or float already in [0, 1]) -> float [B,3,size,size] in [0, 1].

    Pads `pad` px of background, repeats to 3 channels, then resizes if the padded size is not `size`
    (Fashion-MNIST's 28x28 -> 32x32 needs no resize)."""
    x = torch.as_tensor(np.asarray(images_BHW))
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected gray images [B,H,W] or [H,W], got shape {tuple(x.shape)}")
    x_B1HW = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float())[:, None]
    x_B1HW = F.pad(x_B1HW, (pad, pad, pad, pad), value=background)
    return resize_square(x_B1HW, size).expand(-1, 3, -1, -1).contiguous()


def pil_to_input(img, size: int) -> torch.Tensor:
    """A PIL image of any mode and size -> float [3,size,size] in [0, 1]: RGB, shorter side resized to
    `size` (bicubic), center crop. Transparency is composited over white; 16-bit images are scaled."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("L") clips 16/32-bit values at 255 instead of scaling them
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def to_uint8(x_B3HW: torch.Tensor | np.ndarray, size: int | None = None) -> np.ndarray:
    """float [B,3,H,W] in [0, 1] -> uint8 [B,H,W,3]; with `size`, area-downsampled to at most size x size."""
    x = torch.as_tensor(x_B3HW).detach().float().clamp(0, 1)
    if size is not None and x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
