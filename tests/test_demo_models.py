"""The shipped demo world: its models load from the bundled files, their cards match the registry and the weights,
and they give the known answers the world is built for (32x items come back from the attack's prefix, held-out
images and never-trained twins do not; the positive control differs from demo-var only in its designated units)."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from iarmem_core import data, extraction, intervention, metrics
from iarmem_core.adapters import load_adapter
from iarmem_core.demo import train as dt
from iarmem_core.demo import world
from iarmem_core.registry import ASSETS, get_spec, list_models

DEMOS = ["demo-var", "demo-var-ctl", "demo-rar"]
NATURAL = ["demo-var", "demo-rar"]

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def model(name: str):
    return load_adapter(name, device="cpu")


def card(name: str) -> dict:
    return json.loads((ASSETS / name / "card.json").read_text())


def _json(obj) -> object:
    return json.loads(json.dumps(obj))  # tuples -> lists, as the card stores them


def test_the_world_is_registered_with_bundled_files_within_the_budget():
    assert list_models(kind="demo") == DEMOS
    files = {ASSETS.parent / get_spec(n).bundled[c] for n in DEMOS for c in ("tokenizer", "transformer")}
    assert all(f.is_file() for f in files), files
    files |= {p for p in (ASSETS / "demo_data").iterdir() if p.is_file()}
    files |= {p for n in DEMOS for p in (ASSETS / n).iterdir() if p.is_file()}
    files |= set(ASSETS.glob("demo-fashion-cnn.*"))
    store = [p for p in (ASSETS / "store").rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files) + sum(p.stat().st_size for p in store)
    assert total <= 40e6, f"the demo assets are {total / 1e6:.1f} MB (budget 40 MB)"


@pytest.mark.parametrize("name", DEMOS)
def test_card_matches_the_registry_the_files_and_the_weights(name):
    m, spec, c = model(name), get_spec(name), card(name)
    assert m.identity["transformer"].startswith("transformer.safetensors:")  # the shipped file, not random
    assert c["model"] == name and c["family"] == spec.family
    assert c["sampling"] == _json(spec.sampling) and c["train_augmentation"] == spec.train_augmentation
    assert c["files"]["transformer"]["bytes"] == (ASSETS.parent / spec.bundled["transformer"]).stat().st_size
    # the calibrated thresholds are for exactly these weights
    cal = c["extraction_calibration"]
    assert cal["weights"] == m.identity["transformer"], "re-run `train-demo --only calibrate` after training"
    assert extraction.card_calibration(name, m.identity) is not None
    assert m.n_blocks == 8 and m.n_blocks * m.n_units == 3072


@pytest.mark.parametrize("name", NATURAL)
def test_the_shipped_epoch_is_the_one_the_rule_chose(name):
    c = card(name)
    choice = c["checkpoint_choice"]
    rule = world.ChoiceRule(**choice["rule"])
    points = {p["epoch"]: p for p in c["curve"]["points"]}
    chosen = points[choice["chosen_epoch"]]
    passing = [e for e, p in sorted(points.items()) if rule.check(p)["all"]]
    if passing:  # the first epoch that meets every part of the rule
        assert choice["chosen_epoch"] == passing[0] and "meets every part" in choice["why"]
    else:
        assert "no epoch" in choice["why"]
    share = chosen["extracted_share"]
    assert all(share[f"twin {k}"] <= rule.null_max for k in ("natural", "mislabeled", "ood"))
    assert share["heldout"] <= rule.null_max


def _token_match_from_prefix(m, ds: data.ImageSet, idx) -> np.ndarray:
    x, y = ds.images(idx, size=m.image_size), ds.labels_tensor(idx)
    toks = m.tokenize(x)
    p = extraction.default_prefix(m)
    gen = m.generate(y, prefix=toks, n_prefix=p, cfg=0.0, top_k=1)
    return metrics.score("token_match", tokens_a=m.flatten(gen), tokens_b=m.flatten(toks), token_start=p).numpy()


@pytest.mark.parametrize("name", NATURAL)
def test_32x_items_come_back_and_twins_and_heldout_images_do_not(name):
    m, c = model(name), card(name)
    thr = float(c["extraction_calibration"]["thresholds"]["token_match"][str(extraction.default_prefix(m))])
    allv = data.load_demo("all")
    meta = allv.meta
    top = np.flatnonzero((meta["role"] == "planted") & (meta["dose"] == 32) & (meta["kind"] != "control"))
    twins = np.flatnonzero((meta["role"] == "twin") & (meta["kind"] != "control"))[::3]
    held = np.flatnonzero(meta["split"] == "heldout")[::50]
    got = {
        k: extraction.is_extracted(_token_match_from_prefix(m, allv, i), thr)
        for k, i in (("32x", top), ("twin", twins), ("held-out", held))
    }
    assert got["32x"].mean() >= 0.9, got["32x"]
    assert not got["twin"].any() and not got["held-out"].any()


def test_the_positive_control_moved_only_its_designated_units():
    c = card("demo-var-ctl")
    units = {int(b): list(u) for b, u in c["designated_units"].items()}
    assert sum(len(u) for u in units.values()) == c["n_designated"] >= 1
    a = load_file(str(ASSETS / "demo-var" / "transformer.safetensors"))
    b = load_file(str(ASSETS / "demo-var-ctl" / "transformer.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        moved = a[k] != b[k]
        if ".ffn.fc1." in k or ".ffn.fc2.weight" in k:
            blk = int(k.split(".")[1])
            keep = torch.ones(moved.shape[0] if ".fc1." in k else moved.shape[1], dtype=torch.bool)
            keep[units.get(blk, [])] = False
            assert not (moved[keep] if ".fc1." in k else moved[:, keep]).any(), k
        else:
            assert not moved.any(), k
    # and the card's own measurement: the control canaries are extractable (the issue's >= 80%)
    last = c["curve"][-1]
    n, of = (
        last["extracted"]["control canary"] if "control canary" in last["extracted"] else last["extracted"]["control"]
    )
    assert n >= 0.8 * of


@pytest.mark.parametrize("name", DEMOS)
def test_class_conditional_samples_are_recognised(name):
    m = model(name)
    fnet = dt.load_demo_feature_net()
    labels = torch.arange(10).repeat_interleave(2)
    x = m.decode(m.generate(labels, seed=0, **intervention.sampling_kwargs(m)))
    assert metrics.class_accuracy(fnet, x, labels) >= 0.7
