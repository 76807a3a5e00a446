"""The transformers' linear layers, and which fp32 GEMM runs them on the CPU.

On the CPU, ``F.linear`` goes to MKL's sgemm. On this project's machines (AMD EPYC with AVX-512) MKL takes a
slower code path than oneDNN's fp32 GEMM, which PyTorch also ships (it runs the convolutions): measured with
2 threads on [4096 x 1024] x [1024 x 4096], 163 GFLOP/s for MKL and 336 GFLOP/s for oneDNN (bench/extraction.py
prints both peaks). Both are fp32 GEMMs with fp32 accumulation; they add up in a different order, so their
outputs differ at the fp32 noise level (a few 1e-6 on unit-scale inputs, the same size as the difference
between 1 and 2 threads or between two batch sizes in MKL). The golden data allow 1e-4 on floats; token ids
are integers and must not move, and they do not: the smallest greedy logit gap of the golden models is 1.4e-2
(REFERENCE_MODELS.md), more than 1000 times this noise (tests/test_linear.py compares the two GEMMs on every
family's generation).

`Linear` is ``nn.Linear`` (same parameters, same state dict) whose forward goes through `linear`. `linear`
uses oneDNN when the mode is ``"onednn"`` (the default where PyTorch has it), the input is an fp32 CPU tensor,
no autocast is active on the CPU and no gradient is asked for (training and attribution keep autograd's path,
``F.linear``); otherwise ``F.linear``. The environment variable ``IARMEM_CPU_GEMM=mkl`` (or `cpu_gemm("mkl")`
around a block) makes every call ``F.linear``, PyTorch's default.

Example:
    >>> from iarmem_core.models.linear import cpu_gemm, gemm_mode
    >>> gemm_mode()                      # "onednn" where available, else "mkl"
    >>> with cpu_gemm("mkl"):            # PyTorch's own path, e.g. to time the pipeline before this module
    ...     logits = adapter.teacher_forced_logits(tokens, labels)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("onednn", "mkl")
_ENV = "IARMEM_CPU_GEMM"
_lock = threading.Lock()


def _onednn_available() -> bool:
    """oneDNN's fp32 linear exists here and agrees with F.linear on a small problem (within fp32 noise)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
        with torch.no_grad():
            y = op(x, w, b, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-4, rtol=1e-5))
    except RuntimeError:
        return False


def _initial_mode() -> str:
    want = os.environ.get(_ENV, "onednn").strip().lower() or "onednn"
    if want not in MODES:
        raise ValueError(f"{_ENV}={want!r}: expected one of {MODES} (unset it for the default, onednn)")
    return want if want == "mkl" or _ONEDNN else "mkl"


_ONEDNN = _onednn_available()
_mode = _initial_mode()


def gemm_mode() -> str:
    """The fp32 CPU GEMM `linear` uses now: "onednn" or "mkl" (PyTorch's F.linear)."""
    return _mode


@contextlib.contextmanager
def cpu_gemm(mode: str) -> Iterator[None]:
    """Run the block with `mode` ("onednn" or "mkl") for every model in this process, then restore.

    The mode is process-wide (threads started inside see it too); "onednn" where oneDNN is missing is "mkl".
    """
    global _mode
    if mode not in MODES:
        raise ValueError(f"cpu_gemm: unknown mode {mode!r}, expected one of {MODES}")
    with _lock:
        before, _mode = _mode, (mode if mode == "mkl" or _ONEDNN else "mkl")
    try:
        yield
    finally:
        with _lock:
            _mode = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN's fp32 GEMM where that is allowed (module docstring)."""
    if (
        _mode == "onednn"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and (bias is None or bias.dtype == torch.float32)
        and not torch.is_autocast_enabled("cpu")
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
    ):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is `linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
