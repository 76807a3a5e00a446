"""The adapter contract, once, for every family: parametrised over the registry's tiny test configs (as timm's
model tests are). Family-specific behaviour (official goldens, guidance schedules, samplers) stays in
tests/test_{var,rar,llamagen}*.py."""

from __future__ import annotations

import copy

import pytest
import torch

from iarmem_core import hooks
from iarmem_core.adapters import load_adapter
from iarmem_core.registry import list_models

CONFIGS = ["test-var", "test-rar", "test-llamagen"]
FC1 = {"var": "fc1", "rar": "fc1", "llamagen": "w1"}  # the projection whose rows make the units (METHOD.md 1)


def test_every_family_has_a_test_config():
    fams = {load_adapter(n, device="cpu").family for n in CONFIGS}
    assert fams == {"var", "rar", "llamagen"} and set(CONFIGS) <= set(list_models(kind="test"))


@pytest.fixture(scope="module", params=CONFIGS)
def m(request):
    return load_adapter(request.param, device="cpu", seed=3)


def _images(m, n=3, seed=0):
    return torch.rand(n, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(seed))


def _labels(m, n=3):
    return torch.arange(n) % m.num_classes


def _prefix_len(m) -> int:
    return [p for p in m.prefix_choices if p > 0][0]


def test_layout_tokens_and_groups(m):
    x = _images(m)
    toks = m.tokenize(x)
    flat = m.flatten(toks)
    assert flat.shape == (3, m.n_tokens) and flat.dtype == torch.long
    assert 0 <= int(flat.min()) and int(flat.max()) < m.vocab_size
    assert torch.equal(m.flatten(m.unflatten(flat)), flat)
    img = m.decode(toks)
    assert img.shape == (3, 3, m.image_size, m.image_size) and 0 <= float(img.min()) and float(img.max()) <= 1
    logits = m.teacher_forced_logits(toks, _labels(m))
    assert logits.shape == (3, m.n_tokens, m.vocab_size)
    assert torch.equal(logits, m.teacher_forced_logits(toks, _labels(m)))  # deterministic: no dropout
    # the scale groups partition the flat tokens; rows and positions refine them
    for kinds in (("scale",), ("row",), ("position",)):
        cover = torch.cat([g.index for g in m.position_groups(kinds=kinds)])
        if kinds == ("scale",) or len(m.token_grids) == 1 or kinds == ("position",):
            assert torch.equal(cover.sort().values, torch.arange(m.n_tokens))
    sites = m.unit_sites()
    assert [s.hook for s in sites] == [f"blocks.{s.block}.mlp.hook_post" for s in sites]
    assert all(s.n_units == m.n_units for s in sites)


def test_kv_cache_and_recompute_give_the_same_tokens(m):
    x, lab = _images(m), _labels(m)
    prefix, p = m.tokenize(x), _prefix_len(m)
    for kw in (dict(top_k=1), dict(top_k=1, n_prefix=p, prefix=prefix), dict(top_k=5, top_p=0.9, seed=4)):
        a = m.generate(lab, kv_cache=True, **kw)
        b = m.generate(lab, kv_cache=False, **kw)
        assert torch.equal(m.flatten(a), m.flatten(b)), kw
    g = m.flatten(m.generate(lab, top_k=1, n_prefix=p, prefix=prefix))
    assert torch.equal(g[:, :p], m.flatten(prefix)[:, :p])  # the prefix is copied


def test_seed_controls_sampling_and_greedy_ignores_it(m):
    lab = _labels(m)
    a = m.flatten(m.generate(lab, top_k=0, temperature=1.0, seed=7))
    assert torch.equal(a, m.flatten(m.generate(lab, top_k=0, temperature=1.0, seed=7)))
    assert not torch.equal(a, m.flatten(m.generate(lab, top_k=0, temperature=1.0, seed=8)))
    assert torch.equal(m.flatten(m.generate(lab, top_k=1, seed=1)), m.flatten(m.generate(lab, top_k=1, seed=99)))


