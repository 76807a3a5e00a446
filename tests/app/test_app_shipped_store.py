"""The shipped results (assets/store) are the ones the current code computes for the app's first view."""

from __future__ import annotations

import json

import pytest

from iarmem_app import config
from iarmem_core import data, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore

STALE = "assets/store is stale: run python scripts/precompute_demo_results.py and commit assets/store"


def test_index_lists_every_demo_model_and_stays_small():
    index = json.loads((config.SHIPPED_STORE / "index.json").read_text())
    models = {e["model"] for e in index["entries"] if e["kind"] == unitmem.KIND}
    assert set(config.quick_models()) <= models, STALE
    total = sum(f.stat().st_size for f in config.SHIPPED_STORE.rglob("*") if f.is_file())
    assert total < 24e6, f"the shipped store is {total / 1e6:.1f} MB; the demo assets' budget is 40 MB in all"
    on_disk = {d.name for d in (config.SHIPPED_STORE / "results").iterdir()}
    assert on_disk == {e["key"] for e in index["entries"]}, "assets/store/results holds entries not in index.json"


@pytest.mark.parametrize("name", config.quick_models())
def test_shipped_unitmem_key_matches_the_current_code(name):
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    cfg = unitmem.default_config(name, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    key = st_.key(unitmem.KIND, unitmem.job_spec(adapter, sel, cfg))
    assert st_.exists(key), f"{name}: no shipped UnitMem result under {key}. {STALE}"
    arrays, meta = st_.load(key)  # verifies every file's sha256
    assert meta["image_ids"] == list(sel.ids)
    assert arrays["unitmem_LGU"].shape[0] == adapter.n_blocks and arrays["unitmem_LGU"].shape[2] == adapter.n_units
    assert [g["name"] for g in meta["groups"]] == [g.name for g in adapter.position_groups(cfg.group_kinds)]


@pytest.mark.parametrize("name", config.quick_models())
def test_shipped_extraction_key_matches_the_current_code(name):
    from iarmem_core import extraction

    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    key = extraction.extraction_key(adapter, sel, extraction.ExtractionConfig(seed=0), store=st_)
    assert st_.exists(key), f"{name}: no shipped extraction result under {key}. {STALE}"
    res = extraction.load_extraction(st_, key)
    assert set(res.table["image_id"][res.table["split"] == "train"]) <= set(sel.ids)
    assert res.count()["candidates"] == len(
        res.table[(res.table["split"] == "train") & (res.table["prefix_tokens"] == res.meta["prefix_tokens"][0])]
    )


def test_reading_the_shipped_store_writes_nothing(tmp_path):
    import shutil

    ro = tmp_path / "store"
    shutil.copytree(config.SHIPPED_STORE, ro)
    for p in ro.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)
    ro.chmod(0o555)
    before = sorted(str(p) for p in ro.rglob("*"))
    st_ = ResultStore(ro, read_only=True)
    for e in json.loads((ro / "index.json").read_text())["entries"]:
        assert st_.exists(e["key"]) and st_.load(e["key"])[1]
    assert [r["key"] for r in st_.list()] and sorted(str(p) for p in ro.rglob("*")) == before


@pytest.mark.parametrize("name", config.quick_models())
def test_shipped_intervention_keys_match_the_current_code(name):
    """The Intervention page opens with numbers: the unedited quality samples, the default edit's measurement
    and the sweep are shipped under the keys the current code computes."""
    from iarmem_core import intervention

    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    um_key = unitmem.result_key(adapter, sel, unitmem.default_config(name, seed=0), st_)
    res0 = unitmem.UnitMemResult({}, {"store_key": um_key})
    qspec = intervention.quality_spec(
        adapter,
        None,
        n_samples=intervention.DEFAULT_N_SAMPLES,
        feature_space=None,
        reference_set=None,
        seed=0,
        sampling=None,
    )
    qkey = st_.key(intervention.QUALITY_KIND, qspec, intervention.QUALITY_VERSION)
    assert st_.exists(qkey), f"{name}: no shipped unedited quality under {qkey}. {STALE}"
    q = intervention.SampleFeatures.from_arrays(st_.load(qkey)[0])
    assert q.n == intervention.DEFAULT_N_SAMPLES
    edit = dict(top_percent=10.0, units=None, factor=0.5, op="fc1_scale", ranking="global", seed=0)
    mkey = intervention.measurement_key(adapter, res0, sel, st_, **edit)
    assert st_.exists(mkey), f"{name}: no shipped measurement of the default edit under {mkey}. {STALE}"
    r, es = intervention.load_measurement(*st_.load(mkey))
    assert r.stage == "full" and r.random_control.draws == intervention.DEFAULT_RANDOM_DRAWS
    assert es is not None and es.n_edits == 1 + intervention.DEFAULT_RANDOM_DRAWS
    assert r.extracted_after == int(es.counts()[0]) and r.extracted_before == int(es.extracted_before().sum())
    skey = intervention.sweep_key(adapter, res0, sel, st_, **{**intervention.sweep_defaults(), "seed": 0})
    assert st_.exists(skey), f"{name}: no shipped sweep under {skey}. {STALE}"


@pytest.mark.parametrize("name", config.quick_models())
def test_shipped_localization_and_dose_response_match_the_current_code(name):
    """ "Which units carry this image?" and the dose-response curves open with results: every extracted image's
    localization, their union and the curves are shipped under the keys the current code computes."""
    from iarmem_core import dose, localize

    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    lcfg = localize.LocalizeConfig(seed=0)
    ids = localize.extracted_ids(adapter, sel, lcfg, st_)  # from the shipped attack (nothing is recomputed)
    assert ids, f"{name}: the shipped attack extracts nothing"
    for image_id in ids:
        key = localize.localization_key(adapter, sel, image_id, lcfg, ids, st_)
        assert st_.exists(key), f"{name}: no shipped localization of {image_id}. {STALE}"
    allkey = localize.localize_all_key(adapter, sel, lcfg, ids, st_)
    meta = st_.load(allkey)[1]
    assert meta["n_extracted"] == len(ids) and meta["n_localized"] <= len(ids)
    um_key = unitmem.result_key(adapter, sel, unitmem.default_config(name, seed=0), st_)
    res0 = unitmem.UnitMemResult({}, {"store_key": um_key})
    dkey = dose.dose_response_key(adapter, sel, res0, dose.CurveConfig(localize=lcfg), st_)
    assert st_.exists(dkey), f"{name}: no shipped dose-response curves under {dkey}. {STALE}"
    d = st_.load(dkey)[1]
    assert d["extracted_before"] <= len(ids) and set(d["curves"]) == set(dose.SELECTIONS)
