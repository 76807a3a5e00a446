"""UnitMem's controls and its fixed reduction order: batch invariance, block merges, the class-controlled rest,
distinct inputs and class ties, the null control's shares, exact views of a finite augmentation family."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from iarmem_core import data, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.cli import main as cli_main
from iarmem_core.store import ResultStore, arrays_sha256


@pytest.fixture(scope="module")
def var():
    return load_adapter("test-var", seed=3)


def _arrays(ad, ds, cfg, store):
    return unitmem.run_unitmem(ad, ds, cfg, store=ResultStore(store)).arrays


def test_arrays_are_bit_identical_for_any_batch_size(var, tmp_path):
    ds = data.select_demo(n=30, seed=1)
    base = dict(n_augs=2, augmentation="crop", group_kinds=("scale", "position"), block_images=8)
    a = _arrays(var, ds, unitmem.UnitMemConfig(batch_size=7, **base), tmp_path / "a")
    b = _arrays(var, ds, unitmem.UnitMemConfig(batch_size=16, **base), tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert arrays_sha256(a) == arrays_sha256(b)
    # batch size is not part of the store key: the second run could have loaded the first
    assert unitmem.result_key(
        var, ds, unitmem.UnitMemConfig(batch_size=7, **base), ResultStore(tmp_path / "a")
    ) == unitmem.result_key(var, ds, unitmem.UnitMemConfig(batch_size=16, **base), ResultStore(tmp_path / "a"))


def test_blocks_computed_out_of_order_and_merged_in_order_equal_the_pass(var):
    ds = data.select_demo(n=30, seed=2)
    cfg = unitmem.UnitMemConfig(n_augs=2, augmentation="shift", block_images=8, top_images=4)
    n = len(ds)
    x, y, ids = ds.images(np.arange(n), size=var.image_size), ds.labels_tensor(np.arange(n)), list(ds.ids)
    ref = unitmem.UnitMemPass(var, n, cfg)
    ref.step(x, y, ids)
    want = ref.finish()
    dist = unitmem.UnitMemPass(var, n, cfg)
    starts = list(range(0, n, 8))
    stats = {s: dist.block_stats(x[s : s + 8], y[s : s + 8], ids[s : s + 8], s) for s in reversed(starts)}
    with pytest.raises(ValueError, match="in order"):
        dist.merge(stats[8])
    for s in starts:
        dist.merge(stats[s])
    got = dist.finish()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_class_rest_is_zero_where_a_group_sees_only_the_class(var, tmp_path):
    ds = data.select_demo(n=40, seed=0)
    res = unitmem.run_unitmem(
        var, ds, unitmem.UnitMemConfig(n_augs=1, augmentation="none", rest="class"), store=ResultStore(tmp_path)
    )
    g11 = res.group_id("1x1")
    assert res.distinct_inputs(g11) == len(set(res.labels)) == 10  # VAR's 1x1 rows see the class label only
    np.testing.assert_array_equal(res.unitmem[:, g11, :], 0.0)
    assert res.argmax_label(res.blocks[0], g11, 0).startswith("class ")
    # finer scales see image tokens: more distinct inputs, and the class-controlled UnitMem is not all 0
    g_last = res.scale_group_ids[-1]
    assert res.distinct_inputs(g_last) > 10 and res.unitmem[:, g_last, :].max() > 0
    # the class rest equals the mean over the other images of the argmax image's class (brute force)
    p = unitmem.UnitMemPass(var, len(ds), unitmem.UnitMemConfig(n_augs=1, augmentation="none"))
    mu, _, _ = p._mu(ds.images(None, size=var.image_size), ds.labels_tensor(), list(ds.ids))
    mu_NGU = mu[0].numpy()  # block 0: [B, G, U]
    lab = np.asarray(res.labels)
    arg = res.arrays["argmax_LGU"][0]
    want = np.zeros_like(arg, dtype=np.float64)
    for g in range(arg.shape[0]):
        for u in range(arg.shape[1]):
            same = np.flatnonzero((lab == lab[arg[g, u]]) & (np.arange(len(lab)) != arg[g, u]))
            want[g, u] = mu_NGU[same, g, u].astype(np.float64).mean()
    np.testing.assert_allclose(res.arrays["mu_rest_LGU"][0], want, rtol=1e-5, atol=1e-7)


def test_null_control_shares(var, tmp_path):
    held = data.select_demo(n=20, seed=0, split="heldout")
    res = unitmem.run_unitmem(
        var, held, unitmem.UnitMemConfig(n_augs=1, augmentation="none"), store=ResultStore(tmp_path / "h")
    )
    assert res.never_trained_share_of_data() == 1.0
    for g in res.scale_group_ids:
        assert res.never_trained_share_among_top(g, 0.1) == 1.0
    assert np.all(res.null_share_map(0.1) == 1.0)
    mixed = data.select_demo_with_null(n=40, n_heldout=10, seed=0)
    assert list(mixed.meta["trained"]) == [True] * 40 + [False] * 10
    r2 = unitmem.run_unitmem(
        var, mixed, unitmem.UnitMemConfig(n_augs=1, augmentation="none"), store=ResultStore(tmp_path / "m")
    )
    assert r2.never_trained_share_of_data() == pytest.approx(0.2)
    g = r2.scale_group_ids[-1]
    top = r2._top_flat(g, 0.1)
    arg = r2.arrays["argmax_LGU"][:, g, :].reshape(-1)[top]
    assert r2.never_trained_share_among_top(g, 0.1) == pytest.approx(np.mean(arg >= 40))
    share = r2.null_share_map(0.1)
    assert share.shape == r2.unitmem.shape[:2] and np.all((share >= 0) & (share <= 1))
    diff = r2.train_minus_null_map()
    assert diff.shape == share.shape


def test_flip_views_are_the_exact_expectation(var):
    ds = data.select_demo(n=12, seed=4, split="heldout")
    x, y, ids = ds.images(None, size=var.image_size), ds.labels_tensor(), list(ds.ids)
    exact = unitmem.UnitMemPass(var, len(ds), unitmem.UnitMemConfig(augmentation="flip", n_augs=10))
    assert exact.views["exact"] and exact.views["n"] == 2
    mu, _, _ = exact._mu(x, y, ids)
    plain = unitmem.UnitMemPass(var, len(ds), unitmem.UnitMemConfig(augmentation="none", n_augs=1))
    m0, _, _ = plain._mu(x, y, ids)
    m1, _, _ = plain._mu(x.flip(-1), y, ids)
    torch.testing.assert_close(mu, (m0 + m1) / 2, rtol=1e-6, atol=1e-7)
    rnd = unitmem.UnitMemPass(var, len(ds), unitmem.UnitMemConfig(augmentation="flip", n_augs=10, exact_views=False))
    assert not rnd.views["exact"] and rnd.views["n"] == 10


def _cli(*argv) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(list(argv)) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_cli_heldout_shares_and_digest(tmp_path):
    args = [
        "unitmem",
        "--model",
        "test-var",
        "--n",
        "40",
        "--augs",
        "1",
        "--augmentation",
        "none",
        "--heldout",
        "10",
        "--store",
        str(tmp_path),
        "--json",
    ]
    out = _cli(*args, "--batch-size", "7")
    assert out["n_images"] == 50 and out["heldout_share_of_data"] == 0.2
    g = out["groups"][-1]
    assert set(out["per_group"][g]["heldout_share_among_top"]) == {"top1", "top10"}
    assert out["per_group"]["1x1"]["distinct_inputs"] == 10
    again = _cli(*args, "--batch-size", "16", "--force")
    assert again["arrays_sha256"] == out["arrays_sha256"] and again["store_key"] == out["store_key"]
    with pytest.raises(SystemExit):
        cli_main(["unitmem", "--model", "test-var", "--rest", "nope"])


def test_a_block_that_fails_loses_nothing(var, monkeypatch):
    """Out of memory inside a block: the images fed stay held back, and feeding them again gives the clean result."""
    ds = data.select_demo(n=30, seed=5)
    cfg = unitmem.UnitMemConfig(n_augs=1, augmentation="none", block_images=8)
    x, y, ids = ds.images(None, size=var.image_size), ds.labels_tensor(), list(ds.ids)
    ref = unitmem.UnitMemPass(var, len(ds), cfg)
    ref.step(x, y, ids)
    want = ref.finish()
    p = unitmem.UnitMemPass(var, len(ds), cfg)
    p.step(x[:5], y[:5], ids[:5])
    real = p.block_stats
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (test)")
        return real(*a, **kw)

    monkeypatch.setattr(p, "block_stats", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.step(x[5:12], y[5:12], ids[5:12])
    assert p.state.n_seen == 0 and p.n_fed == 5  # the failed batch is not half-taken
    p.step(x[5:], y[5:], ids[5:])
    got = p.finish()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
