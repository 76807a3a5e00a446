"""VAR generation: KV cache == teacher forcing, prefixes, CFG ramp, no-cache path, sampling, hooks, edits."""

from __future__ import annotations

import pytest
import torch

from iarmem_core import hooks
from iarmem_core.adapters import load_adapter
from iarmem_core.models import hook_points
from iarmem_core.models.var import sample_with_top_k_top_p_

LABELS = torch.tensor([1, 5, 9])


@pytest.fixture(scope="module", params=["test-var", "test-var-shared-aln"])
def model(request):
    return load_adapter(request.param, device="cpu", seed=3)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(11))


def _ramp(m, cfg):
    """t per flat token: cfg * si / (S-1) over the scales, [1, N, 1]."""
    S = len(m.token_grids)
    t = torch.cat([torch.full((s.stop - s.start,), cfg * si / (S - 1)) for si, s in enumerate(m.scale_slices)])
    return t[None, :, None]


def _mixed_teacher_logits(m, toks, labels, cfg):
    cond = m.teacher_forced_logits(toks, labels)
    if cfg == 0:
        return cond
    uncond = m.teacher_forced_logits(toks, torch.full_like(labels, m.num_classes))
    t = _ramp(m, cfg)
    return (1 + t) * cond - t * uncond


@pytest.mark.parametrize("cfg", [0.0, 2.5])
@pytest.mark.parametrize("n_prefix", [0, 1, 5])
def test_kv_generation_equals_teacher_forcing(model, images, cfg, n_prefix):
    m = model
    prefix = m.tokenize(images)
    seen = []
    with hooks.capture(m.transformer, lambda b, a, info: None):  # hooks active must not change anything
        toks = m.generate(LABELS, prefix=prefix, n_prefix=n_prefix, cfg=cfg, top_k=1)
    flat, flat_prefix = m.flatten(toks), m.flatten(prefix)
    assert torch.equal(flat[:, :n_prefix], flat_prefix[:, :n_prefix])
    logits = _mixed_teacher_logits(m, toks, LABELS, cfg)
    # every generated token is the argmax of the teacher-forced (CFG-mixed) logits on the generated tokens
    assert torch.equal(logits.argmax(-1)[:, n_prefix:], flat[:, n_prefix:])
    # and the logits the generation saw are the teacher-forced ones
    S = len(m.token_grids)
    P = 0 if n_prefix == 0 else [s.stop for s in m.scale_slices].index(n_prefix) + 1
    m.transformer.generate(
        m.tokenizer,
        LABELS,
        cfg=cfg,
        top_k=1,
        prefix_idx_Bl=prefix[:P],
        on_logits=lambda si, lg: seen.append((si, lg.clone())),
    )
    assert [si for si, _ in seen] == list(range(P, S))
    for si, lg in seen:
        torch.testing.assert_close(lg, logits[:, m.scale_slices[si]], atol=2e-5, rtol=1e-5)
    # non-degenerate: the last scale uses several distinct tokens
    assert toks[-1].unique().numel() > 3


def test_top_k_top_p_semantics():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 drops the tokens whose ascending cumulative
    # probability is <= 0.3, i.e. 0.05 and 0.15 (0.05 + 0.15 = 0.2), and keeps 0.3 and 0.5
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(1, 400, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_with_top_k_top_p_(logits.clone(), top_p=0.7, rng=g)
    assert set(ids.unique().tolist()) == {0, 1}
    assert abs((ids == 0).float().mean().item() - 0.5 / 0.8) < 0.07
    ids = sample_with_top_k_top_p_(logits.clone(), top_k=3, rng=g)
    assert set(ids.unique().tolist()) == {0, 1, 2}
    # a top_p below the largest probability keeps only the largest
    ids = sample_with_top_k_top_p_(logits.clone(), top_p=0.2, rng=g)
    assert set(ids.unique().tolist()) == {0}


def test_temperature_and_top_k_restrict_to_the_top_tokens(model):
    m = model
    toks = m.generate(LABELS, top_k=2, temperature=0.5, seed=0)
    logits = m.teacher_forced_logits(toks, LABELS)
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == m.flatten(toks)[..., None]).any(-1).all()


def test_prefix_must_be_whole_scales(model, images):
    with pytest.raises(ValueError, match="whole scales"):
        model.generate(LABELS, prefix=model.tokenize(images), n_prefix=3)


