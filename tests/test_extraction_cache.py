"""Cached tokens and reconstructions, VAR's f_hat decode and bf16 decodes: the same answers, less work.

- The attack with the store-backed cache (`extraction.cache`) gives the table of the attack without it, bit for
  bit (every array), and a second attack over the same candidates (here: with an edit) neither tokenizes nor
  decodes a reconstruction.
- Scoring reads the stored tokens; they equal tokenizing in any other batch size (token ids are discrete).
- VAR: decoding the generation's final f_hat gives decode(ids) exactly (bitwise, fp32 and bf16).
- bf16 decodes: token ids and teacher-forced logits stay fp32-exact, and every similarity decision of the demo
  attack (demo-var, demo-rar; default prefix, shipped thresholds) equals the fp32 one (the stored result in
  assets/store), with the fp32 recheck near the thresholds.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from iarmem_core import data, extraction, hooks
from iarmem_core.adapters import load_adapter
from iarmem_core.extraction import cache
from iarmem_core.registry import ASSETS
from iarmem_core.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = ASSETS / "store"


@pytest.fixture(scope="module")
def demo_var():
    return load_adapter("demo-var", device="cpu")


def _small_cfg(m, **kw) -> extraction.ExtractionConfig:
    p = extraction.default_prefix(m)
    base = {"candidates_per_class": 1, "heldout_n": 10, "batch_size": 4, "prefix_tokens": (p, m.prefix_choices[2])}
    return extraction.ExtractionConfig(**{**base, **kw})


def _assert_same_tables(a: extraction.ExtractionResult, b: extraction.ExtractionResult) -> None:
    assert sorted(a.arrays) == sorted(b.arrays)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_cached_attack_is_bit_identical_and_a_second_attack_reuses_the_references(name, tmp_path, monkeypatch):
    m = load_adapter(name, device="cpu")
    sel = data.select_demo(n=60, seed=0)
    cfg = _small_cfg(m)
    assert set(extraction.available_measures(m, cfg, None)[0]) == {"token_match", "ssim", "feature_cosine"}
    calls = {"tokenize": 0, "decode": 0}
    real_tokenize, real_decode = type(m).tokenize, type(m).decode

    def counting_tokenize(self, x):
        calls["tokenize"] += 1
        return real_tokenize(self, x)

    def counting_decode(self, tokens, precision="fp32"):
        calls["decode"] += 1
        return real_decode(self, tokens, precision)

    monkeypatch.setattr(type(m), "tokenize", counting_tokenize)
    monkeypatch.setattr(type(m), "decode", counting_decode)
    plain = extraction.run_extraction(m, sel, cfg, store=ResultStore(tmp_path / "plain"), cache=False)
    # uncached: once per batch (10 candidates + 10 held-out in batches of 4 -> 6), shared by both prefixes;
    # plus the scoring passes (60 selected and 10 held-out images in batches of 32)
    assert calls["tokenize"] == 6 + 2 + 1
    assert plain.meta["references"]["cached"] is False

    st = ResultStore(tmp_path / "cached")
    calls["tokenize"] = 0
    cached = extraction.run_extraction(m, sel, cfg, store=st)
    assert calls["tokenize"] == 2 + 1  # only the scoring passes (stored as `tokens`); the references reuse them
    _assert_same_tables(plain, cached)
    assert len(st.list(kind=cache.TOKENS_KIND)) == 2 and len(st.list(kind=cache.REFERENCE_KIND)) == 2
    ref_meta = [st.load(k)[1] for k in cached.meta["references"]["store_keys"]]
    assert [r["tokens_from"] for r in ref_meta] == ["stored tokens of the selection"] * 2

    # a second attack over the same candidates (an edit, as before/after/random draws): nothing is tokenized or
    # decoded for the references, and the result is the uncached one again
    edit = hooks.UnitEdit({0: tuple(range(0, m.n_units, 3))}, factor=0.0, op="zero")
    plain_edit = extraction.run_extraction(m, sel, cfg, store=ResultStore(tmp_path / "plain"), edit=edit, cache=False)

    calls.update(tokenize=0, decode=0)
    cached_edit = extraction.run_extraction(m, sel, cfg, store=st, edit=edit)
    _assert_same_tables(plain_edit, cached_edit)
    # no reference decode: VAR decodes its generations from f_hat (decode_latent), RAR from the generated ids
    assert calls == {"tokenize": 0, "decode": 0 if m.family == "var" else 6 * 2}
    assert cached_edit.meta["references"]["store_keys"] == cached.meta["references"]["store_keys"]
    assert len(st.list(kind=cache.REFERENCE_KIND)) == 2
    assert not np.array_equal(cached_edit.arrays["gen_tokens_RN"], cached.arrays["gen_tokens_RN"])  # it did edit


def test_scoring_stores_the_tokens_and_they_do_not_depend_on_the_batch(demo_var, tmp_path):
    m = demo_var
    sel = data.select_demo(n=40, seed=0)
    st = ResultStore(tmp_path)
    acc, meta = extraction.memorization_scores(m, sel, store=st, batch_size=16)
    toks = cache.stored_tokens(m, sel, st)
    assert toks is not None and toks.shape == (40, m.n_tokens)
    for b in (1, 7):
        inline = np.concatenate([m.flatten(m.tokenize(x)).numpy() for _, x, _ in sel.iter_batches(b, m.image_size)])
        np.testing.assert_array_equal(inline, toks)
    # the scores are those of tokenizing inline: teacher-forced accuracy of the stored ids
    logits = m.teacher_forced_logits(m.unflatten(torch.from_numpy(toks.astype(np.int64))), sel.labels_tensor())
    correct = (logits.argmax(-1).numpy() == toks).astype(np.float32)
    np.testing.assert_array_equal(acc, extraction.accuracies_from_correct(correct, m))
    # the key follows the tokenizer, not the transformer: another model with this tokenizer shares the entry
    other = load_adapter("demo-var", device="cpu")
    other.identity = {**other.identity, "transformer": "another.safetensors:0"}
    assert cache.tokens_key(other, sel, st) == cache.tokens_key(m, sel, st)
    marked = load_adapter("demo-var", device="cpu")
    marked.identity = {**marked.identity, "memorized": "32x"}  # a subclass changing tokenize marks its identity
    assert cache.tokens_key(marked, sel, st) != cache.tokens_key(m, sel, st)


@pytest.mark.parametrize("name", ["test-var", "demo-var"])
def test_var_decodes_its_generations_final_f_hat_exactly_as_the_ids(name):
    m = load_adapter(name, device="cpu")
    x = data.load_demo("heldout").images(range(4), size=m.image_size)
    y = torch.tensor([0, 3, 5, 9])
    tok = m.tokenize(x)
    for kw in ({}, {"prefix": tok, "n_prefix": m.prefix_choices[2]}, {"cfg": 2.0, "top_k": 0, "seed": 3}):
        ids, f_hat = m.generate_latent(y, **kw)
        assert f_hat.shape == (4, m.tokenizer.Cvae, m.patch_nums[-1], m.patch_nums[-1])
        assert torch.equal(m.flatten(ids), m.flatten(m.generate(y, **kw)))
        for precision in ("fp32", "bf16"):
            assert torch.equal(m.decode_latent(f_hat, precision), m.decode(ids, precision=precision)), (kw, precision)
    with pytest.raises(ValueError, match="f_hat"):
        m.decode_latent(m.flatten(tok))


@pytest.mark.parametrize("name", ["demo-var", "demo-rar"])
def test_bf16_decodes_keep_tokens_logits_and_every_decision_of_the_demo_attack(name, tmp_path):
    m = load_adapter(name, device="cpu")
    ds = data.load_demo("heldout")
    x, y = ds.images(range(8), size=m.image_size), ds.labels_tensor(range(8))
    tok0 = m.flatten(m.tokenize(x))
    logits0 = m.teacher_forced_logits(m.unflatten(tok0), y)
    img32, img16 = m.decode(m.unflatten(tok0)), m.decode(m.unflatten(tok0), precision="bf16")
    assert img16.dtype == torch.float32 and 0 < (img16 - img32).abs().max() < 0.1  # it ran in bf16
    assert all(p.dtype == torch.float32 for p in [*m.tokenizer.parameters(), *m.transformer.parameters()])
    assert torch.equal(m.flatten(m.tokenize(x)), tok0)  # token ids and logits: fp32, bit for bit
    assert torch.equal(m.teacher_forced_logits(m.unflatten(tok0), y), logits0)

    # the demo attack (default config and prefix, shipped thresholds) in bf16 vs its stored fp32 result
    sel = data.select_demo(n=500, seed=0)
    cfg = extraction.ExtractionConfig(seed=0)
    shipped = ResultStore(SHIPPED, read_only=True)
    ref = extraction.load_extraction(shipped, extraction.extraction_key(m, sel, cfg, store=shipped))
    shutil.copytree(SHIPPED, tmp_path / "s")  # its UnitMem pass gives the scores
    st = ResultStore(tmp_path / "s")
    bf = extraction.run_extraction(m, sel, replace(cfg, decode_dtype="bf16"), store=st)
    assert bf.meta["store_key"] != ref.meta["store_key"] and bf.meta["generation"]["decode_dtype"] == "bf16"
    for k in ("gen_tokens_RN", "true_tokens_RN", "image_id", "prefix_tokens"):
        np.testing.assert_array_equal(bf.arrays[k], ref.arrays[k], err_msg=k)
    for measure in ref.meta["measures"]:
        np.testing.assert_allclose(bf.arrays[f"sim_{measure}"], ref.arrays[f"sim_{measure}"], atol=0.01, rtol=0)
        np.testing.assert_array_equal(bf.decision(similarity=measure), ref.decision(similarity=measure), measure)
        assert bf.count(similarity=measure) == ref.count(similarity=measure)
    rc = bf.meta["bf16_recheck"]
    assert rc["rows_rescored_fp32"] > 0 and rc["max_abs_diff_bf16_fp32"] < rc["margin"] / 2


def test_the_attack_runs_in_inference_mode_without_leaving_inference_tensors_behind(demo_var):
    m = demo_var
    x = data.load_demo("heldout").images(range(2), size=m.image_size)
    true_BN, recon, results = extraction.attack_batch(
        m, x, torch.tensor([0, 1]), [extraction.default_prefix(m)], ["token_match", "feature_cosine"], {"top_k": 1}
    )
    assert recon.is_inference() and results[0][1].is_inference()
    space = extraction.measures.demo_space()
    tensors = [*m.tokenizer.parameters(), *m.transformer.parameters(), *m.transformer.buffers()]
    assert not any(t.is_inference() for t in [*tensors, *space.net.parameters()])
    w = m.transformer.head.weight.detach().clone().requires_grad_(True)  # autograd still works afterwards
    (w * 2).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0))
