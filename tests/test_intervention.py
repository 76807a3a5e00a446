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
    assert r["rank"] == 1 and r["ties"] == 1  # no draw left fewer; one tied
    assert r["extracted_after_q05"] == pytest.approx(14.3) and r["extracted_after_q95"] == pytest.approx(17.85)
    assert intervention.random_draw_stats(15, [17, 16, 14, 18])["rank"] == 2  # one draw did better
    assert intervention.random_draw_stats(11, [16] * 10)["p_value"] == pytest.approx(1 / 11)  # beats every draw
    assert intervention.random_draw_stats(20, [16, 17])["p_value"] == 1.0  # worse than every draw
    with pytest.raises(ValueError, match="at least one"):
        intervention.random_draw_stats(3, [])


def test_default_random_draws_depend_on_the_model_kind(var):
    assert intervention.default_random_draws(var) == 20  # test and demo models: the draws run batched
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


@pytest.fixture(scope="module")
def small_world(var, tmp_path_factory):
    """test-var with a UnitMem result, an unedited attack on 10 candidates and reference images."""
    st = ResultStore(tmp_path_factory.mktemp("iv-store"))
    sel = data.select_demo(n=40, seed=0)
    ref = data.select_demo(n=30, seed=0, split="heldout")
    um = unitmem.run_unitmem(var, sel, unitmem.UnitMemConfig(n_augs=2, batch_size=20), store=st)
    ecfg = extraction.ExtractionConfig(candidates_per_class=1, heldout=False, batch_size=8)
    return st, sel, ref, um, ecfg


def test_batched_attack_equals_one_edit_at_a_time(var, small_world):
    st, sel, _, um, ecfg = small_world
    base = extraction.run_extraction(var, sel, ecfg, store=st)
    units = intervention.select_units(um, 25)
    edits = [intervention.make_edit(units)] + [
        intervention.make_edit(intervention.random_control(units, var.n_units, seed=i)) for i in range(3)
    ]
    edits.append(None)  # the unedited model, measured in the same pass
    # 5 edits x 10 candidates = 50 rows in batches of 16: rows of different edits share a batch
    es = intervention.measure_edits(var, sel, edits, ecfg, base=base, measures="all", rows_per_batch=16)
    assert es.scores["token_match"].shape == (5, 10, 1) and es.n_candidates == 10
    for e, ed in enumerate(edits):
        one = extraction.run_extraction(var, sel, ecfg, store=st, edit=ed)  # the one-edit path, batches of 8
        t = one.table[one.table.split == "train"]
        assert list(t.image_id) == list(es.image_id)
        # generated tokens are the same: token match is equal bit for bit; the bundled feature CNN is not
        # batch-size invariant on CPU, so feature cosine agrees to float32 round-off
        np.testing.assert_array_equal(es.scores["token_match"][e, :, 0], t["token_match"].to_numpy())
        np.testing.assert_allclose(es.scores["feature_cosine"][e, :, 0], t["feature_cosine"].to_numpy(), atol=1e-6)
        assert es.counts()[e] == one.count()["extracted"]
    np.testing.assert_array_equal(es.scores["token_match"][4], es.before["token_match"])  # None = unedited
    # token match alone takes the unedited run's tokens and decodes nothing: the same scores
    lean = intervention.measure_edits(var, sel, edits, ecfg, base=base, measures=["token_match"], rows_per_batch=24)
    np.testing.assert_array_equal(lean.scores["token_match"], es.scores["token_match"])
    assert np.abs(es.scores["feature_cosine"][0] - es.before["feature_cosine"]).max() > 1e-3  # the edit acts
    # margins are similarity minus the unedited result's threshold; the decision is is_extracted
    thr = base.thresholds()[base.meta["prefix_tokens"][0]]
    np.testing.assert_allclose(es.margins()[0], es.scores[base.similarity][0, :, 0] - np.float32(thr), atol=1e-7)
    np.testing.assert_array_equal(es.extracted(threshold=0.3), es.scores[base.similarity][:, :, 0] > np.float32(0.3))
    # the stored form reads back
    again = intervention.EditScores.from_stored(es.to_arrays(), es.to_meta())
    np.testing.assert_array_equal(again.scores["token_match"], es.scores["token_match"])
    assert again.thresholds == es.thresholds and again.edits == es.edits
    # the margin view: one row per candidate, the random draws' band around their median
    mt = intervention.margin_table(es, 0, random_indices=[1, 2, 3])
    assert len(mt) == 10 and (mt.margin_random_q05 <= mt.margin_random_median).all()
    assert (mt.margin_random_median <= mt.margin_random_q95).all()
    assert list(mt.margin_before) == sorted(mt.margin_before, reverse=True)
    assert (mt.extracted_after == (mt.margin_after > 0)).all()


