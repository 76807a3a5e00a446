"""CUDA agrees with the CPU: teacher forcing, greedy generation, UnitMem (fp32 and bf16), the attack; on CUDA the
cached attack is bit-identical to the uncached one, VAR decodes f_hat like the ids, bf16 decodes keep the demo
decisions, and the FLOP counts of the CUDA kernels equal the meta counts.

Skipped on machines without CUDA (this project's CPU CI); `python -m pytest -m gpu` on a GPU machine runs them.
The CPU results are the reference (they are the ones checked against the official code's golden tensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iarmem_core import data, extraction, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]

MODELS = ["test-var", "test-rar", "test-llamagen", "demo-var", "demo-rar"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(name: str):
    return load_adapter(name, device="cpu", seed=0), load_adapter(name, device="cuda", seed=0)


def _images(m, n: int = 8):
    ds = data.load_demo("heldout")
    return ds.images(range(n), size=m.image_size), ds.labels_tensor(range(n))


def _to(tokens, device):
    return [t.to(device) for t in tokens] if isinstance(tokens, list) else tokens.to(device)


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_logits_and_greedy_generation_match_the_cpu(name):
    cpu, gpu = _pair(name)
    x, y = _images(cpu)
    tok_c = cpu.tokenize(x)
    tok_g = gpu.tokenize(x.cuda())
    assert torch.equal(cpu.flatten(tok_c), gpu.flatten(tok_g).cpu())
    with torch.no_grad():
        lc = cpu.teacher_forced_logits(tok_c, y)
        lg = gpu.teacher_forced_logits(tok_g, y.cuda()).cpu()
    assert (lc - lg).abs().max().item() < 1e-3 * max(1.0, lc.abs().max().item())
    n_prefix = extraction.default_prefix(cpu)  # VAR: whole scales
    gc = cpu.flatten(cpu.generate(y, prefix=tok_c, n_prefix=n_prefix, top_k=1))
    gg = gpu.flatten(gpu.generate(y.cuda(), prefix=tok_g, n_prefix=n_prefix, top_k=1)).cpu()
    assert (gc == gg).float().mean().item() >= 0.98  # near-ties may flip an argmax; almost all must agree


@pytest.mark.parametrize("name", ["test-var", "demo-rar"])
def test_unitmem_on_cuda_matches_the_cpu_and_bf16_is_close(name, tmp_path):
    cpu, gpu = _pair(name)
    sel = data.select_demo(n=40, seed=0)
    cfg = unitmem.UnitMemConfig(n_augs=2, seed=0, batch_size=16)
    rc = unitmem.run_unitmem(cpu, sel, cfg, store=ResultStore(tmp_path / "c"))
    rg = unitmem.run_unitmem(gpu, sel, cfg, store=ResultStore(tmp_path / "g"))
    np.testing.assert_allclose(rg.unitmem, rc.unitmem, atol=1e-4)
    assert (rg.arrays["argmax_LGU"] == rc.arrays["argmax_LGU"]).mean() >= 0.99
    rb = unitmem.run_unitmem(
        gpu,
        sel,
        unitmem.UnitMemConfig(n_augs=2, seed=0, batch_size=16, dtype="bf16"),
        store=ResultStore(tmp_path / "b"),
    )
    assert np.corrcoef(rb.unitmem.ravel(), rc.unitmem.ravel())[0, 1] > 0.98


def test_extraction_on_cuda_counts_like_the_cpu(tmp_path):
    cpu, gpu = _pair("demo-rar")
    sel = data.select_demo(n=100, seed=0)
    cfg = extraction.ExtractionConfig(candidates_per_class=2, heldout_n=20, seed=0)
    cc = extraction.run_extraction(cpu, sel, cfg, store=ResultStore(tmp_path / "c")).count()
    cg = extraction.run_extraction(gpu, sel, cfg, store=ResultStore(tmp_path / "g")).count()
    assert abs(cc["extracted"] - cg["extracted"]) <= 1
    assert cg["heldout_false_rate"] == cc["heldout_false_rate"]


def test_cached_attack_on_cuda_is_bit_identical_to_the_uncached_one(tmp_path):
    gpu = load_adapter("demo-rar", device="cuda")
    sel = data.select_demo(n=60, seed=0)
    cfg = extraction.ExtractionConfig(candidates_per_class=1, heldout_n=10, batch_size=4, prefix_tokens=(8, 2))
    plain = extraction.run_extraction(gpu, sel, cfg, store=ResultStore(tmp_path / "p"), cache=False)
    cached = extraction.run_extraction(gpu, sel, cfg, store=ResultStore(tmp_path / "c"))
    for k, v in plain.arrays.items():
        np.testing.assert_array_equal(cached.arrays[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["test-var", "demo-var"])
def test_var_f_hat_decode_on_cuda_equals_decode_of_the_ids(name):
    m = load_adapter(name, device="cuda")
    y = torch.tensor([0, 3, 5, 9], device="cuda")
    ids, f_hat = m.generate_latent(y, cfg=2.0, top_k=0, seed=1)
    for precision in ("fp32", "bf16"):
        assert torch.equal(m.decode_latent(f_hat, precision), m.decode(ids, precision=precision))


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_bf16_decodes_on_cuda_keep_every_decision_of_the_demo_attack(name, tmp_path):
    from dataclasses import replace

    gpu = load_adapter(name, device="cuda")
    sel = data.select_demo(n=500, seed=0)
    st = ResultStore(tmp_path)
    cfg = extraction.ExtractionConfig(seed=0)
    fp = extraction.run_extraction(gpu, sel, cfg, store=st)
    bf = extraction.run_extraction(gpu, sel, replace(cfg, decode_dtype="bf16"), store=st)
    np.testing.assert_array_equal(bf.arrays["gen_tokens_RN"], fp.arrays["gen_tokens_RN"])
    for measure in fp.meta["measures"]:
        np.testing.assert_array_equal(bf.decision(similarity=measure), fp.decision(similarity=measure), measure)
    assert bf.meta["bf16_recheck"]["max_abs_diff_bf16_fp32"] < bf.meta["bf16_recheck"]["margin"] / 2


def test_flop_counts_of_cuda_kernels_equal_the_meta_counts_and_the_peak_is_measured():
    from iarmem_core import flops

    for name in ("test-var", "test-rar", "test-llamagen"):
        m = load_adapter(name, device="cuda")
        y = torch.tensor([1, 4], device="cuda")
        toks = m.tokenize(torch.rand(2, 3, m.image_size, m.image_size, device="cuda"))
        p = m.prefix_choices[2]
        assert flops.count(m.decode, toks) == flops.decode_flops(name, 2)
        assert flops.count(m.generate, y, prefix=toks, n_prefix=p, top_k=1) == flops.generate_flops(name, 2, p)
    peak = flops.measure_peak("cuda", torch.bfloat16)
    assert peak["flops_per_s"] > 1e12 and "gpu" in peak
