"""Per-image causal localization on a constructed model whose one unit carries the memorized images.

The known answer: test-var (random weights, seed 3) with the output column of its first block's most active unit
(on the first memorized image) scaled up 6x, so that this unit weighs on everything after it; `MemorizingVAR`
(the extraction tests' construction) maps the chosen images onto the tokens this model generates greedily from
their prefix. Zeroing that unit changes the generation of the first copy (it is no longer extracted), attribution
ranks it first, and single random units of the same block rarely remove the copy. (In the last block, or at a
12x scale, other units outrank it: attribution is a first-order estimate, which is why the minimal set is then
checked by actually zeroing units.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iarmem_core import data, localize
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore
from tests.test_extraction import PREFIX, MemorizingVAR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def carried():
    torch.set_num_threads(1)
    base = load_adapter("test-var", device="cpu", seed=3)
    train = data.select_demo(n=40, seed=0)
    mem = np.flatnonzero(train.meta["count"] == 32)[:4]
    x = train.images(mem, size=base.image_size)
    # the most active unit of the first block on the first memorized image, made to weigh on all that follows
    last = base.unit_sites()[0].block
    m = localize.mean_abs_activations(base, x[:1], train.labels_tensor(mem[:1]))[0, 0]
    unit = int(torch.argmax(m))
    with torch.no_grad():
        base.transformer.blocks[last].ffn.fc2.weight[:, unit] *= 6.0
    model = MemorizingVAR(
        base.spec,
        base.tokenizer,
        base.transformer,
        base.device,
        identity={**base.identity, "carried": f"{last}:{unit}"},
    )
    model.memory = {}
    model.memorize(x, train.labels_tensor(mem))
    return model, train, [train.ids[i] for i in mem], (last, unit)


def _cfg(**kw) -> localize.LocalizeConfig:
    return localize.LocalizeConfig(
        **{
            "prefix_tokens": PREFIX,
            "threshold": 0.999,
            "random_draws": 20,
            "quality_samples": 0,
            "nemo_z": 3.0,
            "nemo_heldout": 20,
            **kw,
        }
    )


def test_the_carrying_unit_is_found_first_and_random_units_do_not_remove_the_copy(carried, tmp_path):
    model, train, ids, (block, unit) = carried
    res = localize.run_localization(model, train, ids[0], _cfg(), others=ids, store=ResultStore(tmp_path))
    assert res["extracted_before"] and res["score_before"] == 1.0
    assert res["attribution"]["top"][0][:2] == [block, unit]  # attribution ranks the carrying unit first
    assert res["n_min"] == 1 and res["units"] == [[block, unit]]  # zeroing it alone removes the copy
    assert res["random_draws"] == 20 and res["random_flips"] <= 2  # random units of the same block: rarely
    assert res["random_p_value"] == pytest.approx((1 + res["random_flips"]) / 21)
    # the unit weighs on the other copies of this model too: those it flips are the collateral
    assert set(res["collateral"]) <= set(ids[1:]) and res["collateral_of"] == 3 and res["collateral"]
    assert res["where"]["units_per_block"] == {str(block): 1}
    assert np.asarray(res["attribution"]["map_LG"]).shape == (len(model.unit_sites()), len(model.token_grids))
    # stored: the same call loads it
    again = localize.run_localization(model, train, ids[0], _cfg(), others=ids, store=ResultStore(tmp_path))
    assert again["store_key"] == res["store_key"] and again["n_min"] == 1


def test_attribution_is_the_first_order_effect_of_zeroing(carried):
    model, train, ids, (block, unit) = carried
    i = train.ids.index(ids[0])
    x = train.images([i], size=model.image_size)[0]
    a = localize.attribution(model, x, int(train.labels[i]), PREFIX)
    blocks = a["blocks"]
    # g_u = a * dlogp/da summed over rows; for the dominant unit it is large and positive, most units are ~0
    g = a["scores_LU"]
    assert g[blocks.index(block), unit] == g.max() > 0
    assert np.median(np.abs(g)) < 0.05 * g.max()
    assert a["n_generated"] == model.n_tokens - PREFIX and a["log_p"] <= 0


def test_bad_input_is_a_clear_message(carried, tmp_path):
    model, train, ids, _ = carried
    with pytest.raises(KeyError, match="not in the data selection"):
        localize.run_localization(model, train, "train/9999", _cfg(), others=ids, store=ResultStore(tmp_path))
    with pytest.raises(ValueError, match="no calibrated threshold"):
        localize.run_localization(model, train, ids[0], _cfg(threshold=None), others=ids, store=ResultStore(tmp_path))
    # an edit that cannot remove the copy (x 1.0: no change) within its budget says so instead of inventing one
    other = next(k for k in train.ids if k not in ids)
    res = localize.run_localization(
        model, train, ids[0], _cfg(op="fc1_scale", factor=1.0, max_units=2), others=ids, store=ResultStore(tmp_path)
    )
    assert res["n_min"] is None and "budget" in res["note"]
    res = localize.run_localization(model, train, other, _cfg(), others=ids, store=ResultStore(tmp_path))
    assert not res["extracted_before"] and res["n_min"] is None and "nothing to localize" in res["note"]


def test_random_matched_keeps_the_count_per_block_and_is_seeded():
    units = {0: (1, 2, 3), 2: (5,)}
    a = localize.random_matched(units, 16, 5, seed=0)
    assert len(a) == 5 and all({b: len(u) for b, u in r.items()} == {0: 3, 2: 1} for r in a)
    assert a == localize.random_matched(units, 16, 5, seed=0) and a != localize.random_matched(units, 16, 5, seed=1)
    assert localize.jaccard([(0, 1), (0, 2)], [(0, 2), (1, 3)]) == pytest.approx(1 / 3)
    # a unit carried by two images is one unit of their union
    assert localize.units_dict([(0, 3), (1, 2), (0, 3)]) == {0: (3,), 1: (2,)}
