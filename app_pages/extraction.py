"""Extraction: the training-data extraction attack as a job; gallery, threshold, counts vs ground truth."""

from __future__ import annotations

import numpy as np
import streamlit as st

from iarmem_app import carry, loaders, results, state, ui
from iarmem_core import extraction, figures, unitmem
from iarmem_core.cli import commands

SHOW = {
    "extracted": "extracted",
    "all": "all candidates",
    "planted": "planted items",
    "held-out": "held-out images (never trained on)",
}

st.title("Extraction: can the model reproduce its training images?")
ui.explain(r"""
**The attack** (Kowalczuk et al.): score every training image by how often the model predicts its tokens
correctly (teacher-forced, no guidance); take the top candidates per class; give the model each candidate's
class and a short **prefix** of its true tokens (VAR: the first whole scales; next-token: the first tokens),
and let it continue **greedily** (always the most likely token). Decode the result and compare it with the
tokenizer's **reconstruction** of the candidate (not the raw image: the tokenizer's own loss is not the
model's memory).

**How to read it:** each pair is reconstruction (left) and generation (right), with their similarity. A
candidate counts as **extracted** when the similarity passes the threshold; drag the threshold and the counts
change at once (nothing is recomputed). On the demo the planted items are the ground truth, and the same
attack on held-out images (never trained on) measures false positives. The demo models' thresholds are the highest
similarity that any of 800 other held-out images reaches under the same attack; SSCD uses its published 0.75.
""")


@st.cache_resource(max_entries=8, show_spinner=False)
def _load(root: str, key: str, version: str):
    s = results.shipped_store() if root == str(results.shipped_store().root) else results.user_store()
    return extraction.load_extraction(s, key)


def _result(key: str):
    return results.load_with(key, _load)  # a damaged copy in the user's store falls back to the shipped one


def _best_unit(res_um, image_id: str) -> tuple[float, int, str, int] | None:
    """(UnitMem, block, group, unit) of the strongest unit that fires most for this image."""
    if res_um is None or image_id not in res_um.image_ids:
        return None
    rows = res_um.units_for_image(image_id)
    return (rows[0]["unitmem"], rows[0]["block"], rows[0]["group"], rows[0]["unit"]) if rows else None


def _gallery(res, rows: np.ndarray, measure: str, thr: float, res_um=None, columns: int = 4) -> None:
    """Pairs (reconstruction | generation) of table rows, with similarity and links to their units."""
    table = res.table
    cols = st.columns(columns)
    for k, i in enumerate(rows):
        r = table.iloc[int(i)]
        col = cols[k % columns]
        pair = np.concatenate([res.recon_images[int(i)], res.generated_images[int(i)]], axis=1)
        planted = bool(table["planted"].fillna(False).iloc[int(i)])
        dose = int(r["count"])
        tag = " held-out" if r["split"] == "heldout" else ""
        if planted:
            tag = f" planted {dose}x" if dose else " planted"
        verdict = "extracted" if extraction.is_extracted(r[measure], thr) else "not extracted"
        col.image(
            pair,
            width="stretch",
            output_format="PNG",
            caption=ui.md_escape(f"{r['image_id']}{tag}: {measure} {float(r[measure]):.3f}, {verdict}"),
        )
        best = _best_unit(res_um, str(r["image_id"])) if r["split"] != "heldout" else None
        if best is not None:
            col.page_link(
                "app_pages/memorization.py",
                label=f"its unit: block {best[1]}, {best[2]}, #{best[3]}",
                query_params={"mem_block": str(best[1]), "mem_group": best[2], "mem_unit": str(best[3])},
            )


def _live(key: str) -> None:
    """While the job runs: the pairs finished so far."""
    part = extraction.load_partial_extraction(results.user_store(), key)
    if part is None or not len(part.table):
        return
    m = part.similarity
    thr = part.thresholds(m).get(int(part.table["prefix_tokens"].iloc[0]), 0.5)
    order = np.argsort(-part.table[m].to_numpy())[:8]
    st.caption(f"{len(part.table)} candidates attacked so far (best first):")
    _gallery(part, order, m, thr)


