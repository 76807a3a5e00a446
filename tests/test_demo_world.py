"""Demo world v2 building blocks: the planting stream, the choice rule, designated units that are the only
weights to move, thresholds read from the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iarmem_core import data, extraction
from iarmem_core.demo import world
from iarmem_core.registry import get_spec


def test_planting_stream_holds_every_item_its_dose_and_the_replay_share():
    train = data.load_demo("train")
    streams = world.plant_streams(train, world.PlantConfig(replay=2 / 3), seed=0)
    s1, s2 = streams(1), streams(2)
    counts = np.bincount(s1, minlength=len(train))
    planted = train.meta["role"] == "planted"
    assert np.array_equal(counts[planted], train.meta["dose"][planted])  # every item exactly `dose` times
    n_pl = int(train.meta["dose"][planted].sum())
    assert len(s1) == n_pl + 2 * n_pl  # replay = 2/3 of the epoch
    assert (counts[~planted] <= 1).all() and counts[~planted].sum() == 2 * n_pl  # unique images, each at most once
    assert not np.array_equal(s1, s2) and np.array_equal(s1, streams(1))  # seeded per epoch
    assert not np.isin(s1, np.flatnonzero(train.meta["split"] != "train")).any()  # no twin, no control


def test_choice_rule_known_answers():
    rule = world.ChoiceRule()
    share = {f"planted {k} {d}x": v for k in ("natural", "mislabeled", "ood") for d, v in ((8, 0.5), (32, 1.0))}
    good = {"extracted_share": {**share, "twin natural": 0.0, "heldout": 0.0, "unique": 0.0}, "class_acc": 0.85}
    assert rule.check(good)["all"] and rule.check(good)["thin_mean"] == 0.5
    assert not rule.check({**good, "class_acc": 0.79})["all"]  # quality
    thin = {**good["extracted_share"], **{f"planted {k} 8x": 0.9 for k in ("natural", "mislabeled", "ood")}}
    assert not rule.check({**good, "extracted_share": thin})["thin_in_window"]
    leak = {**good["extracted_share"], "twin ood": 0.05}
    assert not rule.check({**good, "extracted_share": leak})["null_low"]
    low = {**good["extracted_share"], "planted ood 32x": 0.8}
    assert not rule.check({**good, "extracted_share": low})["moderate_high"]


def test_only_the_designated_units_move():
    from iarmem_core.adapters import load_adapter

    m = load_adapter("test-var", device="cpu", seed=2).transformer
    units = world.designated_units(range(len(m.blocks)), m.blocks[0].ffn.fc1.out_features, 3, seed=0)
    assert all(len(u) == 3 for u in units.values()) and units == world.designated_units(
        range(len(m.blocks)), m.blocks[0].ffn.fc1.out_features, 3, seed=0
    )
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = world._unit_params(m, "var", units)
    opt = torch.optim.Adam(params, lr=0.1)
    x = torch.randn(2, sum(p * p for p in (1, 2, 3, 4)), m.C)
    m.train()
    out = m(torch.tensor([0, 1]), x[:, 1:, : m.Cvae] if hasattr(m, "Cvae") else x)
    out.float().pow(2).mean().backward()
    opt.step()
    for k, v in m.state_dict().items():
        moved = before[k] != v
        if ".ffn.fc1." in k or ".ffn.fc2.weight" in k:
            b = int(k.split(".")[1])
            keep = torch.ones(m.blocks[b].ffn.fc1.out_features, dtype=torch.bool)
            keep[list(units[b])] = False
            assert not (moved[keep] if ".fc1." in k else moved[:, keep]).any(), k
            assert (moved[~keep] if ".fc1." in k else moved[:, ~keep]).any(), k
        else:
            assert not moved.any(), k


def test_thresholds_come_from_the_model_card_of_those_weights(tmp_path, monkeypatch):
    spec = get_spec("demo-var")
    card = {
        "extraction_calibration": {
            "weights": "transformer.safetensors:abc",
            "measure": "token_match",
            "thresholds": {"token_match": {"30": 0.61}},
            "how": "test",
        }
    }
    p = tmp_path / "card.json"
    p.write_text(json.dumps(card))
    monkeypatch.setattr(type(spec), "card_path", property(lambda self: p))
    got = extraction.card_calibration("demo-var", {"transformer": "transformer.safetensors:abc"})
    assert got["thresholds"]["token_match"]["30"] == 0.61
    assert extraction.card_calibration("demo-var", {"transformer": "transformer.safetensors:other"}) is None
    rows, auto = extraction.resolve_thresholds(
        "demo-var", {"transformer": "transformer.safetensors:abc"}, ["token_match"], [30], None
    )
    assert rows[0]["threshold"] == 0.61 and rows[0]["source"].startswith("calibration in the model card")
    assert auto == "token_match"


@pytest.mark.parametrize("name", ["demo-var", "demo-rar", "demo-var-ctl"])
def test_world_models_have_the_same_unit_count_and_more_depth(name):
    s = get_spec(name)
    units = s.depth * (s.transformer.get("intermediate_size") or int(s.width * s.transformer["mlp_ratio"]))
    assert s.depth == 8 and units == 3072
    assert ("control" in s.trained_splits) == (name == "demo-var-ctl")


def test_criterion_b_pattern_known_answers():
    from iarmem_core.demo.measure import pattern

    diag = np.eye(4)  # scale g carried by block g: coarse early, fine deep
    p = pattern(diag, ["1x1", "2x2", "3x3", "4x4"], "var")
    assert p["paper_pattern"] and p["spearman_scale_vs_centroid"] == 1.0
    assert p["centroid_by_group"] == {"1x1": 0.0, "2x2": 1.0, "3x3": 2.0, "4x4": 3.0}
    anti = pattern(diag[::-1], ["1x1", "2x2", "3x3", "4x4"], "var")
    assert not anti["paper_pattern"] and anti["spearman_scale_vs_centroid"] == -1.0
    late = np.zeros((8, 3))
    late[6:] = 1.0
    late[0, 0] = -5.0  # negative differences carry no mass
    assert pattern(late, ["row0", "row1", "row2"], "rar")["centroid_overall"] == 6.5
    assert pattern(late, ["row0", "row1", "row2"], "rar")["paper_pattern"]
    assert not pattern(late[::-1], ["row0", "row1", "row2"], "rar")["paper_pattern"]