# ---------------------------------------------------------------------------------------------------
# hooks and edits
def test_hooks_see_each_scale_and_the_cfg_batch(model, images):
    m = model
    calls = []

    def rec(block, acts, info):
        calls.append((block, acts.shape, info.target_index.tolist(), info.cfg_doubled, info.mode))

    n_units = m.n_units
    B = LABELS.shape[0]
    ranges = [list(range(s.start, s.stop)) for s in m.scale_slices]
    with hooks.capture(m.transformer, rec, names="blocks.0.mlp.hook_post"):
        m.generate(LABELS, cfg=1.5, top_k=1)
    assert [c[2] for c in calls] == ranges
    assert all(c[0] == 0 and c[1] == (2 * B, len(c[2]), n_units) and c[3] and c[4] == "generate" for c in calls)

    calls.clear()
    with hooks.capture(m.transformer, rec, names=hooks.PRE):
        m.generate(LABELS, prefix=m.tokenize(images), n_prefix=5, cfg=0.0, top_k=1)
    per_block = [[c[2] for c in calls if c[0] == b] for b in range(m.n_blocks)]
    # the prefill covers the prefix rows and the first generated scale; then one call per scale
    assert all(p == [list(range(0, m.scale_slices[2].stop))] + ranges[3:] for p in per_block)
    assert all(c[1][0] == B and not c[3] for c in calls)

    calls.clear()
    with hooks.capture(m.transformer, rec, names="blocks.1.mlp.hook_post"):
        m.generate(LABELS, cfg=0.0, top_k=1, kv_cache=False)
    assert [c[2] for c in calls] == [list(range(s.stop)) for s in m.scale_slices]

    calls.clear()
    with hooks.capture(m.transformer, rec, names="blocks.1.mlp.hook_post"):
        m.teacher_forced_logits(m.tokenize(images), LABELS)
    assert [(c[2], c[4]) for c in calls] == [(list(range(m.n_tokens)), "teacher")]


def test_hook_names_and_unit_sites(model):
    m = model
    names = sorted(hook_points.hook_points(m.transformer))
    assert names == sorted(f"blocks.{i}.mlp.hook_{k}" for i in range(m.n_blocks) for k in ("pre", "post"))
    paths = {n for n, mod in m.transformer.named_modules() if isinstance(mod, hook_points.HookPoint)}
    assert paths == {f"blocks.{i}.ffn.hook_{k}" for i in range(m.n_blocks) for k in ("pre", "post")}
    sites = m.unit_sites()
    assert [(s.block, s.module, s.n_units, s.hook) for s in sites] == [
        (i, f"blocks.{i}.ffn", 256, f"blocks.{i}.mlp.hook_post") for i in range(m.n_blocks)
    ]
    assert not any("hook" in k for k in m.transformer.state_dict())
    groups = m.position_groups()
    assert [g.name for g in groups] == ["1x1", "2x2", "3x3", "4x4"] and groups[2].index.tolist() == list(range(5, 14))


def test_label_dropout_only_in_train_mode(model, images):
    m = model
    x = m.tokenizer.quantize.idxBl_to_var_input(m.tokenize(images))
    var = m.transformer
    a = var(LABELS, x)
    old = var.cond_drop_rate
    try:
        var.cond_drop_rate = 1.0  # every label -> null class in train mode
        assert torch.equal(var(LABELS, x), a)  # eval mode: no dropout
        var.train()
        null = torch.full_like(LABELS, var.num_classes)
        torch.testing.assert_close(var(LABELS, x), var.eval()(null, x))
    finally:
        var.cond_drop_rate = old
        var.eval()


@pytest.mark.parametrize("shared_aln", [False, True])
def test_teacher_forcing_is_differentiable(shared_aln):
    from iarmem_core.adapters.var import VARAdapter
    from iarmem_core.models.var import VAR

    torch.manual_seed(0)
    var = VAR(
        vocab_size=32,
        Cvae=4,
        num_classes=3,
        depth=2,
        embed_dim=32,
        num_heads=2,
        patch_nums=(1, 2),
        attn_l2_norm=True,
        shared_aln=shared_aln,
        cond_drop_rate=0.0,
    )
    VARAdapter.random_init(var)
    x_BLCv = torch.randn(2, 4, 4, requires_grad=True)
    logits = var.train()(torch.tensor([0, 2]), x_BLCv)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 32, (10,)))
    loss.backward()
    no_grad = [n for n, p in var.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [] and x_BLCv.grad.abs().sum() > 0
