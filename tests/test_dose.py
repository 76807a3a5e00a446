"""Dose-response curves on the constructed model whose one unit carries the memorized copies (test_localize)."""

from __future__ import annotations

import numpy as np
import pytest

from iarmem_core import dose, localize, unitmem
from iarmem_core.hooks import UnitEdit
from iarmem_core.store import ResultStore
from tests.test_extraction import PREFIX
from tests.test_localize import carried  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _lcfg(**kw) -> localize.LocalizeConfig:
    return localize.LocalizeConfig(
        prefix_tokens=PREFIX, threshold=0.999, random_draws=20, quality_samples=0, nemo_heldout=20, **kw
    )


def test_union_steps_grow_by_ascending_n_min_and_keep_the_last():
    sets = [("b", 2, [[0, 1], [0, 2]]), ("a", 1, [[1, 5]]), ("c", 2, [[0, 1], [2, 3]])]
    steps = dose.union_steps(sets, points=12)
    assert [s["added"] for s in steps] == ["a", "b", "c"]  # n_min 1, then 2 (ties by id)
    assert steps[-1]["units"] == {0: (1, 2), 1: (5,), 2: (3,)}
    assert [s["n_images"] for s in dose.union_steps(sets, points=2)] == [1, 3]
    assert dose.union_steps([], 5) == []


def test_greedy_order_follows_the_alive_images_summed_attribution():
    attr = np.array([[1.0, 0.5, 0.0, -3.0], [0.0, 0.6, 1.0, 0.0]])
    alive = np.array([True, True])
    assert dose.greedy_order(attr, alive, set(), 2) == [1, 0]  # 1.1, then 1.0 (index 2 ties at 1.0: lower first)
    assert dose.greedy_order(attr, np.array([False, True]), {2}, 1) == [1]  # only image 1 counts; 2 is taken
    # negative attribution never helps a unit
    assert dose.greedy_order(attr, np.array([True, False]), set(), 4)[-1] == 3


def test_batched_judge_equals_one_edit_at_a_time(carried):  # noqa: F811
    model, train, ids, (block, unit) = carried
    pos = {k: i for i, k in enumerate(train.ids)}
    judge = localize.make_judge(model, train, [pos[k] for k in ids], _lcfg())
    edits = [
        None,
        UnitEdit(units={block: (unit,)}, op="zero"),
        UnitEdit(units={0: (1, 2, 3)}, op="zero"),
    ]
    many = judge.scores_many(edits, rows_per_batch=len(ids) * 2)  # two edits in a batch, then one
    one = np.stack([judge.scores(e) for e in edits])
    np.testing.assert_array_equal(many, one)
    assert many[0].min() == 1.0 and many[1, 0] < 0.999  # the carrying unit removes the first copy


def test_curves_on_a_model_with_a_known_carrying_unit(carried, tmp_path):  # noqa: F811
    model, train, ids, (block, unit) = carried
    st = ResultStore(tmp_path)
    um = unitmem.run_unitmem(model, train, unitmem.default_config(model), store=st)
    cfg = dose.CurveConfig(percents=(1.0, 10.0), random_draws=20, localize=_lcfg())
    res = dose.run_dose_response(model, train, um, cfg, store=st)
    n0 = res["extracted_before"]
    assert n0 >= 1 and set(ids[:1]) <= set(res["images"])
    c = res["curves"]
    # every curve starts at the unedited model
    assert all(rows[0]["n_units"] == 0 and rows[0]["extracted"] == n0 for rows in c.values())
    total = res["n_units_total"]
    assert [r["n_units"] for r in c["unitmem"][1:]] == [max(1, round(total * k / 100)) for k in cfg.percents]
    for r in c["random"][1:]:
        assert len(r["draws"]) == 20 and r["q05"] <= r["extracted"] <= r["q95"]
        assert r["min"] <= r["q05"] and r["q95"] <= r["max"]
    for r in c["unitmem"][1:]:
        assert 0 < r["p_value"] <= 1 and 1 <= r["rank"] <= 21
    # the union of the minimal sets holds the carrying unit and removes at least the first copy
    assert c["union"][-1]["n_images"] == res["n_localized"] >= 1
    assert c["union"][-1]["extracted"] < n0
    # the greedy cover takes the carrying unit first (attribution ranks it first): one unit removes a copy
    assert c["greedy"][1]["n_units"] == 1 and c["greedy"][1]["extracted"] < n0

    assert res["summary"]["greedy"]["units_for_half"] is not None or n0 == 1
    # stored: the same call loads it, the key is the one dose_response_key names
    again = dose.run_dose_response(model, train, um, cfg, store=st)
    assert again["store_key"] == res["store_key"] == dose.dose_response_key(model, train, um, cfg, st)


def test_bad_config_is_a_clear_message():
    with pytest.raises(ValueError, match="percents"):
        dose.CurveConfig(percents=(0.0,))
    with pytest.raises(ValueError, match="random_draws"):
        dose.CurveConfig(random_draws=0)