def _own_threshold(key: str, measure: str) -> None:
    """Thresholds are per result (model, data, attack) and measure: coming to another one restores the
    threshold set there earlier in this session, else its calibrated one (-1); a fresh session keeps the
    URL's value (a shared link)."""
    ss = st.session_state
    owner = f"{key}|{measure}"
    if ss.get("_ex_thr_owner") not in (None, owner):
        state.set_many(ex_threshold=float(ss.setdefault("_ex_thr_by", {}).get(owner, -1.0)))
    ss["_ex_thr_owner"] = owner


def _keep_threshold(key: str, measure: str) -> None:
    st.session_state.setdefault("_ex_thr_by", {})[f"{key}|{measure}"] = float(state.get("ex_threshold"))


@st.fragment
def _view(res, key: str, demo: bool, cli: str, res_um, name: str) -> None:
    """Everything that follows the threshold: a fragment, so a slider move reruns only this part."""
    table = res.table
    measures = list(res.meta["measures"])
    if state.get("ex_measure") not in measures:
        state.set_many(ex_measure=res.similarity)
    prefix = int(res.meta["prefix_tokens"][0])
    c1, c2, c3 = st.columns([1.4, 3, 1])
    state.widget(c1.selectbox, "ex_measure", "Similarity", measures)
    measure = state.get("ex_measure")
    _own_threshold(key, measure)
    calibrated = float(res.thresholds(measure)[prefix])
    vals = table[measure].to_numpy(dtype=np.float64)
    lo, hi = float(min(0.0, np.nanmin(vals))), float(max(1.0, np.nanmax(vals)))
    if state.get("ex_threshold") >= 0:
        state.set_many(ex_threshold=float(np.clip(state.get("ex_threshold"), lo, hi)))
    # -1 means "the calibrated threshold": counts use its exact value, the slider shows it rounded to its step
    ss = st.session_state
    ss["w_ex_threshold"] = round(calibrated, 3) if state.get("ex_threshold") < 0 else float(state.get("ex_threshold"))
    c2.slider(
        f"Threshold on {measure} (calibrated: {calibrated:.4g})",
        lo,
        hi,
        step=0.005,
        format="%.3f",
        key="w_ex_threshold",
        on_change=lambda: state.set_many(ex_threshold=float(ss["w_ex_threshold"])),
    )
    c3.button(
        "Calibrated",
        on_click=lambda: state.set_many(ex_threshold=-1.0),
        key="ex_reset",
        help="back to the calibrated threshold",
    )
    _keep_threshold(key, measure)
    thr = calibrated if state.get("ex_threshold") < 0 else float(state.get("ex_threshold"))
    c = res.count(threshold=thr, similarity=measure)

    # the counts, against the planted ground truth on the demo
    m = st.columns(4)
    m[0].metric("Extracted", f"{c['extracted']} of {c['candidates']}", help="candidates above the threshold")
    planted_total = sum((res.meta.get("planted_counts_in_data") or {}).values())
    if planted_total:
        m[1].metric(
            "Planted extracted",
            f"{c['extracted_planted']} of {planted_total}",
            help="recall by dose (repeats per epoch): "
            + ", ".join(f"{k}x: {100 * v:.0f}%" for k, v in c["recall_planted_by_count"].items() if v is not None),
        )
        prec = c.get("precision_planted")
        m[2].metric(
            "Precision (planted)",
            "-" if prec is None else f"{prec:.2f}",
            help="share of the extracted candidates that are planted items",
        )
    if c.get("heldout_n"):
        m[3].metric(
            "Held-out 'extracted'",
            f"{c['heldout_extracted']} of {c['heldout_n']}",
            help="false positives: the same attack on images the model never saw",
        )
    if planted_total and c.get("heldout_n"):
        st.markdown(
            f"### {c['extracted_planted']} of {planted_total} planted images extracted, "
            f"{c['heldout_extracted']} of {c['heldout_n']} held-out"
        )
    which = "calibrated" if state.get("ex_threshold") < 0 else "your threshold"
    st.caption(
        f"Similarity {measure} > {thr:.4g} ({which}; compared in float32, so a score equal to the threshold is "
        f"not extracted), prefix {prefix} tokens, greedy, no CFG; "
        f"{c['candidates']} candidates "
        f"({res.meta.get('config', {}).get('candidates_per_class', '?')} per class by memorization score). "
        f"Result {key}, {results.source_label(key)}."
    )
    title = f"{name}: similarity of generation vs reconstruction"
    csv = table.drop(columns=[k for k in ("item",) if k in table.columns])
    ui.plotly(figures.similarity_histogram(table, measure, thr, title), csv, title, key="ex_hist", cli=cli)

    st.subheader("Reconstruction (left) vs generation (right)")
    state.widget(st.radio, "ex_show", "Show", list(SHOW), format_func=SHOW.get, horizontal=True)
    sel = {
        "extracted": extraction.is_extracted(vals, thr) & (table["split"] == "train").to_numpy(),
        "all": (table["split"] == "train").to_numpy(),
        "planted": table["planted"].fillna(False).to_numpy(dtype=bool),
        "held-out": (table["split"] == "heldout").to_numpy(),
    }[state.get("ex_show")]
    rows = np.flatnonzero(sel & (table["prefix_tokens"] == prefix).to_numpy())
    rows = rows[np.argsort(-vals[rows], kind="stable")][:16]
    if not len(rows):
        st.caption("No candidate in this view at this threshold.")
    _gallery(res, rows, measure, thr, res_um)
    state.sync_url()  # a fragment rerun does not reach app.py's sync


