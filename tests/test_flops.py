"""FLOP counts of the workloads (iarmem_core.flops): counted on meta = counted on a real run = the textbook formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iarmem_core import flops
from iarmem_core.adapters import load_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_linear_layer_costs_two_flops_per_multiply_add_and_counts_scale_with_the_batch():
    lin = nn.Linear(4, 8)
    assert flops.count(lin, torch.zeros(3, 4)) == 2 * 3 * 4 * 8
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert flops.count(conv, torch.zeros(2, 3, 6, 6)) == 2 * 2 * 5 * 6 * 6 * 3 * 3 * 3
    q = torch.zeros(2, 4, 7, 16)
    attn = flops.count(torch.nn.functional.scaled_dot_product_attention, q, q, q)  # CPU kernel, our formula
    assert attn == 2 * 2 * 4 * 7 * 7 * (16 + 16)
    assert flops.generate_flops("test-var", batch=6, prefix=5) == 6 * flops.generate_flops("test-var", prefix=5)


@pytest.mark.parametrize("name", ["test-var", "test-rar", "test-llamagen"])
def test_meta_counts_equal_the_counts_of_a_real_run(name):
    m = load_adapter(name, device="cpu")
    B = 2
    x = torch.rand(B, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4])
    toks = m.tokenize(x)
    assert flops.count(m.tokenize, x) == flops.tokenize_flops(name, B)
    assert flops.count(m.decode, toks) == flops.decode_flops(name, B)
    assert flops.count(m.teacher_forced_logits, toks, y) == flops.teacher_forced_flops(name, B)
    p = m.prefix_choices[2]
    kw = {"prefix": toks, "n_prefix": p, "top_k": 1}
    assert flops.count(m.generate, y, **kw) == flops.generate_flops(name, B, prefix=p)
    assert flops.count(m.generate, y, kv_cache=False, **kw) == flops.generate_flops(name, B, prefix=p, kv_cache=False)
    assert flops.generate_flops(name, B, prefix=p, kv_cache=False) > flops.generate_flops(name, B, prefix=p)
    cfg = 4.0  # CFG doubles the batch (LlamaGen only above 1): the transformer's work doubles
    assert flops.count(m.generate, y, cfg=cfg, **kw) == flops.generate_flops(name, B, prefix=p, cfg=cfg)


TOLERANCES = [("test-var", 0.05), ("test-llamagen", 0.01), ("demo-rar", 0.05), ("var-d16", 0.01)]


@pytest.mark.parametrize("name,tol", TOLERANCES)
def test_counts_agree_with_the_textbook_formula(name, tol):
    m = flops.meta_adapter(name)
    counted = flops.teacher_forced_flops(name, batch=3)
    estimate = flops.transformer_flops_estimate(m, m.n_tokens, batch=3)
    assert abs(estimate / counted - 1) < tol


def test_peak_and_fraction():
    peak = flops.measure_peak("cpu", n=256, seconds=0.05)
    assert peak["flops_per_s"] > 1e8 and "256x256 float32" in peak["how"]
    if "by_gemm" in peak:  # both CPU fp32 GEMMs timed (iarmem_core.models.linear); the peak is the faster one
        assert set(peak["by_gemm"]) == {"mkl (torch.mm)", "onednn"}
        assert abs(max(peak["by_gemm"].values()) - peak["flops_per_s"] / 1e9) <= 0.05
    f = flops.fraction(2e9, 2.0, peak)
    assert f["achieved_flops_per_s"] == 1e9 and f["fraction_of_peak"] == round(1e9 / peak["flops_per_s"], 4)


def test_the_meter_adds_up_the_calls_of_a_real_attack():
    from iarmem_core import extraction

    m = load_adapter("test-var", device="cpu")
    x = torch.rand(3, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0))
    p = extraction.default_prefix(m)
    flops._decode_1.cache_clear()  # counted for the first time inside the attack's inference mode
    flops._generate_1.cache_clear()
    with flops.Meter(m) as meter:
        extraction.attack_batch(m, x, torch.tensor([1, 2, 3]), [p, 0], ["token_match"], {"top_k": 1})
    assert "generate" not in m.__dict__  # unwrapped again
    # one reference + two generated decodes; the two prefixes are one sweep call (generate_prefixes)
    assert meter.calls == {"tokenize": 1, "decode": 3, "generate": 1}
    assert meter.flops["generate"] == flops.generate_flops("test-var", 3, p) + flops.generate_flops("test-var", 3, 0)
    assert meter.flops["decode"] == 3 * flops.decode_flops("test-var", 3) > 0
    assert meter.total_flops == meter.flops["tokenize"] + meter.flops["decode"] + meter.flops["generate"]
    rep = meter.report(1.0, {"flops_per_s": 1e12, "how": "test"})
    assert rep["model_flops"] == meter.total_flops and set(rep["parts"]) == {"tokenize", "decode", "generate"}


@pytest.mark.parametrize("name", ["test-var", "test-rar", "test-llamagen"])
def test_a_prefix_sweep_is_counted_as_it_runs(name):
    """The sweep's count equals the count of the real call; next-token families compute the prefix rows once,
    so the sweep costs less than a generation per prefix (VAR: exactly the sum)."""
    m = load_adapter(name, device="cpu")
    B = 2
    toks = m.tokenize(torch.rand(B, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(0)))
    y = torch.tensor([1, 4])
    prefixes = [0] + [p for p in m.prefix_choices if p > 0][:3]
    counted = flops.count(m.generate_prefixes, y, toks, prefixes, [0] * len(prefixes), top_k=1)
    assert counted == flops.generate_prefixes_flops(name, B, prefixes)
    each = sum(flops.generate_flops(name, B, prefix=p) for p in prefixes)
    assert counted == each if m.family == "var" else counted < each
