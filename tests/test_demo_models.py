"""The shipped demo models: they load from the bundled files, their cards match, and they give the known answers
the demo is built for (planted 64x duplicates come back from a short prefix, held-out images do not)."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

from iarmem_core import data, intervention
from iarmem_core.adapters import load_adapter
from iarmem_core.demo import train as dt
from iarmem_core.metrics import class_accuracy, ssim
from iarmem_core.registry import ASSETS, get_spec, list_models

DEMOS = ["demo-var", "demo-rar"]


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def model(name: str):
    return load_adapter(name, device="cpu")


def card(name: str) -> dict:
    return json.loads((ASSETS / name / "card.json").read_text())


def _json(obj) -> object:
    return json.loads(json.dumps(obj))  # tuples -> lists, as the card stores them


def test_demo_models_are_registered_with_bundled_files():
    assert list_models(kind="demo") == DEMOS
    total = 0
    for name in DEMOS:
        spec = get_spec(name)
        for comp in ("tokenizer", "transformer"):
            f = ASSETS.parent / spec.bundled[comp]
            assert f.is_file(), f
            total += f.stat().st_size
    total += sum(p.stat().st_size for p in (ASSETS / "demo_data").iterdir())
    total += (ASSETS / dt.FEATURE_NET_FILE).stat().st_size
    assert total <= 30e6  # the budget for weights and data together


@pytest.mark.parametrize("name", DEMOS)
def test_demo_model_loads_bundled_weights_and_matches_its_card(name):
    m = model(name)
    spec, c = m.spec, card(name)
    # loaded from the shipped files, not random
    assert not str(m.identity["transformer"]).startswith("random")
    assert m.identity["transformer"].startswith("transformer.safetensors:")
    # card <-> registry <-> files
    assert c["model"] == name and c["family"] == spec.family
    assert c["architecture"]["tokenizer"] == _json(spec.tokenizer)
    assert c["architecture"]["transformer"] == _json(spec.transformer)
    assert c["sampling"] == _json(spec.sampling) and c["train_augmentation"] == spec.train_augmentation
    assert c["architecture"]["transformer_params"] == sum(p.numel() for p in m.transformer.parameters())
    assert c["architecture"]["tokenizer_params"] == sum(p.numel() for p in m.tokenizer.parameters())
    for comp in ("tokenizer", "transformer"):
        assert c["files"][comp]["bytes"] == (ASSETS.parent / spec.bundled[comp]).stat().st_size
    # the card's planted list is the bundle's
    planted = {p["id"]: p["count"] for p in data.demo_manifest()["planted"]}
    assert {p["id"]: p["count"] for p in c["data"]["planted"]} == planted
    groups = c["measurements"]["groups"]
    assert {g: groups[g]["n"] for g in ("planted_4x", "planted_16x", "planted_64x")} == {
        "planted_4x": 10,
        "planted_16x": 10,
        "planted_64x": 10,
    }
    # the chosen checkpoint is the last point of the stored curve
    assert c["curve"]["points"][-1]["epoch"] == c["training"]["transformer"]["epochs"]
    # several blocks, as the UnitMem pages need
    assert m.n_blocks == spec.depth >= 6


def _reproduced(m, images, labels, n_prefix: int, threshold: float) -> torch.Tensor:
    toks = m.tokenize(images)
    gen = m.generate(labels, prefix=toks, n_prefix=n_prefix, cfg=0.0, top_k=1)
    return ssim(m.decode(gen), m.decode(toks)) > threshold


@pytest.mark.parametrize("name", DEMOS)
def test_planted_64x_images_come_back_and_heldout_images_do_not(name):
    m, c = model(name), card(name)
    meas = c["measurements"]
    planted = data.load_demo("planted")
    top = [i for i in range(len(planted)) if planted.meta["count"][i] == 64]
    held = data.load_demo("heldout")
    hx = held.images(range(10))
    rep_planted = _reproduced(
        m, planted.images(top), planted.labels_tensor(top), meas["main_prefix_tokens"], meas["threshold"]
    )
    rep_held = _reproduced(m, hx, held.labels_tensor(range(10)), meas["main_prefix_tokens"], meas["threshold"])
    assert rep_planted.float().mean() >= 0.8, rep_planted
    assert not rep_held.any(), rep_held
    # and the card says the same of all of them
    assert meas["groups"]["planted_64x"]["reproduced"] >= 0.8
    assert meas["groups"]["heldout"]["reproduced"] <= 0.02


@pytest.mark.parametrize("name", DEMOS)
def test_class_conditional_samples_are_recognised(name):
    m = model(name)
    fnet = dt.load_demo_feature_net()
    labels = torch.arange(10).repeat_interleave(2)
    x = m.decode(m.generate(labels, seed=0, **intervention.sampling_kwargs(m)))
    assert class_accuracy(fnet, x, labels) >= 0.7
