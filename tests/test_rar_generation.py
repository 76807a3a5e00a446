"""RAR generation, hooks and edits on the tiny random test-rar: invariants that need no golden data."""

from __future__ import annotations

import pytest
import torch

from iarmem_core import hooks
from iarmem_core.adapters import load_adapter
from iarmem_core.models.rar import guidance_schedule, sample_logits


@pytest.fixture(scope="module")
def m():
    return load_adapter("test-rar", device="cpu", seed=0)


LABELS = torch.tensor([0, 9, -1])  # -1: the null class


def _mixed_tf_logits(m, ids, labels, cfg, power):
    """Teacher-forced logits of the generated tokens, mixed with the CFG schedule per position: [B, N, V]."""
    cond = m.teacher_forced_logits(ids, labels)
    if cfg == 0:
        return cond
    uncond = m.teacher_forced_logits(ids, torch.full_like(labels, -1))
    scale = torch.tensor([guidance_schedule(n, m.n_tokens, cfg, power) for n in range(m.n_tokens)])
    return uncond + (cond - uncond) * scale[None, :, None]


@pytest.mark.parametrize("cfg,power,n_prefix", [(0.0, 0.0, 0), (4.0, 1.5, 0), (16.0, 2.75, 11), (0.0, 0.0, 35)])
def test_kv_generation_equals_teacher_forcing(m, cfg, power, n_prefix):
    prefix = torch.randint(0, m.vocab_size, (3, m.n_tokens), generator=torch.Generator().manual_seed(1))
    ids, info = m.transformer.generate(
        LABELS,
        guidance_scale=cfg,
        guidance_scale_pow=power,
        top_k=1,
        prefix_BP=prefix[:, :n_prefix] if n_prefix else None,
        return_logits=True,
    )
    assert torch.equal(ids[:, :n_prefix], prefix[:, :n_prefix])
    steps = slice(n_prefix, None)
    tf_cond = m.teacher_forced_logits(ids, LABELS)
    torch.testing.assert_close(info["cond"], tf_cond[:, steps], atol=1e-4, rtol=1e-4)
    if cfg:
        tf_uncond = m.teacher_forced_logits(ids, torch.full_like(LABELS, -1))
        torch.testing.assert_close(info["uncond"], tf_uncond[:, steps], atol=1e-4, rtol=1e-4)
    else:
        assert info["uncond"] is None
    mixed = _mixed_tf_logits(m, ids, LABELS, cfg, power)[:, steps]
    top2 = mixed.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3  # skip float near-ties
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[:, steps][clear], mixed.argmax(-1)[clear])
    # the adapter gives the same tokens
    same = m.generate(LABELS, prefix=prefix, n_prefix=n_prefix, cfg=cfg, cfg_power=power, top_k=1)
    assert torch.equal(same, ids)


def test_sample_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(5):
        s = sample_logits(logits, temperature=5.0, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()
    assert torch.equal(sample_logits(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    # top_p smaller than the top token's mass keeps only that token
    peaked = logits.clone()
    peaked[torch.arange(64), logits.argmax(-1)] += 10
    assert torch.equal(sample_logits(peaked, top_p=0.5, generator=g), logits.argmax(-1))
    # nucleus 0.9 keeps the smallest prefix of the sorted distribution with mass >= 0.9
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = torch.stack([sample_logits(probs.log(), top_p=0.9, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_guidance_schedule_known_values():
    assert guidance_schedule(0, 256, 16.0, 2.75) == 1.0
    assert guidance_schedule(128, 256, 8.0, 1.0) == pytest.approx(4.5)  # half way on the cosine: (g + 1) / 2
    assert guidance_schedule(256, 256, 6.9, 1.5) == pytest.approx(6.9)
    assert all(guidance_schedule(s, 36, 4.0, 0.0) == 4.0 for s in range(36))  # power 0: constant


def test_hooks_see_each_generation_call(m):
    calls = []

    def rec(block, acts, info):
        if block == 0:
            calls.append((info.target_index.tolist(), acts.shape[0], acts.shape[1], info.cfg_doubled, info.mode))

    with hooks.capture(m.transformer, rec):
        m.generate(LABELS[:2], cfg=3.0, top_k=1)
    N = m.n_tokens
    assert len(calls) == N
    assert calls[0] == ([-1, 0], 4, 2, True, "generate")  # [cls, cond]; batch [cond; uncond]
    assert [c[0] for c in calls[1:]] == [[k] for k in range(1, N)]
    assert all(c[1:] == (4, 1, True, "generate") for c in calls[1:])

    calls.clear()
    with hooks.capture(m.transformer, rec):
        m.generate(LABELS[:2], prefix=torch.zeros(2, N, dtype=torch.long), n_prefix=5, top_k=1)
    assert calls[0] == ([-1, 0, 1, 2, 3, 4, 5], 2, 7, False, "generate")  # prefill [cls, cond, tok_0..tok_4]
    assert [c[0] for c in calls[1:]] == [[k] for k in range(6, N)]

    calls.clear()
    with hooks.capture(m.transformer, rec):
        m.generate(LABELS[:2], top_k=1, kv_cache=False)
    assert [c[0] for c in calls] == [[-1] + list(range(k + 1)) for k in range(N)]

    calls.clear()
    with hooks.capture(m.transformer, rec):
        m.teacher_forced_logits(torch.zeros(2, N, dtype=torch.long), LABELS[:2])
    assert calls == [([-1] + list(range(N)) + [-1], 2, N + 2, False, "teacher")]


def test_unit_hooks_are_gelu_of_fc1(m):
    toks = torch.randint(0, m.vocab_size, (2, m.n_tokens), generator=torch.Generator().manual_seed(3))
    got = {}
    with (
        hooks.capture(m.transformer, lambda b, a, i: got.setdefault(("post", b), a.clone())),
        hooks.capture(m.transformer, lambda b, a, i: got.setdefault(("pre", b), a.clone()), names=hooks.PRE),
    ):
        m.teacher_forced_logits(toks, LABELS[:2])
    for b in range(m.n_blocks):
        torch.testing.assert_close(got[("post", b)], torch.nn.functional.gelu(got[("pre", b)]))
        assert got[("post", b)].shape == (2, m.n_tokens + 2, m.n_units)
    assert [(s.block, s.module, s.n_units, s.hook) for s in m.unit_sites()] == [
        (b, f"blocks.{b}.mlp", 256, f"blocks.{b}.mlp.hook_post") for b in range(2)
    ]
    assert m.token_grids == [(6, 6)] and m.vocab_size == 128 and m.n_tokens == 36


def test_argument_errors(m):
    with pytest.raises(ValueError, match="prefix"):
        m.generate(LABELS, n_prefix=4)  # no prefix tokens given
    with pytest.raises(ValueError, match=r"prefix must be in \[0, 35\]"):
        m.generate(LABELS, prefix=torch.zeros(3, 36, dtype=torch.long), n_prefix=36)
    with pytest.raises(TypeError, match="cfg_power"):
        m.generate(LABELS, guidance_pow=2.0)
    with pytest.raises(ValueError, match=r"tokens \[B, 36\]"):
        m.teacher_forced_logits(torch.zeros(3, 35, dtype=torch.long), LABELS)
    with pytest.raises(ValueError, match="permutation"):
        m.permuted_logits(torch.zeros(3, 36, dtype=torch.long), LABELS, torch.zeros(3, 36, dtype=torch.long))
