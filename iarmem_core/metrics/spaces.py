"""Feature spaces: images [B, 3, H, W] in [0, 1] -> features [B, D], batched, on a chosen device.

Three implementations, each with a stable `name` that every result carries:

- ``demo-fashion-cnn`` (`DemoFeatureSpace`): the bundled FeatureNet (penultimate layer, 128-d). Offline.
  Frechet distances in it are *not* Inception-FID and are labelled so.
- ``inception-v3-fid`` (`InceptionFeatureSpace`): NVIDIA's TorchScript Inception-v3,
  ``inception-2015-12-05.pt`` (the file StyleGAN2-ADA/StyleGAN3 and clean-fid download; a conversion of
  the TensorFlow FID graph of 2015-12-05), supplied by the user. It is called as
  ``module(x, return_features=True)`` with x float32 [B, 3, H, W] holding 8-bit levels in [0, 255] and
  returns the 2048-d pool3 features; the module itself resizes to 299x299 and normalises, as StyleGAN's
  FID does. Accepted format: that TorchScript archive only. A torch.save checkpoint (e.g. pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``,
  state dicts that need torchvision's Inception code) is refused with a CheckpointError naming the file
  that is needed; so is any TorchScript module without ``return_features`` or without 2048-d output.
- ``sscd-disc-mixup`` (`SSCDFeatureSpace`): Meta's SSCD copy-detection model,
  ``sscd_disc_mixup.torchscript.pt``, supplied by the user: images resized to 320x320 (bilinear,
  antialiased when shrinking), normalised with the ImageNet mean/std, embedded, L2-normalised; the
  cosine of two embeddings is the SSCD similarity (published copy threshold 0.75).

TorchScript archives run the scripted graph they contain (not arbitrary Python, but still code): load
only the official files. `torch.jit.load` is deprecated in torch 2.13 but is the only reader of these
files; its DeprecationWarning is silenced here.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core.checkpoints import CheckpointError
from iarmem_core.metrics.featurenet import FEATURE_SPACE_NAME, FeatureNet, load_feature_net

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_FILE = "inception-2015-12-05.pt"
SSCD_FILE = "sscd_disc_mixup.torchscript.pt"
DEMO_FEATURE_NET_FILE = "demo-fashion-cnn.safetensors"  # under assets/, written by train-demo


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU."""
    from iarmem_core.adapters.base import resolve_device as _resolve

    return _resolve(device)


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validate images [B, 1 or 3, H, W] in [0, 1] and return them as float [B, 3, H, W]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: expected a tensor [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], got {shape}")
    if images.dtype == torch.uint8:
        raise ValueError(f"{what}: got uint8 images; convert them to float in [0, 1] (images.float() / 255)")
    x = images.float()
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -0.01 or hi > 1.01:  # [-1, 1] and [0, 255] are the usual mix-ups
            raise ValueError(
                f"{what}: values must lie in [0, 1], found {lo:.3g}..{hi:.3g}. Map [-1, 1] "
                f"images with (x + 1) / 2 and [0, 255] images with x / 255."
            )
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_square(x_B3HW: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased when shrinking, like torchvision's Resize on tensors)."""
    if x_B3HW.shape[-2:] == (size, size):
        return x_B3HW
    shrink = x_B3HW.shape[-2] > size or x_B3HW.shape[-1] > size
    return F.interpolate(x_B3HW, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class FeatureSpace(ABC):
    """Images [B, 3, H, W] in [0, 1] -> features [B, D] (float32, on CPU), computed in batches on `device`."""

    name: str = "abstract"
    description: str = ""
    comparable_to_published: bool = False  # True only for Inception (FID) and SSCD

    def __init__(self, batch_size: int = 64, device: str | torch.device = "auto"):
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)

    @property
    @abstractmethod
    def dim(self) -> int:
        """Feature dimension D."""

    @abstractmethod
    def _embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """One batch, already on the device, float in [0, 1] -> [B, D]."""

    @torch.no_grad()
    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> features [B, D] float32 on CPU."""
        x = check_images(images_B3HW, f"{self.name} features")
        out = [self._embed(chunk.to(self.device)).float().cpu() for chunk in x.split(self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def info(self) -> dict:
        """What a result records about the space."""
        return {
            "feature_space": self.name,
            "dim": self.dim,
            "description": self.description,
            "comparable_to_published": self.comparable_to_published,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"


class DemoFeatureSpace(FeatureSpace):
    """The bundled FeatureNet's penultimate layer (Fashion-MNIST CNN, 128-d); offline, demo-fashion-cnn."""

    name = FEATURE_SPACE_NAME
    description = (
        "penultimate layer of iarmem's small CNN trained on Fashion-MNIST; Frechet distances here "
        "are not Inception-FID and are not comparable with published numbers"
    )

    def __init__(
        self,
        net: FeatureNet | str | os.PathLike | None = None,
        batch_size: int = 256,
        device: str | torch.device = "auto",
    ):
        super().__init__(batch_size, device)
        if net is None:
            net = default_demo_feature_net_path()
        if not isinstance(net, FeatureNet):
            net = load_feature_net(net)
        if net.training:
            raise ValueError(
                "the FeatureNet is in training mode; call .eval() first (BatchNorm would use "
                "batch statistics and features would depend on the batch)"
            )
        if next(net.parameters()).device != self.device:
            net = copy.deepcopy(net).to(self.device)  # never move a net other code may share
        self.net = net

    @property
    def dim(self) -> int:
        return self.net.config.feat_dim

    def _embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net.features(x_B3HW)


def default_demo_feature_net_path() -> Path:
    """assets/demo-fashion-cnn.safetensors, with a clear error when train-demo has not written it yet."""
    from iarmem_core.registry import ASSETS

    p = ASSETS / DEMO_FEATURE_NET_FILE
    if not p.is_file():
        raise CheckpointError(
            f"{p}: the bundled feature network is missing. Re-create the demo assets with "
            f"`python -m iarmem_core train-demo`."
        )
    return p


# ---------------------------------------------------------------------------------------------------
# User-supplied TorchScript files
def load_torchscript(path: str | os.PathLike, what: str, expected_file: str) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on CPU in eval mode; a CheckpointError naming the problem otherwise."""
    p = Path(path).expanduser()
    hint = f"{what} needs the TorchScript file {expected_file}"
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file. {hint}; give its path.")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (0 bytes). {hint}; download or copy it again.")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            head = f.read(8)
        raise CheckpointError(
            f"{p}: not a TorchScript archive (those are zip files written by "
            f"torch.jit.save; this one starts with {head!r}). It may be truncated or of "
            f"another format. {hint}."
        )
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    if not any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            f"{p}: a torch.save checkpoint (pickled weights or model), not a TorchScript "
            f"archive; iarmem does not unpickle such files and has no architecture code "
            f"for them. {hint}."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: TorchScript could not load it ({first}). The file may be damaged. {hint}."
        ) from None
    return module.eval()


def _probe(module: nn.Module, x: torch.Tensor, p: Path, what: str, hint: str, **kwargs) -> torch.Tensor:
    """Run one input through a freshly loaded module so a wrong file fails at load time, not mid-job."""
    try:
        with torch.no_grad():
            out = module(x, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: loads as TorchScript but fails as {what} on a {list(x.shape)} input ({first}). {hint}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"{p}: {what} should return features [B, D], got {got}. {hint}")
    return out


class InceptionFeatureSpace(FeatureSpace):
    """Inception-v3 pool3 features (2048-d) from NVIDIA's TorchScript inception-2015-12-05.pt: real FID."""

    name = "inception-v3-fid"
    description = (
        "Inception-v3 pool3 (2048-d) from inception-2015-12-05.pt (NVIDIA TorchScript of the TF "
        "FID graph), 8-bit levels, resized to 299 inside the module as in StyleGAN's FID"
    )
    comparable_to_published = True

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device: str | torch.device = "auto"):
        super().__init__(batch_size, device)
        self.path = Path(path).expanduser()
        hint = (
            f"Expected NVIDIA's {INCEPTION_FILE} (StyleGAN2-ADA / clean-fid), called as "
            f"module(x_0_255, return_features=True) -> [B, 2048]."
        )
        module = load_torchscript(self.path, "Inception FID", INCEPTION_FILE)
        out = _probe(
            module, torch.full((1, 3, 299, 299), 128.0), self.path, "Inception FID", hint, return_features=True
        )
        if out.shape[1] != 2048:
            raise CheckpointError(
                f"{self.path}: returns {out.shape[1]}-d features with "
                f"return_features=True; FID uses the 2048-d pool3 features. {hint}"
            )
        self.module = module.to(self.device)

    @property
    def dim(self) -> int:
        return 2048

    def _embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        # quantise to 8-bit levels: FID references are computed from uint8 images (PNG/JPEG files)
        x255 = (x_B3HW * 255).round().clamp(0, 255)
        return self.module(x255, return_features=True)