def test_hooks_see_every_generated_token_once(m):
    lab = _labels(m)
    seen: dict[int, list[torch.Tensor]] = {}

    def rec(block, acts, info):
        assert info is not None and acts.shape[-1] == m.n_units and not info.cfg_doubled
        seen.setdefault(block, []).append(info.target_index.clone())

    with hooks.capture(m.transformer, rec):
        m.generate(lab, top_k=1)
    for block, tis in seen.items():
        t = torch.cat(tis)
        t = t[t >= 0]
        assert torch.equal(t.sort().values, torch.arange(m.n_tokens)), block
    doubled = []
    with hooks.capture(m.transformer, lambda b, a, info: doubled.append((info.cfg_doubled, a.shape[0]))):
        m.generate(lab, top_k=1, cfg=2.0)
    assert doubled and all(d and n == 2 * len(lab) for d, n in doubled)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(m):
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    a = load_adapter(m.spec.name, device="cpu", seed=0)
    assert torch.equal(torch.rand(4), want)  # loading drew nothing from the caller's generator
    b, c = (load_adapter(m.spec.name, device="cpu", seed=s) for s in (0, 1))
    sa, sb, sc = (x.transformer.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_edit_equals_the_weight_edit_is_undone_and_never_touches_the_weights(m):
    toks, lab = m.tokenize(_images(m)), _labels(m)
    site = m.unit_sites()[-1]
    units = tuple(range(0, m.n_units, 3))
    spec = hooks.UnitEdit(units={site.block: units}, op="fc1_scale", factor=0.5)
    sd_before = {k: v.clone() for k, v in m.transformer.state_dict().items()}
    base = m.teacher_forced_logits(toks, lab)
    base_ids = m.flatten(m.generate(lab, top_k=1))
    with hooks.edit(m.transformer, spec):
        edited = m.teacher_forced_logits(toks, lab)
        edited_ids = m.flatten(m.generate(lab, top_k=1))
    assert (edited - base).abs().max() > 1e-3
    # equals scaling the rows of the unit projection (biases unchanged) in a copy of the model
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.transformer.get_submodule(f"{site.module}.{FC1[m.family]}").weight[list(units)] *= 0.5
    torch.testing.assert_close(ref.teacher_forced_logits(toks, lab), edited, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref.flatten(ref.generate(lab, top_k=1)), edited_ids)
    # undone on exit, also after an exception inside; the shared weights were never written
    assert torch.equal(m.teacher_forced_logits(toks, lab), base)
    with pytest.raises(RuntimeError, match="boom"), hooks.edit(m.transformer, spec):
        raise RuntimeError("boom")
    assert torch.equal(m.flatten(m.generate(lab, top_k=1)), base_ids)
    sd_after = m.transformer.state_dict()
    assert all(torch.equal(sd_before[k], sd_after[k]) for k in sd_before)
    # zero and out_scale: zeroing a unit's output equals scaling it by 0
    z = hooks.UnitEdit(units={site.block: units}, op="zero")
    o = hooks.UnitEdit(units={site.block: units}, op="out_scale", factor=0.0)
    with hooks.edit(m.transformer, z):
        lz = m.teacher_forced_logits(toks, lab)
    with hooks.edit(m.transformer, o):
        lo = m.teacher_forced_logits(toks, lab)
    torch.testing.assert_close(lz, lo, atol=0, rtol=0)


def test_prefix_needs_its_tokens(m):
    with pytest.raises(ValueError, match="prefix"):
        m.generate(_labels(m), n_prefix=_prefix_len(m))


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_a_prefix_sweep_equals_one_generation_per_prefix(m, cfg):
    """generate_prefixes (next-token families: one shared prefill of the longest prefix, truncated per prefix)
    gives each prefix the tokens of its own generate call: greedy, with and without CFG, and sampling with the
    prefix's seed; the KV-cache-off path and a single prefix take the plain route."""
    x = _images(m)
    toks, labels = m.tokenize(x), _labels(m)
    prefixes = [0] + [p for p in m.prefix_choices if p > 0][:3]
    seeds = [10 + p for p in prefixes]
    for kw in ({"top_k": 1}, {"top_k": 5, "temperature": 1.0}):
        got = m.generate_prefixes(labels, toks, prefixes, seeds, cfg=cfg, **kw)
        assert len(got) == len(prefixes)
        for p, s, (g, _) in zip(prefixes, seeds, got):
            want = m.generate(labels, prefix=toks if p else None, n_prefix=p, seed=s, cfg=cfg, **kw)
            assert torch.equal(m.flatten(g), m.flatten(want)), (p, kw)
            assert torch.equal(m.flatten(g)[:, :p], m.flatten(toks)[:, :p])


def test_a_shared_prefill_longer_than_the_prefix_is_refused():
    """A cache that already holds rows past the prefix (a wrong truncation) is an error, not a silent mix."""
    from iarmem_core.models import llamagen as gpt_lib

    for name in ("test-rar", "test-llamagen"):
        m = load_adapter(name, device="cpu")
        flat = m.flatten(m.tokenize(_images(m)))
        labels = _labels(m)
        with torch.no_grad():
            if m.family == "rar":
                shared = m.transformer.prefill(labels, flat[:, :8])
                with pytest.raises(ValueError, match="given cache"):
                    m.transformer.generate(labels, top_k=1, prefix_BP=flat[:, :4], cache=shared)
                with pytest.raises(ValueError, match="cannot keep"):
                    shared.truncated(shared.length + 1)
            else:
                shared = gpt_lib.prefill(m.transformer, labels, flat[:, :8])
                with pytest.raises(ValueError, match="given cache"):
                    gpt_lib.generate(m.transformer, labels, prefix_BP=flat[:, :4], greedy=True, cache=shared)
