"""Interventions: unit selection known answers, random control, edits undone, quality plumbing, the sweep."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from iarmem_core import data, extraction, hooks, intervention, metrics, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def var():
    torch.set_num_threads(1)
    return load_adapter("test-var", device="cpu")


@pytest.fixture(scope="module")
def space():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = metrics.FeatureNet(width=4, feat_dim=8).eval()  # random weights: plumbing, not quality
    return metrics.DemoFeatureSpace(net, device="cpu")


def _fake_unitmem(um_LGU: np.ndarray, groups: list[dict] | None = None) -> unitmem.UnitMemResult:
    L, G, _ = um_LGU.shape
    groups = groups or [{"name": f"s{g}", "kind": "scale", "scale": g} for g in range(G)]
    scale_ids = [i for i, g in enumerate(groups) if g["kind"] == "scale"]
    return unitmem.UnitMemResult(
        {"unitmem_LGU": um_LGU}, {"blocks": list(range(L)), "groups": groups, "scale_groups": scale_ids}
    )


# ---------------------------------------------------------------------------------------------------
# selection
def test_select_units_known_answers():
    um = np.zeros((2, 3, 10))  # 2 blocks x 3 scales x 10 units
    um[0, 0, 3] = 0.9  # block 0 unit 3 is the top unit at the coarse scale
    um[1, 2, 7] = 0.8  # block 1 unit 7 at the finest scale
    um[1, 1, 2] = 0.7
    um[0, 2, 5] = 0.6
    res = _fake_unitmem(um)
    assert intervention.select_units(res, 10) == {0: (3,), 1: (7,)}  # 10% of 20 units, max over scales
    assert intervention.select_units(res, 15) == {0: (3,), 1: (2, 7)}
    assert intervention.select_units(res, 20) == {0: (3, 5), 1: (2, 7)}
    assert intervention.select_units(res, 10, ranking="per_block") == {0: (3,), 1: (7,)}
    assert intervention.select_units(res, 10, combine=1) == {1: (2,), 0: (0,)}  # scale 1: one unit, then ties
    assert intervention.select_units(res, 10, combine="s2") == {0: (5,), 1: (7,)}
    # per group: the best unit of each scale's own ranking in turn (3 scales, 15% of 20 = 3 units); the
    # fourth comes from scale 0 again, whose next unit is block 0 unit 0 (score 0, lowest index), where the
    # global ranking takes block 0 unit 5 (0.6 at scale 2)
    assert intervention.select_units(res, 15, ranking="per_group") == {0: (3,), 1: (2, 7)}
    assert intervention.select_units(res, 20, ranking="per_group") == {0: (0, 3), 1: (2, 7)}
    assert intervention.select_units(res, 10, exclude=[(0, 3)]) == {1: (2, 7)}
    assert intervention.select_units(res, 0) == {}
    with pytest.raises(ValueError, match="top_percent"):
        intervention.select_units(res, 150)
    assert intervention.units_from_pairs([(1, 4), (0, 2), (1, 4), (1, 0)]) == {0: (2,), 1: (0, 4)}


def test_random_control_has_the_requested_size_and_block_distribution():
    rng = np.random.default_rng(1)
    res = _fake_unitmem(rng.random((4, 3, 50)))
    units = intervention.select_units(res, 10)  # 20 units, unevenly spread over the 4 blocks
    rnd = intervention.random_control(units, 50, seed=3)
    assert {b: len(u) for b, u in rnd.items()} == {b: len(u) for b, u in units.items()}
    assert sum(len(u) for u in rnd.values()) == 20
    for u in rnd.values():
        assert len(set(u)) == len(u) and all(0 <= v < 50 for v in u)
    assert rnd == intervention.random_control(units, 50, seed=3)
    assert rnd != intervention.random_control(units, 50, seed=4)
    dis = intervention.random_control(units, 50, seed=3, disjoint=True)
    assert all(not set(dis[b]) & set(units[b]) for b in units)
    with pytest.raises(ValueError, match="only 0 available"):
        intervention.random_control({0: tuple(range(50))}, 50, disjoint=True)


def test_random_draw_stats_known_answers():
    # ranked edit left 14 extracted; the random draws left 17, 16, 14, 18: one draw did as well
    r = intervention.random_draw_stats(14, [17, 16, 14, 18])
    assert r["draws"] == 4 and r["extracted_after_draws"] == [17, 16, 14, 18]
    assert (r["extracted_after_min"], r["extracted_after_max"], r["extracted_after_mean"]) == (14, 18, 16.25)
    assert r["p_value"] == pytest.approx(2 / 5)
    assert intervention.random_draw_stats(11, [16] * 10)["p_value"] == pytest.approx(1 / 11)  # beats every draw
    assert intervention.random_draw_stats(20, [16, 17])["p_value"] == 1.0  # worse than every draw
    with pytest.raises(ValueError, match="at least one"):
        intervention.random_draw_stats(3, [])


def test_default_random_draws_depend_on_the_model_kind(var):
    assert intervention.default_random_draws(var) == 10  # test and demo models: extraction is cheap
    assert intervention.default_random_draws(var, 3) == 3  # asked for: always that
    from iarmem_core.registry import get_spec

    class _Released:  # only the spec is read; a released model is not built for this
        spec = get_spec("var-d16")

    assert intervention.default_random_draws(_Released()) == 1


# ---------------------------------------------------------------------------------------------------
# edits
def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_edit_changes_outputs_and_is_fully_undone(var):
    labels = [0, 1, 2, 3, 4, 5]
    units = {b: tuple(range(0, var.n_units, 2)) for b in range(var.n_blocks)}
    edit = intervention.make_edit(units, factor=0.0)
    state = _state(var.transformer)
    before, after = intervention.sample_pair(var, labels, edit, seed=7)
    assert before.shape == (6, 3, 8, 8) and (before - after).abs().amax() > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in var.transformer.state_dict().items())  # weights untouched
    again = intervention.generate_images(var, labels, None, seed=7)
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    # an exception inside the edit leaves nothing behind
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.edit(var.transformer, edit):
            raise RuntimeError("boom")
    torch.testing.assert_close(intervention.generate_images(var, labels, None, seed=7), before, rtol=0, atol=0)


def test_edit_in_one_thread_does_not_reach_another(var):
    labels = [3, 1, 4, 1]
    edit = intervention.make_edit({b: tuple(range(var.n_units)) for b in range(var.n_blocks)}, op="zero")
    before, after = intervention.sample_pair(var, labels, edit, seed=1)
    assert not torch.equal(before, after)
    out: dict[str, list[torch.Tensor]] = {"plain": [], "edited": []}
    start = threading.Barrier(2)

    def run(name: str, e) -> None:
        start.wait()
        for _ in range(5):
            out[name].append(intervention.generate_images(var, labels, e, seed=1))

    ts = [threading.Thread(target=run, args=("plain", None)), threading.Thread(target=run, args=("edited", edit))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(torch.equal(x, before) for x in out["plain"]) and len(out["plain"]) == 5
    assert all(torch.equal(x, after) for x in out["edited"]) and len(out["edited"]) == 5


def test_sampling_follows_the_registry_settings(var):
    rar = load_adapter("test-rar", device="cpu")
    kw = intervention.sampling_kwargs(rar)
    assert kw == {"cfg": 16.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0, "cfg_power": 2.75}
    assert intervention.sampling_kwargs(var, {"top_k": 5})["top_k"] == 5
    with pytest.raises(ValueError, match="unknown sampling option 'cfg_power'"):
        intervention.sampling_kwargs(var, {"cfg_power": 1.0})


# ---------------------------------------------------------------------------------------------------
# quality and the sweep
def test_quality_is_the_frechet_distance_of_sample_and_reference_features(var, space):
    ref = data.select_demo(n=40, seed=0, split="heldout")
    q = intervention.quality(var, None, n_samples=30, feature_space=space, reference_set=ref, seed=5)
    samples = intervention.generate_images(var, torch.arange(30) % 10, None, seed=5)
    f_s, f_r = space.features(samples), space.features(ref.images(size=8))
    assert q["fd"] == pytest.approx(metrics.frechet_distance(f_s, f_r), rel=1e-9)
    assert q["class_acc"] == pytest.approx(metrics.class_accuracy(space.net, samples, torch.arange(30) % 10))
    assert q["fd_metric"] == "FD[demo-fashion-cnn]" and q["n_samples"] == 30 and q["n_reference"] == 40
    # direct computation on the sample statistics: ||mu_a - mu_b||^2 + tr(Sa + Sb - 2 sqrt(Sa Sb))
    a, b = f_s.double(), f_r.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ev = torch.linalg.eigvals(sa @ sb).real.clamp(min=0).sqrt().sum()
    direct = float(((a.mean(0) - b.mean(0)) ** 2).sum() + sa.trace() + sb.trace() - 2 * ev)
    assert q["fd"] == pytest.approx(direct, rel=1e-6, abs=1e-9)


def test_sweep_rows_and_k0_equals_the_unedited_model(var, space, tmp_path):
    st = ResultStore(tmp_path)
    sel = data.select_demo(n=40, seed=0)
    ref = data.select_demo(n=30, seed=0, split="heldout")
    um = unitmem.run_unitmem(var, sel, unitmem.UnitMemConfig(n_augs=2, batch_size=20), store=st)
    ecfg = extraction.ExtractionConfig(candidates_per_class=1, heldout=False, batch_size=10)
    df = intervention.run_sweep(
        var,
        um,
        sel,
        top_percents=(0, 50),
        extraction_cfg=ecfg,
        n_samples=20,
        feature_space=space,
        reference_set=ref,
        store=st,
        random_draws=3,
    )
    assert list(df.selection) == ["unitmem", "random", "unitmem", "random"]
    assert list(df.n_units) == [0, 0, var.n_blocks * var.n_units // 2, var.n_blocks * var.n_units // 2]
    k0 = df[df.top_percent == 0]
    assert (k0.extracted == k0.extracted_before).all() and (k0.fd == k0.fd_before).all()
    k50 = df[df.top_percent == 50]
    assert k50.fd.iloc[0] != k50.fd.iloc[1]  # different units, different samples
    assert st.exists(df.attrs["store_key"])
    again = intervention.load_sweep(st, df.attrs["store_key"])
    assert again.equals(df)
    r = intervention.run_intervention(
        var,
        um,
        sel,
        top_percent=50,
        extraction_cfg=ecfg,
        n_samples=20,
        feature_space=space,
        reference_set=ref,
        store=st,
        random_draws=3,
    )
    assert intervention.InterventionResult.from_dict(r.to_dict()) == r  # the stored form reads back
    r = r.to_dict()
    assert r["fd_after"] == k50.fd.iloc[0] and r["random_control"]["fd_after"] == k50.fd.iloc[1]
    # the random control over 3 draws: the first draw is the control's own row, the others are new units
    rc = r["random_control"]
    assert rc["draws"] == 3 and rc["draw_seeds"] == [0, 1, 2] and len(set(rc["store_keys"]["extraction_draws"])) == 3
    assert rc["extracted_after_draws"][0] == rc["extracted_after"] == k50.extracted.iloc[1]
    assert rc == {**rc, **intervention.random_draw_stats(r["extracted_after"], rc["extracted_after_draws"])}
    assert (k50.random_draws == 3).all() and (k50.random_extracted_mean == rc["extracted_after_mean"]).all()
    assert (k50.random_extracted_min <= k50.extracted.iloc[1]).all() and (
        k50.extracted.iloc[1] <= k50.random_extracted_max
    ).all()
    assert k50.p_value.iloc[0] == rc["p_value"] and (k0.random_draws == 0).all() and k0.p_value.isna().all()
    rc_per_block = {b: len(u) for b, u in r["random_control"]["edit"]["units"].items()}
    assert rc_per_block == r["units_per_block"] and sum(rc_per_block.values()) == r["n_units"] == 256


# ---------------------------------------------------------------------------------------------------
# ground-truth diagnostic
def test_target_selectivity_known_answers(var):
    base = data.load_demo("heldout").subset(range(6))
    twice = base.subset([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    # the same images on both sides: no unit fires more for the targets
    same = intervention.target_selectivity(var, twice, [True] * 6 + [False] * 6, batch_size=5)
    assert np.abs(same).max() < 1e-6
    # swapping targets and the rest flips the sign of every score
    t = [True, True, False, False, False, False]
    s = intervention.target_selectivity(var, base, t)
    s_swapped = intervention.target_selectivity(var, base, [not x for x in t])
    assert s.shape == (var.n_blocks, var.unit_sites()[0].n_units) and np.abs(s).max() > 0.05
    np.testing.assert_allclose(s, -s_swapped, atol=1e-6)
    # the top units are the highest-scoring ones, k% of all units
    blocks = [u.block for u in var.unit_sites()]
    units = intervention.top_units(s, 10, blocks)
    chosen = np.zeros_like(s, bool)
    for b, us in units.items():
        chosen[blocks.index(b), list(us)] = True
    assert chosen.sum() == intervention.n_selected(10, s.size)
    assert s[chosen].min() >= s[~chosen].max()
    with pytest.raises(ValueError, match="some but not all"):
        intervention.target_selectivity(var, base, [True] * 6)