def test_bootstrap_counts_known_answers():
    ext = np.array([[True] * 10, [False] * 10, [True, False] * 5])
    b = intervention.bootstrap_counts(ext, np.array([True] * 5 + [False] * 5), n_boot=500)
    assert b["after"][0] == [10, 10] and b["after"][1] == [0, 0]  # no spread when all agree
    lo, hi = b["after"][2]
    assert lo < 5 < hi and 0 <= lo and hi <= 10
    assert b["before"][0] < 5 < b["before"][1]
    assert b["change"][0][0] > 0 and b["change"][1][1] < 0  # paired: all extracted vs all removed


def test_quality_has_intervals_and_its_first_samples_are_a_first_estimate(var, space):
    ref = data.select_demo(n=40, seed=0, split="heldout")
    firsts = []
    q = intervention.quality(
        var,
        None,
        n_samples=400,
        feature_space=space,
        reference_set=ref,
        seed=3,
        with_samples=True,
        on_first=(200, lambda est, s: firsts.append((est, s))),
    )
    lo, hi = q["fd_interval"]
    assert lo <= q["fd"] <= hi and lo < hi
    assert q["class_acc_interval"][0] <= q["class_acc"] <= q["class_acc_interval"][1]
    ((est, s200),) = firsts
    assert est["n_samples"] == 200 and s200.n == 200
    small = intervention.quality(var, None, n_samples=200, feature_space=space, reference_set=ref, seed=3)
    assert est["fd"] == small["fd"] and est["class_acc"] == small["class_acc"]  # the same 200 samples
    np.testing.assert_array_equal(q["samples"].head(200).features_ND, s200.features_ND)
    # the bootstrap's fast FD is the reported FD's formula
    fr = intervention._FDRef(intervention.reference_features(space, ref, var.image_size))
    assert fr.distance(q["samples"].features_ND) == pytest.approx(q["fd"], rel=1e-6)


def test_batched_quality_sampling(var, space):
    ref = data.select_demo(n=40, seed=0, split="heldout")
    e = intervention.make_edit({b: tuple(range(0, var.n_units, 2)) for b in range(var.n_blocks)}, factor=0.0)
    # greedy sampling makes a sample a function of its class: the batched pass and the one-edit path agree
    greedy = {"top_k": 1, "cfg": 0.0}
    kw = dict(n_samples=50, feature_space=space, reference_set=ref, seed=1, sampling=greedy)
    many = intervention.quality_many(var, [None, e, e], **kw)
    one = [intervention.quality(var, x, with_samples=True, **kw) for x in (None, e)]
    for got, want in zip(many, [one[0], one[1], one[1]]):
        np.testing.assert_allclose(got["samples"].features_ND, want["samples"].features_ND, atol=1e-5)
        np.testing.assert_array_equal(got["samples"].predictions_N, want["samples"].predictions_N)
    assert many[0]["fd"] != many[1]["fd"]
    # with random sampling a row's noise depends on its place in the batch: the same edit twice in one pass
    # gives two sets of draws (the one-edit path stays available with batched=False)
    many = intervention.quality_many(var, [e, e], n_samples=50, feature_space=space, reference_set=ref, seed=1)
    assert not np.allclose(many[0]["samples"].features_ND, many[1]["samples"].features_ND)
    alone = intervention.quality(
        var, e, n_samples=50, feature_space=space, reference_set=ref, seed=1, with_samples=True
    )
    sep = intervention.quality_many(
        var, [None, e], n_samples=50, feature_space=space, reference_set=ref, seed=1, batched=False
    )
    np.testing.assert_array_equal(sep[1]["samples"].features_ND, alone["samples"].features_ND)


