"""Extraction: the training-data extraction attack as a job; gallery, threshold, counts vs ground truth."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import config, loaders, results, state, ui
from iarmem_core import figures

st.title("Extraction: can the model reproduce its training images?")
ui.explain(r"""
**The attack** (Kowalczuk et al.): score every training image by how often the model predicts its tokens
correctly (teacher-forced, no guidance); take the top candidates per class; give the model each candidate's
class and a short **prefix** of its true tokens (VAR: the first few whole scales; next-token: the first
tokens), and let it continue **greedily** (always the most likely token). Decode the result and compare it
with the tokenizer's reconstruction of the candidate.

**How to read it:** each pair is reconstruction (left) and generation (right), with their similarity. A
candidate counts as **extracted** when the similarity passes the threshold; drag the threshold and the counts
change at once (nothing is recomputed). On the demo the planted duplicates are the ground truth, and
held-out images (never trained on) give the false-positive rate.
""")


def _module():
    try:
        return importlib.import_module("iarmem_core.extraction")
    except ImportError:
        return None


def _load_result(mod, key: str):
    s = results.locate(key)
    return None if s is None else _cached(mod, str(s.root), key)


@st.cache_resource(max_entries=8, show_spinner=False)
def _cached(_mod, root: str, key: str):
    s = results.shipped_store() if root == str(results.shipped_store().root) else results.user_store()
    return _mod.load_extraction(s, key)


def _units_link(res_um, image_id: str, col) -> None:
    """Link from an extracted image to the unit that fires most for it (the Memorization page)."""
    if res_um is None or image_id not in res_um.meta["image_ids"]:
        return
    i = res_um.meta["image_ids"].index(image_id)
    best = None
    for g in res_um.meta["scale_groups"]:
        hits = np.argwhere(res_um.arrays["argmax_LGU"][:, g, :] == i)
        for li, u in hits:
            v = float(res_um.arrays["unitmem_LGU"][li, g, u])
            if best is None or v > best[0]:
                best = (v, int(res_um.meta["blocks"][li]), res_um.meta["groups"][g]["name"], int(u))
    if best is not None:
        col.page_link("app_pages/memorization.py", label=f"units: block {best[1]}, {best[2]}, unit {best[3]}",
                      query_params={"mem_block": str(best[1]), "mem_group": best[2], "mem_unit": str(best[3])})


def main() -> None:
    mod = _module()
    if mod is None:
        st.info("The extraction attack (iarmem_core.extraction, issue 6) is not in this build yet.")
        return
    adapter, mchoice = loaders.get_model()
    image_set, dchoice = loaders.get_data(adapter)
    demo = loaders.is_demo_data(dchoice)
    cfg = mod.ExtractionConfig(seed=mchoice.seed, heldout=demo)
    heldout = loaders.heldout_set() if demo else None
    cli = f"python -m iarmem_core extract {mchoice.cli_args()} {dchoice.cli_args()} --json"
    key = results.user_store().key(*mod.job_key_parts(adapter, image_set, cfg, heldout_set=heldout))
    res = _load_result(mod, key)
    results.job_panel(key, "extraction", lambda: mod.start_extraction(adapter, image_set, cfg,
                                                                      store=results.user_store(),
                                                                      heldout_set=heldout),
                      "Run the extraction attack", done=res is not None, widget_key="ex", allow_rerun=False)
    if res is None:
        st.caption(f"Or from a terminal: `{cli}`")
        return
    table: pd.DataFrame = res.table
    measures = [m for m in res.meta.get("measures", [res.meta["similarity"]]) if m in table.columns]
    if state.get("ex_measure") not in measures:
        state.set_many(ex_measure=res.meta["similarity"])
    c1, c2 = st.columns([1, 3])
    state.widget(c1.selectbox, "ex_measure", "Similarity", measures)
    measure = state.get("ex_measure")
    default_t = float(res.meta["threshold"]) if measure == res.meta["similarity"] else float(
        res.meta.get("thresholds", {}).get(measure, 0.5))
    if state.get("ex_threshold") < 0:
        state.set_many(ex_threshold=round(default_t, 3))
    lo, hi = float(min(0.0, table[measure].min())), float(max(1.0, table[measure].max()))
    state.widget(c2.slider, "ex_threshold", f"Threshold on {measure} (calibrated: {default_t:.3f})", lo, hi, step=0.005)
    thr = float(state.get("ex_threshold"))
    counts = res.count(threshold=thr, similarity=measure)

    # the counts, against the planted ground truth on the demo
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Extracted", f"{counts['extracted']} of {counts['candidates']}")
    if counts.get("recall_planted") is not None and demo:
        n_pl = int(table["planted"].fillna(False).astype(bool).sum()) if "planted" in table else 0
        got_pl = int(round(counts["recall_planted"] * n_pl))
        m2.metric("Planted extracted", f"{got_pl} of {n_pl}")
        m3.metric("Precision (planted)", f"{counts.get('precision_planted') or 0:.2f}")
    if counts.get("heldout_n"):
        m4.metric("Held-out 'extracted'", f"{int(round(counts['heldout_false_rate'] * counts['heldout_n']))} of "
                                          f"{counts['heldout_n']}")
    st.caption(f"Similarity {measure}, threshold {thr:.3f}, prefix {res.meta.get('prefix_tokens')} tokens, greedy, "
               f"no CFG. Result {key}, {results.source_label(key)}.")
    sim_title = f"{mchoice.name}: similarity of generation vs reconstruction"
    ui.plotly(figures.similarity_histogram(table, measure, thr, sim_title), table.drop(
        columns=[c for c in table.columns if table[c].dtype == object and c not in ("image_id", "split")]),
        sim_title, key="ex_hist", cli=cli)

    # the gallery
    st.subheader("Reconstruction vs generation")
    state.widget(st.radio, "ex_show", "Show", ["extracted", "all", "planted", "held-out"], horizontal=True)
    ext = table[measure] > thr
    show = {"extracted": ext, "all": pd.Series(True, index=table.index),
            "planted": table.get("planted", pd.Series(False, index=table.index)).fillna(False).astype(bool),
            "held-out": table.get("split", pd.Series("", index=table.index)) == "heldout"}[state.get("ex_show")]
    rows = table[show.to_numpy()].sort_values(measure, ascending=False).head(24)
    _, res_um = results.unitmem_result(adapter, image_set, config.unitmem_config(mchoice.name, mchoice.seed))
    cols = st.columns(4)
    for k, (i, r) in enumerate(rows.iterrows()):
        col = cols[k % 4]
        pair = np.concatenate([res.recon_images[i], res.generated_images[i]], axis=1)
        tag = " planted" if bool(r.get("planted") or False) else ""
        col.image(figures.upscale(pair, 128), width="stretch",
                  caption=f"{r['image_id']}{tag}: {measure} {r[measure]:.3f} {'extracted' if r[measure] > thr else ''}")
        _units_link(res_um, str(r["image_id"]), col)
    if rows.empty:
        st.caption("No candidate in this view at this threshold.")


with ui.guard("The extraction page"):
    main()
