"""UnitMem: known answers on a constructed model, streaming == brute force, resume == uninterrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from iarmem_core import data, jobs, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.adapters.base import IARAdapter, UnitSite
from iarmem_core.models import hook_points
from iarmem_core.registry import ModelSpec
from iarmem_core.store import ResultStore


# ---------------------------------------------------------------------------------------------------
# A constructed IAR whose units have known UnitMem: unit j fires only for images whose id token is j,
# unit 16 fires equally for every image, unit 17 never fires.
class _KnownMLP(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.fc1 = nn.Linear(vocab, vocab + 2)
        self.hook_pre = hook_points.HookPoint()
        self.act = nn.GELU()
        self.hook_post = hook_points.HookPoint()
        self.fc2 = nn.Linear(vocab + 2, vocab)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc1.weight[:vocab, :vocab] = 5.0 * torch.eye(vocab)
            self.fc1.bias[vocab] = 1.0  # constant unit
            self.fc1.bias[vocab + 1] = -50.0  # dead unit (GELU(-50) == 0)
            self.fc2.weight.copy_(torch.cat([torch.eye(vocab), torch.zeros(vocab, 2)], 1))
            self.fc2.bias.zero_()
        self.hook_pre.set_bias_source(self.fc1)

    def forward(self, x):
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x)))))


class _KnownTransformer(nn.Module):
    def __init__(self, vocab: int, n_tokens: int):
        super().__init__()
        self.vocab, self.n_tokens = vocab, n_tokens
        self.blocks = nn.ModuleList([nn.ModuleDict({"mlp": _KnownMLP(vocab)})])
        hook_points.bind_hook_points(self, lambda p: (int(p.split(".")[1]), p.rsplit("_", 1)[1]))

    def forward(self, tokens_BN):
        x = nn.functional.one_hot(tokens_BN, self.vocab).float()
        with hook_points.call_scope(torch.arange(self.n_tokens)):
            return self.blocks[0]["mlp"](x)


class KnownAdapter(IARAdapter):
    family = "toy"

    def __init__(self, n_ids: int = 16):
        spec = ModelSpec(
            name="known",
            family="var",
            image_size=8,
            num_classes=10,
            tokenizer={},
            transformer={},
            train_augmentation="none",
        )
        super().__init__(spec, nn.Identity(), _KnownTransformer(n_ids, 4), torch.device("cpu"))
        self.n_ids = n_ids

    @classmethod
    def build_tokenizer(cls, spec):
        return nn.Identity()

    @classmethod
    def build_transformer(cls, spec):
        raise NotImplementedError

    token_grids = property(lambda self: [(2, 2)])
    vocab_size = property(lambda self: self.n_ids)

    def tokenize(self, images_B3HW):  # the top-left pixel encodes the image id
        ids = (images_B3HW[:, 0, 0, 0] * (self.n_ids - 1)).round().long()
        return ids[:, None].expand(-1, 4).contiguous()

    def decode(self, tokens):
        return tokens.float()[:, None, :1, None].expand(-1, 3, 8, 8) / (self.n_ids - 1)

    def teacher_forced_logits(self, tokens, labels):
        return self.transformer(tokens)

    def generate(self, labels, **kw):
        raise NotImplementedError

    def unit_sites(self):
        return [UnitSite(0, "blocks.0.mlp", self.n_ids + 2, "blocks.0.mlp.hook_post")]


def _known_images(ids):
    x = torch.zeros(len(ids), 3, 8, 8)
    x[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float) / 15
    return x


def _run_pass(adapter, images, labels, cfg, batch=5):
    p = unitmem.UnitMemPass(adapter, len(images), cfg)
    for s in range(0, len(images), batch):
        e = min(len(images), s + batch)
        p.step(images[s:e], labels[s:e], keys=list(range(s, e)))
    return p, p.finish()


@pytest.mark.parametrize("rest", ["mean", "median"])
def test_known_answers(rest):
    ad = KnownAdapter()
    ids = [3, 7, 3, 11, 0, 5]  # image 1 is the only one with id 7; id 3 appears twice
    cfg = unitmem.UnitMemConfig(n_augs=2, augmentation="none", rest=rest, top_images=3)
    _, out = _run_pass(ad, _known_images(ids), torch.zeros(6, dtype=torch.long), cfg, batch=4)
    um, arg = out["unitmem_LGU"][0, 0], out["argmax_LGU"][0, 0]  # block 0, the one group
    assert um[7] == pytest.approx(1.0) and arg[7] == 1  # fires only for image 1
    assert um[11] == pytest.approx(1.0) and arg[11] == 3
    assert um[16] == pytest.approx(0.0, abs=1e-6)  # fires equally for all images
    assert um[17] == 0.0  # never fires: defined as 0
    # id 3 appears in images 0 and 2: the max is one of them, the rest includes the other
    g = float(torch.nn.functional.gelu(torch.tensor(5.0)))
    rest_val = g / 5 if rest == "mean" else 0.0  # (sum - max) / (N - 1) = g / 5; the median of the rest is 0
    assert out["mu_max_LGU"][0, 0, 3] == pytest.approx(g, rel=1e-5)
    assert out["mu_rest_LGU"][0, 0, 3] == pytest.approx(rest_val, abs=1e-6)
    # the top images of unit 3 are the two images with id 3
    assert set(out["top_images_LKSU"][0, :2, 0, 3].tolist()) == {0, 2}


def test_per_image_score_from_the_unaugmented_view():
    ad = KnownAdapter()
    cfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none")
    _, out = _run_pass(ad, _known_images([2, 9, 4]), torch.zeros(3, dtype=torch.long), cfg)
    # the constructed model predicts each image's id token everywhere: all correct
    assert out["correct_NT"].tolist() == [[1] * 4] * 3
    scores = unitmem.per_image_scores(out["correct_NT"], [slice(0, 1), slice(1, 4)])
    assert scores.shape == (3, 2) and np.all(scores == 1)


def _brute_force_mu(adapter, images, labels, ids, cfg, plan):
    """Per-image mu [N, L, G, U] computed by a separate path: plain forward hooks on the GELU modules."""
    views = data.augment_views(images, cfg.augmentation, cfg.n_augs - 1, cfg.seed, ids)
    acts = {}
    handles = [
        blk.ffn.act.register_forward_hook(lambda m, i, o, b=b: acts.__setitem__(b, o.detach()))
        for b, blk in enumerate(adapter.transformer.blocks)
    ]
    try:
        total = 0
        for v in range(cfg.n_augs):
            x = images if v == 0 else views[:, v - 1]
            adapter.teacher_forced_logits(adapter.tokenize(x), labels)
            per_group = []
            for b in range(len(acts)):
                a = acts[b].abs()  # [N, T, U]; row t predicts token t in VAR
                per_group.append(torch.stack([a[:, g.index].mean(1) for g in plan.groups], 1))
            total = total + torch.stack(per_group, 1)  # [N, L, G, U]
    finally:
        for h in handles:
            h.remove()
    return total / cfg.n_augs


@pytest.mark.parametrize("rest", ["mean", "median"])
def test_streaming_equals_brute_force(rest):
    ad = load_adapter("test-var", seed=3)
    ds = data.select_demo(n=40, seed=1)
    n = 13
    images, labels = ds.images(np.arange(n), size=8), ds.labels_tensor(np.arange(n))
    keys = ds.ids[:n]
    cfg = unitmem.UnitMemConfig(
        n_augs=3, augmentation="shift", rest=rest, group_kinds=("scale", "position"), top_images=4
    )
    p = unitmem.UnitMemPass(ad, n, cfg)
    for s, e in ((i, min(n, i + 5)) for i in range(0, n, 5)):
        p.step(images[s:e], labels[s:e], keys=keys[s:e])
    out = p.finish()
    mu = _brute_force_mu(ad, images, labels, keys, cfg, p.plan)  # [N, L, G, U]
    for li in range(mu.shape[1]):
        ref = unitmem.brute_force_unitmem(mu[:, li], rest=rest)
        np.testing.assert_allclose(out["mu_max_LGU"][li], ref["mu_max"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["mu_rest_LGU"][li], ref["mu_rest"].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["unitmem_LGU"][li], ref["unitmem"].numpy(), rtol=1e-4, atol=1e-5)
        # the argmax image attains the max (exact ties happen: e.g. VAR's 1x1 row sees only the class label)
        got = np.take_along_axis(mu[:, li].numpy(), out["argmax_LGU"][li][None], 0)[0]
        np.testing.assert_allclose(got, ref["mu_max"].numpy(), rtol=1e-5, atol=1e-6)
        unique = (mu[:, li] >= ref["mu_max"] - 1e-4).sum(0) == 1
        np.testing.assert_array_equal(out["argmax_LGU"][li][unique.numpy()], ref["argmax"].numpy()[unique.numpy()])
        # top-K images of the scale groups are the K largest mu, in order
        S = p.plan.scale_group_ids
        topv = mu[:, li, S].topk(4, dim=0).values
        np.testing.assert_allclose(out["top_mu_LKSU"][li], topv.numpy(), rtol=1e-5, atol=1e-6)
        picked = np.take_along_axis(mu[:, li, S].numpy(), out["top_images_LKSU"][li], 0)
        np.testing.assert_allclose(picked, topv.numpy(), rtol=1e-5, atol=1e-6)
    # the scale groups of VAR are exactly the scales, and every position of every scale has its group
    names = [g.name for g in p.plan.groups]
    assert names[:4] == ["1x1", "2x2", "3x3", "4x4"] and len(names) == 4 + 30
    assert np.all((out["unitmem_LGU"] >= 0) & (out["unitmem_LGU"] <= 1))


def test_state_roundtrip_resume_equals_uninterrupted():
    ad = load_adapter("test-var", seed=5)
    ds = data.select_demo(n=40, seed=2)
    n = 12
    images, labels, keys = ds.images(np.arange(n), size=8), ds.labels_tensor(np.arange(n)), ds.ids[:n]
    cfg = unitmem.UnitMemConfig(n_augs=2, augmentation="crop", top_images=3, block_images=4)
    full = unitmem.UnitMemPass(ad, n, cfg)
    for s, e in ((i, min(n, i + 4)) for i in range(0, n, 4)):
        full.step(images[s:e], labels[s:e], keys[s:e])
    first = unitmem.UnitMemPass(ad, n, cfg)
    first.step(images[:4], labels[:4], keys[:4])
    saved = first.state.arrays()
    second = unitmem.UnitMemPass(ad, n, cfg)
    second.load_state(unitmem.UnitMemState.from_arrays(saved, 4))
    for s, e in ((i, min(n, i + 4)) for i in range(4, n, 4)):
        second.step(images[s:e], labels[s:e], keys[s:e])
    a, b = full.finish(), second.finish()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_job_cancelled_then_resumed_equals_clean_run(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "CHECKPOINT_EVERY_S", 0.0)
    monkeypatch.setattr(jobs, "CANCEL_POLL_S", 0.0)
    ad = load_adapter("test-var", seed=7)
    ds = data.select_demo(n=40, seed=3)
    cfg = unitmem.UnitMemConfig(n_augs=2, batch_size=8)
    clean = unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(tmp_path / "clean"))

    store = ResultStore(tmp_path / "resumed")
    key = store.key(unitmem.KIND, unitmem.job_spec(ad, ds, cfg))
    seen = []

    def stop_after_two(frac, msg):
        seen.append(frac)
        if len(seen) == 2:
            jobs.cancel_job(key, store)

    with pytest.raises(jobs.Cancelled):
        unitmem.run_unitmem(ad, ds, cfg, store=store, on_progress=stop_after_two)
    assert store.has_partial(key) and not store.exists(key)
    partial_arrays, partial_meta = store.load_partial(key)
    assert 0 < partial_meta["n_seen"] < len(ds)
    resumed = unitmem.run_unitmem(ad, ds, cfg, store=store)
    assert resumed.meta["store_key"] == key
    for k in clean.arrays:
        np.testing.assert_array_equal(clean.arrays[k], resumed.arrays[k], err_msg=k)


def test_summary_reports_planted_share_and_block_means(tmp_path):
    ad = load_adapter("test-var", seed=1)
    ds = data.select_demo(n=40, seed=0)
    res = unitmem.run_unitmem(ad, ds, unitmem.UnitMemConfig(n_augs=1, batch_size=20), store=ResultStore(tmp_path))
    s = unitmem.summarize(res, top=5)
    assert s["n_images"] == 40 and s["blocks"] == 2 and s["groups"] == ["1x1", "2x2", "3x3", "4x4"]
    assert np.array(s["block_group_mean"]).shape == (2, 4)
    np.testing.assert_allclose(np.array(s["block_group_mean"]), res.unitmem[:, :4].mean(-1), atol=1e-5)
    assert s["planted_share_of_data"] == pytest.approx(20 / 40)
    tops = [u["unitmem"] for u in s["top_units"]]
    assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(float(res.unitmem[:, :4].max()), abs=1e-4)


def test_max_first_ties_equals_max_with_its_tie_count():
    """The fast block reduction gives max(dim=1)'s values and first indices bit for bit, and the tie count, also
    with many ties (values from a small set) and with a NaN (which takes max's own path)."""
    from iarmem_core.unitmem import _max_first_ties

    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(3, 16, 5, 7, generator=g), torch.randint(0, 3, (2, 16, 4, 9), generator=g).float()):
        mx, arg = x.max(dim=1)
        got = _max_first_ties(x)
        assert torch.equal(got[0], mx) and torch.equal(got[1], arg)
        assert torch.equal(got[2], (x == mx.unsqueeze(1)).sum(dim=1, dtype=torch.int32))
        assert int(got[2].min()) >= 1
    x = torch.rand(2, 5, 3, 4, generator=g)
    x[1, 2, 0, 0] = float("nan")
    mx, arg = x.max(dim=1)
    got = _max_first_ties(x)
    assert torch.equal(got[1], arg) and torch.equal(got[0].nan_to_num(-1), mx.nan_to_num(-1))


@pytest.mark.parametrize("name", ["test-var", "test-rar"])
def test_group_reducer_slices_equal_the_gather_bit_for_bit(name):
    """The reducer adds aligned runs of groups as slices; the sums equal the gather / index_add path exactly,
    for the full call and for a call that sees only some rows (a KV-cache step)."""
    m = load_adapter(name, device="cpu")
    plan = unitmem.plan_groups(m, unitmem.UnitMemConfig(group_kinds=("scale", "position")))
    g = torch.Generator().manual_seed(0)
    for ti in (torch.arange(m.n_tokens), torch.arange(m.n_tokens // 2, m.n_tokens)):
        r = plan.reducer(ti, torch.device("cpu"), torch.float32)
        assert r.single_runs is not None and len(r.single_runs) <= 16
        acts = torch.rand(3, len(ti), 8, generator=g)
        fast = torch.rand(3, len(plan.groups), 8, generator=g)
        slow = fast.clone()
        r.add_into(fast, acts)
        r.single_runs = r.multi_runs = None  # the gather path
        r.add_into(slow, acts)
        assert torch.equal(fast, slow)