class SSCDFeatureSpace(FeatureSpace):
    """SSCD embeddings from sscd_disc_mixup.torchscript.pt: 320x320, ImageNet norm, L2-normalised."""

    name = "sscd-disc-mixup"
    description = (
        "SSCD (sscd_disc_mixup.torchscript.pt) embeddings: 320x320 bilinear resize, ImageNet "
        "mean/std, L2-normalised; cosine > 0.75 = copy (Kowalczuk et al.)"
    )
    comparable_to_published = True

    def __init__(
        self, path: str | os.PathLike, batch_size: int = 16, device: str | torch.device = "auto", size: int = 320
    ):
        super().__init__(batch_size, device)
        self.path = Path(path).expanduser()
        self.size = size
        hint = f"Expected Meta's {SSCD_FILE}, called as module(x_normalised) -> [B, 512]."
        module = load_torchscript(self.path, "SSCD similarity", SSCD_FILE)
        out = _probe(module, torch.zeros(1, 3, size, size), self.path, "SSCD", hint)
        self._dim = int(out.shape[1])
        self.module = module.to(self.device)
        self.mean_3 = torch.tensor(IMAGENET_MEAN, device=self.device)
        self.std_3 = torch.tensor(IMAGENET_STD, device=self.device)

    @property
    def dim(self) -> int:
        return self._dim

    def _embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        x = resize_square(x_B3HW, self.size)
        x = (x - self.mean_3[:, None, None]) / self.std_3[:, None, None]
        return F.normalize(self.module(x).float(), dim=1)


