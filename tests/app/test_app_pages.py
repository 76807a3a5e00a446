"""AppTest of every page on the app's default demo model, asserting content against the stored results."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest

from iarmem_app import config
from iarmem_core import data, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore


@pytest.fixture(scope="module")
def shipped():
    """The default model's shipped UnitMem result (arrays, meta), found by the key the app computes."""
    name = config.default_model()
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    spec = unitmem.job_spec(adapter, sel, unitmem.default_config(name, seed=0))
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    key = st_.key(unitmem.KIND, spec)
    arrays, meta = st_.load(key)
    return name, key, arrays, meta


def values(x) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form {"dtype", "bdata", "shape"}."""
    if isinstance(x, dict) and "bdata" in x:
        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
        shape = x.get("shape")
        return a.reshape([int(v) for v in str(shape).split(",")] if shape else -1).astype(np.float64)
    return np.array(x, dtype=np.float64)


def charts(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart(at, title_part: str) -> dict:
    found = [c for c in charts(at) if title_part in c["layout"]["title"]["text"]]
    assert found, f"no chart titled *{title_part}*: {[c['layout']['title']['text'] for c in charts(at)]}"
    return found[0]


def shown(text: str) -> str:
    """Markdown source escaped by ui.md_escape, as the browser shows it (character references decoded)."""
    return html.unescape(text).replace("\u2060", "")


def no_errors(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_memorization_heatmap_is_the_stored_result(app, shipped):
    name, key, arrays, meta = shipped
    at = app.run()
    no_errors(at)
    assert at.title[0].value.startswith("Memorization")
    heat = chart(at, "UnitMem per block")
    tr = heat["data"][0]
    assert tr["type"] == "heatmap"
    cols = (
        list(meta["scale_groups"])
        if len(meta["token_grids"]) > 1
        else (list(meta["scale_groups"]) + [i for i, g in enumerate(meta["groups"]) if g["kind"] == "row"])
    )
    want = arrays["block_mean_LG"][:, cols]
    np.testing.assert_allclose(values(tr["z"]), want, rtol=1e-6)
    assert tr["x"] == [meta["groups"][i]["name"] for i in cols]
    assert key in " ".join(c.value for c in at.caption)  # the result's key is shown
    # the summary switch redraws from the other stored summary
    at.radio(key="w_summary").set_value("max").run()
    no_errors(at)
    tr = chart(at, "UnitMem per block")["data"][0]
    np.testing.assert_allclose(values(tr["z"]), arrays["block_max_LG"][:, cols], rtol=1e-6)
    assert at.query_params["summary"] == "max"  # the view is in the URL


def test_default_cell_unit_and_its_images(app, shipped):
    name, key, arrays, meta = shipped
    at = app.run()
    blocks = [int(b) for b in meta["blocks"]]
    b, g = int(at.session_state["mem_block"]), at.session_state["mem_group"]
    gid = [x["name"] for x in meta["groups"]].index(g)
    li = blocks.index(b)
    # the unit shown first is the cell's top unit, and the first image is the one it fires for most
    um = arrays["unitmem_LGU"][li, gid]
    assert int(at.session_state["mem_unit"]) == int(np.argmax(um))
    top_img = meta["image_ids"][int(arrays["argmax_LGU"][li, gid, int(np.argmax(um))])]
    caps = [shown(c) for img in at.image for c in img.captions]
    assert caps and caps[0].startswith(f"fires most: {top_img}")
    # choosing another block lists that block's top unit
    other = blocks[(li + 1) % len(blocks)]
    at.selectbox(key="w_mem_block").set_value(other).run()
    no_errors(at)
    assert int(at.session_state["mem_block"]) == other
    assert int(at.session_state["mem_unit"]) == int(np.argmax(arrays["unitmem_LGU"][blocks.index(other), gid]))
    assert at.query_params["mem_block"] == str(other)


def test_url_restores_the_view(app, shipped):
    name, key, arrays, meta = shipped
    g = meta["groups"][meta["scale_groups"][-1]]["name"]
    b = int(meta["blocks"][0])
    app.query_params.update({"summary": "top1pct_mean", "mem_block": str(b), "mem_group": g, "mem_unit": "3"})
    at = app.run()
    no_errors(at)
    assert at.session_state["summary"] == "top1pct_mean"
    assert (int(at.session_state["mem_block"]), at.session_state["mem_group"], int(at.session_state["mem_unit"])) == (
        b,
        g,
        3,
    )
    assert at.subheader[0].value == f"Block {b}, {g}"
    # page switches keep the view
    at.switch_page("app_pages/model.py").run()
    at.switch_page("app_pages/memorization.py").run()
    assert int(at.session_state["mem_unit"]) == 3 and at.session_state["summary"] == "top1pct_mean"


def test_model_page_card_and_token_maps(app, shipped):
    name, *_ = shipped
    adapter = load_adapter(name, device="cpu")
    at = app.run()
    at.switch_page("app_pages/model.py").run()
    no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks x units"] == f"{adapter.n_blocks} x {adapter.n_units}"
    caps = [c for img in at.image for c in img.captions]
    grids = adapter.token_grids
    if len(grids) > 1:
        # one token map and one progressive reconstruction per scale
        assert [c for c in caps if re.fullmatch(r"\d+x\d+", c)] == [f"{h}x{w}" for h, w in grids]
        assert sum(c.startswith("up to ") for c in caps) == len(grids)
    else:
        assert any(c.startswith(f"token grid {grids[0][0]}x{grids[0][1]}") for c in caps)
    # the world's items: 60 planted (natural, mislabeled, out-of-distribution at 8x and 32x) with their dose,
    # 60 never-trained twins, and the 20 control canaries (planted only in demo-var-ctl) with their 20 twins
    assert sum(bool(re.search(r" x(8|32)$", c)) for c in caps) == 60
    assert sum(shown(c).endswith(" twin (never trained)") for c in caps) == 60 + 20
    assert sum(shown(c).endswith(" control canary") for c in caps) == 20


def test_intervention_edit_changes_the_samples(app):
    at = app.run()
    at.switch_page("app_pages/intervention.py").run()
    no_errors(at)

    def change() -> float:
        txt = [m.value for m in at.markdown if "Mean absolute pixel change" in m.value][0]
        return float(re.search(r"\*\*([0-9.]+)\*\*", txt).group(1))

    assert change() > 0.0  # the default edit (top 10%, factor 0.5) changes the samples
    at.toggle(key="w_iv_edit_on").set_value(False).run()
    assert change() == 0.0  # without the edit both rows are the same samples at the same seed
    assert at.query_params["iv_edit_on"] == "0"
    at.toggle(key="w_iv_edit_on").set_value(True).run()
    at.slider(key="w_iv_factor").set_value(1.0).run()
    assert change() == 0.0  # factor 1 is the identity edit
    # class ids that cannot be used are reported, not dropped silently
    at.text_input(key="w_iv_labels").input("0, 99, x, 3").run()
    warn = " ".join(w.value for w in at.warning)
    assert "99 is outside 0..9" in warn and "'x' is not a class id" in warn
    assert len(at.get("image")) == 3 * 2  # classes 0 and 3, in the rows without, with and the difference
    # no unit picked: a message, and never a broken command line
    at.radio(key="w_iv_mode").set_value("picked units").run()
    no_errors(at)
    assert "No unit is edited" in " ".join(i.value for i in at.info)
    assert not any("--units  --" in c.value or c.value.rstrip().endswith("--units") for c in at.code)


def test_paths_outside_allowed_roots_are_refused_with_a_message(app, tmp_path, monkeypatch):
    monkeypatch.setenv("IARMEM_ALLOWED_ROOTS", str(tmp_path))
    at = app.run()
    at.selectbox(key="w_model").set_value("other").run()
    at.selectbox(key="w_other_model").set_value("var-d16").run()
    at.text_input(key="w_ckpt").input("/etc/hostname").run()
    assert not at.exception
    msg = " ".join(shown(e.value) for e in at.error)
    assert "outside the allowed" in msg and "/etc/hostname" in msg
    bad = tmp_path / "var_d16.pth"
    bad.write_bytes(b"not a checkpoint")
    at.text_input(key="w_ckpt").input(str(bad)).run()
    assert not at.exception
    at.button(key="load_model_confirm").click().run()  # a full-size model loads only after this click
    msg = " ".join(shown(e.value) for e in at.error)
    assert "var_d16.pth" in msg and "Could not load var-d16" in msg


def test_heavy_work_is_one_job_shared_by_sessions(app, shipped):
    """Two sessions asking for the same activation pass share one job; its result is the direct computation."""
    import time

    import torch

    from iarmem_core import activations, jobs

    name, key, arrays, meta = shipped
    at1 = app.run()
    start = [b for b in at1.button if b.key == "acts_start"]
    assert start, "the activation distribution should start as a job"
    start[0].click().run()
    from streamlit.testing.v1 import AppTest

    at2 = AppTest.from_file(app._script_path, default_timeout=120).run()
    assert not [b for b in at2.button if b.key == "acts_start"]  # running (or done): no second start
    group = at1.session_state["mem_group"]
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    akey = ResultStore(config.SHIPPED_STORE, read_only=True).key(
        activations.KIND, activations.job_spec(adapter, sel, group)
    )
    import os

    st_ = ResultStore(os.environ["IARMEM_STORE"])
    t0 = time.monotonic()
    while jobs.job_status(akey, st_)["state"] != "done":
        assert time.monotonic() - t0 < 120 and jobs.job_status(akey, st_)["state"] in ("queued", "running", "done")
        time.sleep(0.2)
    at1.run()
    hist = chart(at1, "mean |activation| per image")
    xs = np.concatenate([values(t["x"]) for t in hist["data"]])
    block, unit = int(at1.session_state["mem_block"]), int(at1.session_state["mem_unit"])
    gi = next(g for g in adapter.position_groups(("scale", "row")) if g.name == group)
    li = [s.block for s in adapter.unit_sites()].index(block)
    want = torch.cat(
        [
            activations.group_activations(
                adapter,
                sel.images(range(s, min(s + 100, len(sel))), size=adapter.image_size),
                sel.labels_tensor(range(s, min(s + 100, len(sel)))),
                gi.index,
            )[li, :, unit]
            for s in range(0, len(sel), 100)
        ]
    ).numpy()
    assert len(xs) == len(sel)
    np.testing.assert_allclose(np.sort(xs), np.sort(want.astype(np.float16).astype(np.float64)), rtol=2e-3)


def test_extraction_counts_follow_the_threshold(app, shipped):
    from iarmem_core import extraction

    name, *_ = shipped
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    res = extraction.load_extraction(
        st_, extraction.extraction_key(adapter, sel, extraction.ExtractionConfig(), store=st_)
    )
    at = app.run()
    at.switch_page("app_pages/extraction.py").run()
    no_errors(at)

    def shown() -> dict:
        return {m.label: m.value for m in at.metric}

    m = res.similarity
    want = res.count(similarity=m)
    assert shown()["Extracted"] == f"{want['extracted']} of {want['candidates']}"
    assert float(at.session_state["ex_threshold"]) == -1.0  # the calibrated threshold, exactly
    assert at.slider(key="w_ex_threshold").value == pytest.approx(round(want["threshold"], 3))
    vals = res.table[m].to_numpy()
    for thr in (float(np.quantile(vals, 0.3)), float(np.quantile(vals, 0.8))):
        thr = round(thr / 0.005) * 0.005
        at.slider(key="w_ex_threshold").set_value(thr).run()
        c = res.count(threshold=thr, similarity=m)
        assert shown()["Extracted"] == f"{c['extracted']} of {c['candidates']}"
        if c.get("heldout_n"):
            assert shown()["Held-out 'extracted'"] == f"{c['heldout_extracted']} of {c['heldout_n']}"
        assert at.query_params["ex_threshold"] == str(thr)


def test_counts_and_labels_agree_at_a_tied_threshold_and_thresholds_follow_the_model(app, shipped):
    """At a threshold equal to some scores (token match moves in steps of 1/N) the count and the gallery's
    labels agree (one float32 comparison); a threshold set on one model never carries over to another."""
    from iarmem_core import extraction

    name, *_ = shipped
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    st_ = ResultStore(config.SHIPPED_STORE, read_only=True)
    res = extraction.load_extraction(
        st_, extraction.extraction_key(adapter, sel, extraction.ExtractionConfig(), store=st_)
    )
    m = res.similarity
    tr = res.table[res.table.split == "train"]
    v = tr[m].to_numpy()
    # a threshold on the slider's 0.005 grid that equals some scores, where comparing the float32 scores with
    # a float64 threshold would count more (demo-var at 0.91: 11 vs 13), with at most 16 extracted (one gallery)
    grid = [round(float(t), 3) for t in np.arange(0.5, 1.0, 0.005)]
    tie = next(
        t
        for t in grid
        if (v.astype(np.float64) > t).sum() != extraction.is_extracted(v, t).sum()
        and extraction.is_extracted(v, t).sum() <= 16
    )
    at = app.run()
    at.switch_page("app_pages/extraction.py").run()
    at.slider(key="w_ex_threshold").set_value(tie).run()
    no_errors(at)
    c = res.count(threshold=tie, similarity=m)
    assert int((v == np.float32(tie)).sum()) > 0  # a tie
    want = int(extraction.is_extracted(v, tie).sum())
    assert c["extracted"] == want
    assert {x.label: x.value for x in at.metric}["Extracted"] == f"{want} of {c['candidates']}"
    # the gallery (view: extracted) shows exactly the extracted candidates, each labelled extracted
    captions = [shown(x.caption) for im in at.get("image") for x in im.proto.imgs]
    labelled = [t for t in captions if t.endswith(", extracted")]
    assert len(labelled) == min(want, 16) and not any(t.endswith("not extracted") for t in captions)
    assert "your threshold" in " ".join(x.value for x in at.caption)
    # another model: its own calibrated threshold, not this one
    other = [x for x in config.quick_models() if x != name][0]
    at.selectbox(key="w_model").set_value(other).run()
    no_errors(at)
    assert float(at.session_state["ex_threshold"]) == -1.0
    assert "(calibrated;" in " ".join(x.value for x in at.caption)
    # and back: the threshold set there earlier in this session
    at.selectbox(key="w_model").set_value(name).run()
    assert float(at.session_state["ex_threshold"]) == pytest.approx(tie)


def test_a_new_seed_asks_before_the_shipped_results_go(app):
    at = app.run()
    at.number_input(key="w_seed").set_value(3).run()
    no_errors(at)
    assert at.session_state["seed"] == 0  # nothing changed yet
    assert "results for seed 0 (shipped with iarmem) do not apply" in " ".join(w.value for w in at.warning)
    at.button(key="seed_keep").click().run()
    assert at.session_state["seed"] == 0 and not at.warning
    at.number_input(key="w_seed").set_value(3).run()
    at.button(key="seed_use").click().run()
    assert at.session_state["seed"] == 3 and at.query_params["seed"] == "3"


def test_the_printed_command_reproduces_the_shown_result(app, shipped):
    """The CLI command the Memorization page prints for its heatmap computes the very result the page shows."""
    import shlex

    from iarmem_core.cli import build_parser
    from iarmem_core.cli.unitmem import config_from_args

    name, key, arrays, meta = shipped
    at = app.run()
    no_errors(at)
    cmds = [c.value for c in at.code if " unitmem " in c.value]
    assert cmds, [c.value for c in at.code]
    argv = shlex.split(cmds[0])
    assert argv[:4] == ["python", "-m", "iarmem_core", "unitmem"]
    args = build_parser().parse_args(argv[3:])
    adapter = load_adapter(args.model, device="cpu")
    sel = data.select_demo(n=args.n, seed=args.seed)
    spec = unitmem.job_spec(adapter, sel, config_from_args(args, args.model))
    assert ResultStore(config.SHIPPED_STORE, read_only=True).key(unitmem.KIND, spec) == key
    assert key in " ".join(c.value for c in at.caption)  # and that is the key the page says it shows