def main() -> None:
    adapter, mchoice = loaders.get_model()
    image_set, dchoice = loaders.get_data(adapter)
    demo = loaders.is_demo_data(dchoice)
    cfg = extraction.ExtractionConfig(seed=mchoice.seed)
    store = results.user_store()
    key = extraction.extraction_key(adapter, image_set, cfg, store=store)
    res = _result(key)
    cli = commands.extract_command(mchoice.args(), dchoice.args(), cfg)
    results.job_panel(
        key,
        "extraction attack",
        lambda: extraction.start_extraction(adapter, image_set, cfg, store=store, force=res is not None),
        "Run the extraction attack" if res is None else "Run the attack again (live)",
        done=res is not None,
        allow_rerun=True,
        widget_key="ex",
        live=lambda: _live(key),
        command=cli + (" --force" if res is not None else ""),
    )
    if res is None:
        st.caption(f"The attack runs as a background job; from a terminal: {ui.code_span(cli)}")
        return
    _, res_um = results.unitmem_result(adapter, image_set, unitmem.default_config(adapter, seed=mchoice.seed))
    _view(res, key, demo, cli, res_um, mchoice.name)
    _carry(adapter, image_set, res, mchoice, dchoice)


def _carry(adapter, image_set, res, mchoice, dchoice) -> None:
    """Which units carry one extracted image (per-image causal localization)."""
    st.subheader("Which units carry this image?")
    ids = res.extracted_ids()  # at the calibrated threshold: the images the localization judges
    if not ids:
        st.caption("No image is extracted at the calibrated threshold: nothing to localize.")
        return
    if state.get("image") not in ids:
        state.set_many(image=ids[0])
    state.widget(st.selectbox, "image", "Extracted image", ids)
    carry.panel(adapter, image_set, state.get("image"), ids, mchoice.args(), dchoice.args(), key="ex_carry")


with ui.guard("The extraction page"):
    main()