FEATURE_SPACES: dict[str, type[FeatureSpace]] = {
    DemoFeatureSpace.name: DemoFeatureSpace,
    InceptionFeatureSpace.name: InceptionFeatureSpace,
    SSCDFeatureSpace.name: SSCDFeatureSpace,
}


SPACE_ALIASES = {"demo": DemoFeatureSpace.name, "inception": InceptionFeatureSpace.name, "sscd": SSCDFeatureSpace.name}
SPACE_CACHE_SIZE = 4  # feature spaces kept per process (each holds a network; Inception ~100 MB)
_SPACES: OrderedDict[tuple, FeatureSpace] = OrderedDict()
_SPACES_MU = threading.Lock()


def resolve_space(name: str | FeatureSpace | None, path: str | os.PathLike | None = None) -> FeatureSpace:
    """The one way to get a feature space: an instance is returned as is; None or "demo-fashion-cnn" is
    the bundled CNN; "inception-v3-fid" / "sscd-disc-mixup" (or "inception" / "sscd") need `path`.

    Spaces are built once per (name, file, file size and mtime) and kept in a small LRU cache
    (`SPACE_CACHE_SIZE`), shared by every caller of the process.
    """
    if isinstance(name, FeatureSpace):
        return name
    key_name = SPACE_ALIASES.get(name or "demo", name or "demo")
    if key_name not in FEATURE_SPACES:
        raise KeyError(f"unknown feature space {name!r}; choose one of {', '.join(FEATURE_SPACES)}")
    file_id: tuple = ()
    if path is not None:
        p = Path(path).expanduser().resolve()
        st = p.stat() if p.exists() else None
        file_id = (str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    key = (key_name, file_id)
    with _SPACES_MU:
        if key in _SPACES:
            _SPACES.move_to_end(key)
            return _SPACES[key]
    space = feature_space(key_name, path)
    with _SPACES_MU:
        _SPACES[key] = space
        while len(_SPACES) > SPACE_CACHE_SIZE:
            _SPACES.popitem(last=False)
    return space


def feature_space(name: str, path: str | os.PathLike | None = None, **kwargs) -> FeatureSpace:
    """Build a feature space by name; `path` is the weights file (optional for demo-fashion-cnn)."""
    if name not in FEATURE_SPACES:
        raise KeyError(f"unknown feature space {name!r}; choose one of {', '.join(FEATURE_SPACES)}")
    if name == DemoFeatureSpace.name:
        return DemoFeatureSpace(path, **kwargs)
    if path is None:
        file = INCEPTION_FILE if name == InceptionFeatureSpace.name else SSCD_FILE
        raise ValueError(
            f"feature space {name!r} needs the weights file {file}, supplied by you (iarmem "
            f"never downloads it); give its path, or use demo-fashion-cnn offline"
        )
    return FEATURE_SPACES[name](path, **kwargs)
