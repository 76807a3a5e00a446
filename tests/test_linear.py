"""The models' linear layers on oneDNN's fp32 GEMM (iarmem_core/models/linear.py): the same numbers as PyTorch's
F.linear within fp32 noise, the same token ids in every family, autograd and autocast left on F.linear's path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iarmem_core.adapters import load_adapter
from iarmem_core.models import linear as lin

needs_onednn = pytest.mark.skipif(not lin._ONEDNN, reason="this PyTorch build has no oneDNN fp32 linear")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 32, 16), (7, 100, 3), (2, 5, 64, 48), (300, 1024, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear_within_fp32_noise(shape, with_bias):
    *lead, k, n = shape
    x, w = _rand(*lead, k, seed=1), _rand(n, k, seed=2) / k**0.5
    b = _rand(n, seed=3) if with_bias else None
    with torch.no_grad():
        ref = F.linear(x, w, b)
        with lin.cpu_gemm("onednn"):
            got = lin.linear(x, w, b)
            got_t = lin.linear(x.transpose(-1, -2).contiguous().transpose(-1, -2), w, b)  # non-contiguous input
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, ref, atol=1e-5, rtol=1e-5)


def test_mkl_mode_is_f_linear_bit_for_bit_and_modes_restore():
    x, w, b = _rand(9, 64), _rand(32, 64, seed=1), _rand(32, seed=2)
    before = lin.gemm_mode()
    with lin.cpu_gemm("mkl"):
        assert lin.gemm_mode() == "mkl"
        with torch.no_grad():
            assert torch.equal(lin.linear(x, w, b), F.linear(x, w, b))
    assert lin.gemm_mode() == before
    with pytest.raises(ValueError, match="unknown mode"):
        with lin.cpu_gemm("blas"):
            pass
    assert lin.gemm_mode() == before


@needs_onednn
def test_gradients_and_autocast_keep_f_linears_path():
    layer = lin.Linear(16, 8)
    x = _rand(4, 16).requires_grad_(True)
    with lin.cpu_gemm("onednn"):
        y = layer(x)  # grad asked for: autograd's path
        assert y.grad_fn is not None
        y.sum().backward()
        torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, -1))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert layer(x.detach()).dtype == torch.bfloat16  # autocast's cast, as nn.Linear
    assert list(lin.Linear(16, 8).state_dict()) == list(torch.nn.Linear(16, 8).state_dict())


@needs_onednn
@pytest.mark.parametrize("name", ["test-var", "test-rar", "test-llamagen", "demo-var", "demo-rar"])
def test_generation_tokens_and_logits_agree_across_the_two_gemms(name):
    """Greedy generation with and without CFG gives the same ids on both GEMMs; teacher-forced logits agree within
    the golden tolerance (1e-4). The demo models are trained, so their logit gaps are real ones."""
    m = load_adapter(name, device="cpu", seed=3)
    labels = torch.arange(6) % m.num_classes
    toks = m.tokenize(torch.rand(6, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0)))
    prefix = [p for p in m.prefix_choices if p > 0][0]
    out = {}
    for mode in lin.MODES:
        with lin.cpu_gemm(mode), torch.inference_mode():
            out[mode] = (
                m.flatten(m.generate(labels, top_k=1)),
                m.flatten(m.generate(labels, prefix=toks, n_prefix=prefix, cfg=1.5, top_k=1)),
                m.teacher_forced_logits(toks, labels),
            )
    for a, b in zip(out["onednn"][:2], out["mkl"][:2]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out["onednn"][2], out["mkl"][2], atol=1e-4, rtol=1e-4)