def test_measurement_is_progressive_and_matches_the_sweep(var, space, small_world):
    st, sel, ref, um, ecfg = small_world
    kw = dict(extraction_cfg=ecfg, n_samples=400, feature_space=space, reference_set=ref, store=st, random_draws=3)
    stages = []
    with pytest.raises(ValueError, match="whole blocks"):
        intervention.run_intervention(var, um, sel, top_percent=50, n_first=50, **kw)
    r = intervention.run_intervention(
        var, um, sel, top_percent=50, n_first=200, on_stage=lambda res, es: stages.append((res, es)), **kw
    )
    assert [s.stage for s, _ in stages] == ["extraction", "first estimate"] and r.stage == "full"
    first = stages[1][0]
    assert first.n_samples == 200 and r.n_samples == 400 and first.n_samples_target == 400
    assert first.extracted_after == r.extracted_after and stages[0][0].fd_after is None
    assert first.fd_after is not None and first.random_control.fd_after is None  # the draw's quality follows
    # the first estimate is the quality of the first 200 samples, the full one of all 400, for both sides
    q50 = intervention.quality(var, None, n_samples=200, feature_space=space, reference_set=ref, seed=0)
    assert first.fd_before == q50["fd"] and first.fd_before != r.fd_before
    assert intervention.InterventionResult.from_dict(r.to_dict()) == r  # the stored form reads back
    es = stages[0][1]
    assert es.n_edits == 4 and r.random_control.draws == 3
    rc = r.random_control
    assert rc.extracted_after_draws == [int(v) for v in es.counts()[1:]]
    assert rc.draw_seeds == [0, 1, 2] and rc.rank >= 1
    assert r.to_dict()["random_control"] == {
        **r.to_dict()["random_control"],
        **intervention.random_draw_stats(r.extracted_after, rc.extracted_after_draws),
    }
    assert r.extracted_after_interval[0] <= r.extracted_after <= r.extracted_after_interval[1]
    # the full quality was saved under the quality key: the sweep reuses it and agrees
    df = intervention.run_sweep(var, um, sel, top_percents=(0, 50), **kw)
    assert list(df.selection) == ["unitmem", "random", "unitmem", "random"]
    assert list(df.n_units) == [0, 0, var.n_blocks * var.n_units // 2, var.n_blocks * var.n_units // 2]
    k0, k50 = df[df.top_percent == 0], df[df.top_percent == 50]
    assert (k0.extracted == k0.extracted_before).all() and (k0.fd == k0.fd_before).all()
    assert k50.fd.iloc[0] == r.fd_after and k50.fd.iloc[1] == rc.fd_after
    assert k50.extracted.iloc[0] == r.extracted_after and k50.extracted.iloc[1] == rc.extracted_after
    assert k50.p_value.iloc[0] == rc.p_value and (k0.random_draws == 0).all() and k0.p_value.isna().all()
    assert (k50.random_extracted_min <= k50.extracted.iloc[1]).all()
    assert st.exists(df.attrs["store_key"]) and intervention.load_sweep(st, df.attrs["store_key"]).equals(df)
    rc_per_block = {b: len(u) for b, u in rc.edit["units"].items()}
    assert rc_per_block == r.units_per_block and sum(rc_per_block.values()) == r.n_units == 256


def test_measurement_job_publishes_its_stages(var, space, small_world, monkeypatch):
    st, sel, ref, um, ecfg = small_world
    monkeypatch.setattr(intervention, "DEFAULT_N_SAMPLES", 400)
    seen = []
    real = intervention.run_intervention

    def spy(*a, **kw):
        kw.update(extraction_cfg=ecfg, feature_space=space, reference_set=ref, n_samples=400)
        inner = kw["on_stage"]

        def on_stage(res, es):
            inner(res, es)
            got = intervention.load_measurement_stage(st, key)
            seen.append(got[0].stage)

        kw["on_stage"] = on_stage
        return real(*a, **kw)

    monkeypatch.setattr(intervention, "run_intervention", spy)
    edit = dict(top_percent=50.0, units=None, factor=0.5, op="fc1_scale", ranking="global", seed=0, random_draws=3)
    key = intervention.measurement_key(var, um, sel, st, n_samples=400, n_first=200, **edit)
    h = intervention.start_measurement(var, um, sel, st, n_samples=400, n_first=200, **edit)
    assert h.key == key and h.wait(300) and h.state == "done", h.status()
    assert seen == ["extraction", "first estimate"]
    r, es = intervention.load_measurement(*st.load(key))
    assert r.stage == "full" and es is not None and es.n_edits == 4
    assert st.load_partial(key) is None  # the checkpoint is gone once the result is stored


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


@pytest.mark.parametrize("name", ["test-var", "test-rar", "test-llamagen"])
def test_batched_edit_in_cfg_kv_cache_generation_of_every_family(name):
    """One generation pass with a different edit per row ([cond; uncond] batches, one KV-cache step per call)
    gives every row the tokens of its own edit run alone; greedy, so the tokens are the whole story."""
    m = load_adapter(name, device="cpu")
    e1 = intervention.make_edit({b: tuple(range(0, m.n_units, 3)) for b in range(m.n_blocks)}, factor=0.2)
    e2 = intervention.make_edit({0: tuple(range(m.n_units))}, op="zero", cfg_half="uncond")
    labels = torch.arange(6) % m.num_classes
    kw = {**intervention.sampling_kwargs(m), "top_k": 1, "cfg": intervention.sampling_kwargs(m)["cfg"] or 2.0}
    assert kw["cfg"] > 0  # the batch is CFG-doubled (test-var publishes no CFG: 2 here)
    alone = []
    for e in (None, e1, e2):
        with hooks.edit(m.transformer, e):
            alone.append(m.flatten(m.generate(labels, seed=0, **kw)))
    with hooks.edit(m.transformer, hooks.BatchedEdit.tiled([None, e1, e2], 6)):
        together = m.flatten(m.generate(labels.repeat(3), seed=0, **kw))
    for i in range(3):
        assert torch.equal(together[6 * i : 6 * (i + 1)], alone[i])
    assert not torch.equal(alone[0], alone[1]) and not torch.equal(alone[0], alone[2])
