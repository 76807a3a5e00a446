"""Intervention: edit the most memorizing units; samples before/after, the numbers as they come, the margins,
the trade-off curve."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import config, edits, loaders, results, state, ui
from iarmem_core import figures, intervention, jobs, localize, unitmem
from iarmem_core.cli import commands

OPS = {
    "fc1_scale": "scale the fc1 weight rows (paper)",
    "zero": "zero the unit",
    "out_scale": "scale the unit's output",
}
RANKINGS = {"global": "global (all blocks together)", "per_block": "per block", "per_group": "per scale / group"}
DRAWS = intervention.DEFAULT_RANDOM_DRAWS

st.title("Intervention: remove memorization by editing units")
ui.explain(rf"""
**The edit.** The units with the highest UnitMem are selected (the top $k$% of all units, or units you pick),
and the rows of the MLP's first weight matrix that produce them are multiplied by a **factor** (the paper:
0.5, biases unchanged): the unit's pre-activation becomes $f\,(w_u^\top x) + b_u$. Nothing is written into
the weights: the edit is a hook that lives only while these samples are drawn, so other users of the same
model never see it.

**What to look for.** The rows of samples above and below use the **same seed**, so any difference is the
edit's doing; the difference row shows where they differ. A good edit leaves samples nearly unchanged
(quality) while the extraction attack recovers fewer training images (privacy). The **random-units control**
edits as many randomly chosen units the same way: if it removes as much, the selection did not matter. One
random draw is one sample of chance, so on the demo models the control is drawn {DRAWS} times, all in the same
batched attack as the top units, and the top units are compared with all draws: their **rank** among them, the
5-95% band, and the chance $p$ that a random draw removes at least as much.

**How the numbers come.** On the demo models every edit is measured as soon as it changes: first the
attack on every candidate (the top units and the {DRAWS} draws in one pass), then a **first estimate** of
quality on {intervention.DEFAULT_N_FIRST} samples with its interval, refined to
{intervention.DEFAULT_N_SAMPLES} samples in the background; the label says which one you see. Intervals are
95% bootstrap intervals (over the candidates for counts, over the samples for quality). The **margin view**
shows, per candidate, the similarity minus the threshold before and after the edit: above 0 is extracted.
""")


def _class_names(adapter) -> list[str]:
    from iarmem_core.data import FASHION_CLASSES

    n = adapter.num_classes
    return list(FASHION_CLASSES) if n == len(FASHION_CLASSES) else [str(i) for i in range(n)]


@st.cache_data(max_entries=64, show_spinner=False)
def _samples(_adapter, model_key: str, labels: tuple[int, ...], edit_dict: dict | None, seed: int) -> np.ndarray:
    edit = None if edit_dict is None else intervention.UnitEdit.from_dict(edit_dict)
    return edits.samples(_adapter, list(labels), edit, seed).numpy()


def _labels(adapter) -> tuple[list[int], list[str]]:
    """(the classes to sample, what was typed but cannot be used and why)."""
    out, bad = [], []
    for s in str(state.get("iv_labels")).split(","):
        s = s.strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            bad.append(f"'{s}' is not a class id")
            continue
        if 0 <= v < adapter.num_classes:
            out.append(v)
        else:
            bad.append(f"{v} is outside 0..{adapter.num_classes - 1}")
    if len(out) > 16:
        bad.append(f"only the first 16 of {len(out)} classes are drawn")
        out = out[:16]
    if not out:
        out = list(range(min(8, adapter.num_classes)))
        bad.append(f"no valid class id, so classes {', '.join(map(str, out))} are drawn")
    return out, bad


def main() -> None:
    adapter, mchoice = loaders.get_model()
    image_set, dchoice = loaders.get_data(adapter)
    cfg = unitmem.default_config(adapter, seed=mchoice.seed)
    key, res = results.unitmem_result(adapter, image_set, cfg)
    if res is None:
        st.info("The edit needs the UnitMem result (which units memorize). Compute it on the Memorization page.")
        st.page_link("app_pages/memorization.py", label="Go to the Memorization page", icon=":material/grid_on:")
        return
    n_total = res.n_units_total

    # 1. the edit ------------------------------------------------------------------------------------------
    c1, c2, c3 = st.columns([2, 2, 2])
    state.widget(c1.radio, "iv_mode", "Units", ["top-k%", "picked units"], horizontal=True)
    picked = state.get("iv_mode") == "picked units"
    if not picked:
        state.widget(c1.slider, "iv_top", "Top k% of units by UnitMem", 0.0, 50.0, step=0.5, format="%.1f%%")
        state.widget(c1.selectbox, "iv_ranking", "Ranking", list(RANKINGS), format_func=RANKINGS.get)
        units = edits.select_units(res, float(state.get("iv_top")), ranking=state.get("iv_ranking"))
    else:
        picks = list(state.get("iv_units"))
        top = [f"{b}:{u}" for b, u in res.unit_ranking(k=100)]
        state.widget(
            c1.multiselect,
            "iv_units",
            "Units (block:unit; the 100 with the highest UnitMem, or picked on the Memorization page)",
            list(dict.fromkeys(picks + top)),
            select_all=False,  # no "Select all" entry: one stray click would add 100 units
            placeholder="Choose units",
        )
        units = ui.picked_units(state.get("iv_units"), res)  # units the model lacks: dropped, with a warning
    state.widget(
        c2.slider,
        "iv_factor",
        "Factor",
        0.0,
        1.0,
        step=0.05,
        help="1 = no change, 0.5 = the paper's edit, 0 = the unit is silenced",
    )
    state.widget(c2.selectbox, "iv_op", "Operation", list(OPS), format_func=OPS.get)
    state.widget(c3.toggle, "iv_edit_on", "Apply the edit")
    state.widget(c3.text_input, "iv_labels", "Classes of the samples (comma-separated ids)")
    state.widget(
        c3.number_input,
        "iv_seed",
        "Sample seed",
        min_value=0,
        max_value=2**31 - 1,
        step=1,
        help="Seed of the samples on this page only: changing it draws new samples and discards no result.",
    )
    n_units = sum(len(u) for u in units.values())
    per_block = ", ".join(f"{b}: {len(u)}" for b, u in sorted(units.items())) or "none"
    edit = edits.make_edit(units, state.get("iv_op"), float(state.get("iv_factor")))
    on = bool(state.get("iv_edit_on")) and edit.n_units > 0
    st.caption(f"**{n_units:,} units edited** of {n_total:,} (per block: {per_block}).")

    kw = _measure_kw(mchoice, units if picked else None, None if picked else float(state.get("iv_top")))
    mkey = intervention.measurement_key(adapter, res, image_set, results.user_store(), **kw)
    _drop_stale_measurement(adapter, mkey if edit.n_units else None)

    # 2. samples with and without the edit (quick, in-process) ----------------------------------------------
    labels_l, bad = _labels(adapter)
    if bad:
        st.warning("Classes of the samples: " + "; ".join(bad) + ".", icon=":material/warning:")
    labels = tuple(labels_l)
    seed = int(state.get("iv_seed"))
    with st.spinner("Drawing the samples ..."):
        before = _samples(adapter, f"{mchoice}", labels, None, seed)
        after = _samples(adapter, f"{mchoice}", labels, edit.to_dict() if on else None, seed)
    names = _class_names(adapter)
    st.subheader("Samples at the same seed: without and with the edit")
    st.caption(
        f"Sampling settings of {mchoice.name}: {edits.describe_sampling(edits.sampling_settings(adapter))}, "
        f"sample seed {seed} (top-k 0 and top-p 0 mean no truncation). Rows: without the edit, with it, and "
        "their difference."
    )
    diff = figures.difference_maps(before, after)
    vmax = max(float(diff.max()), 1e-6)
    rows = [
        ("without the edit", figures.to_uint8(before)),
        ("with the edit" if on else "with the edit (off)", figures.to_uint8(after)),
        (f"|difference| (max {vmax:.2f})", figures.colormap(diff, figures.DIFFERENCE, vmax=max(vmax, 0.05))),
    ]
    for title, imgs in rows:
        st.markdown(f"**{title}**")
        ui.images(imgs, [names[y] for y in labels], columns=max(8, len(labels)))
    changed = float(np.mean(np.abs(after - before)))
    what = (
        (f"{edit.n_units} units, {OPS[edit.op]}" + (f" x {edit.factor:g}" if edit.op != "zero" else ""))
        if on
        else "the edit is off"
    )
    st.markdown(f"Mean absolute pixel change: **{changed:.4f}** ({what})")
    ddf = pd.DataFrame(
        {
            "label": list(labels),
            "class": [names[y] for y in labels],
            "mean_abs_difference": diff.reshape(len(labels), -1).mean(1),
        }
    )
    st.download_button(
        "Difference per sample (CSV)",
        ddf.to_csv(index=False).encode(),
        file_name="edit-difference.csv",
        mime="text/csv",
        on_click="ignore",
        key="iv_diff_csv",
    )

    # 3. numbers before/after (a job, measured as the edit changes on demo models) and the trade-off curve -----
    st.subheader("Privacy and quality, before and after")
    if edit.n_units == 0:
        st.info(
            "No unit is edited"
            + (" (pick at least one unit above)" if picked else " (k = 0%)")
            + ": there is nothing to measure, and no command to show.",
            icon=":material/info:",
        )
    else:
        _numbers(adapter, image_set, res, cfg, mchoice, dchoice, kw, mkey)
    _curve(adapter, image_set, res, cfg, mchoice, dchoice, None if picked else float(state.get("iv_top")))
    _dose(adapter, image_set, res, cfg, mchoice, dchoice)


def _fmt(v) -> str:
    return "-" if v is None else f"{float(v):.3g}"


def _iv(lo_hi) -> str:
    return "" if not lo_hi else f" (95%: {_fmt(lo_hi[0])}-{_fmt(lo_hi[1])})"


def _delta(after, before, color: str = "normal") -> dict:
    """st.metric's delta arguments: after - before, signed, 3 significant digits; no change: grey, no arrow."""
    if after is None or before is None:
        return {}
    diff = float(after) - float(before)
    if diff == 0:
        return {"delta": "no change", "delta_arrow": "off", "delta_color": "off"}
    return {"delta": f"{diff:+.3g}", "delta_color": color}


def _stage_label(d: intervention.InterventionResult, running: bool) -> str:
    if d.stage == "extraction":
        return ":orange-badge[:material/hourglass_top: extraction done, quality being sampled]"
    if d.stage == "first estimate":
        return (
            f":orange-badge[:material/hourglass_top: first estimate: quality on {d.n_samples} of "
            f"{d.n_samples_target} samples{', refining' if running else ''}]"
        )
    return f":green-badge[:material/check: full measurement: quality on {d.n_samples} samples]"


def _metric_row(d: intervention.InterventionResult, running: bool = False) -> None:
    rc = d.random_control
    st.markdown(_stage_label(d, running))
    c = st.columns(3)
    c[0].metric(
        "Extracted after the edit",
        f"{d.extracted_after} of {d.candidates}",
        help=f"before the edit: {d.extracted_before}{_iv(d.extracted_before_interval)}; after: "
        f"{d.extracted_after}{_iv(d.extracted_after_interval)}; {d.similarity} > {d.threshold:.4g} (the unedited "
        "result's measure and threshold); 95% bootstrap intervals over the candidates",
        **_delta(d.extracted_after, d.extracted_before, "inverse"),
    )
    c[1].metric(
        "Frechet distance",
        _fmt(d.fd_after),
        help=f"after{_iv(d.fd_after_interval)}; before: {_fmt(d.fd_before)}{_iv(d.fd_before_interval)}; "
        f"{d.fd_metric}, {d.n_samples} samples each (lower = better)",
        **_delta(d.fd_after, d.fd_before, "inverse"),
    )
    c[2].metric(
        "Class accuracy",
        _fmt(d.class_acc_after),
        help=f"after{_iv(d.class_acc_after_interval)}; before: {_fmt(d.class_acc_before)}"
        f"{_iv(d.class_acc_before_interval)}; {d.n_samples} samples each, the bundled classifier",
        **_delta(d.class_acc_after, d.class_acc_before),
    )
    st.caption(
        f"Extracted: {d.extracted_before} before{_iv(d.extracted_before_interval)}, {d.extracted_after} after"
        f"{_iv(d.extracted_after_interval)}. FD after {_fmt(d.fd_after)}{_iv(d.fd_after_interval)}, before "
        f"{_fmt(d.fd_before)}{_iv(d.fd_before_interval)}. Class accuracy after {_fmt(d.class_acc_after)}"
        f"{_iv(d.class_acc_after_interval)}."
        if d.fd_after is not None
        else f"Extracted: {d.extracted_before} before{_iv(d.extracted_before_interval)}, {d.extracted_after} after"
        f"{_iv(d.extracted_after_interval)}. Quality follows."
    )
    if rc is not None:
        q = (
            f" First draw: Frechet distance {_fmt(rc.fd_after)}{_iv(rc.fd_after_interval)}, class accuracy "
            f"{_fmt(rc.class_acc_after)}."
            if rc.fd_after is not None
            else ""
        )
        if rc.draws > 1:
            st.markdown(
                f"**Random-units control** ({rc.draws} draws of {rc.n_units} random units, same blocks, same edit): "
                f"extracted {_fmt(rc.extracted_after_mean)} on average (5-95%: {_fmt(rc.extracted_after_q05)}-"
                f"{_fmt(rc.extracted_after_q95)}, range {rc.extracted_after_min}-{rc.extracted_after_max}). "
                f"The top units rank **{rc.rank} of {rc.draws + 1}** (1 = fewest left extracted"
                f"{f', {rc.ties} draws tie' if rc.ties else ''}); p = {rc.p_value:.2g}, the chance that a "
                f"random draw removes at least as much (smallest possible: {1 / (rc.draws + 1):.2g}).{q}"
            )
        else:
            st.markdown(
                f"**Random-units control** ({rc.n_units} random units, same edit, one draw): extracted "
                f"{rc.extracted_after}.{q} Raise the draws from a terminal (`--random-draws`) for a p-value."
            )


def _margins(d: intervention.InterventionResult, es: intervention.EditScores | None, name: str, cli: str) -> None:
    if es is None:
        return
    draws = list(range(1, es.n_edits))
    mt = intervention.margin_table(es, 0, random_indices=draws)
    title = f"{name}: margin to the threshold per candidate, before and after the edit"
    ui.plotly(figures.margin_chart(mt, title, es.similarity), mt, title, key="iv_margins", cli=cli)
    st.caption(
        f"{es.similarity} minus the threshold {es.threshold():.4g} for each of the {es.n_candidates} candidates "
        f"(above 0: extracted). Orange: the median and 5-95% of the {len(draws)} random draws."
    )


def _measure_kw(mchoice, units, top) -> dict:
    """The edit as `intervention.measurement_key` / `start_measurement` take it."""
    return dict(
        top_percent=top,
        units=units,
        factor=float(state.get("iv_factor")),
        op=state.get("iv_op"),
        ranking=state.get("iv_ranking"),
        seed=int(mchoice.seed),
    )


def _live(adapter) -> bool:
    return adapter.spec.kind in ("demo", "test") and config.live_measurement()


def _drop_stale_measurement(adapter, key: str | None) -> None:
    """Only the edit on screen is measured: the live job this session started for an earlier edit is
    cancelled (before the new samples are drawn, so they do not wait for it; its stages stay stored)."""
    if not _live(adapter):
        return
    prev = st.session_state.get("_iv_live_job")
    if prev and prev != key and results.is_active(prev):
        jobs.cancel_job(prev, results.user_store())
    st.session_state["_iv_live_job"] = key


def _numbers(adapter, image_set, res, cfg, mchoice, dchoice, kw: dict, key: str) -> None:
    """Extraction, FD and class accuracy before and after the current edit, with its random control: a job,
    started as soon as the edit changes on demo and test models."""
    store = results.user_store()
    got = results.load(key)
    cli = commands.intervene_command(
        mchoice.args(),
        dchoice.args(),
        cfg,
        top_percent=kw["top_percent"],
        units=kw["units"],
        factor=kw["factor"],
        op=kw["op"],
        ranking=kw["ranking"],
    )

    def start():
        return intervention.start_measurement(
            adapter, res, image_set, store, **kw, read_stores=[results.shipped_store()]
        )

    status = results.status(key)
    restartable = status.get("state") != "failed" or status.get("interrupted")  # a server restart: go on
    if _live(adapter) and got is None and not results.is_active(key) and restartable:
        start()

    def stage() -> None:
        part = intervention.load_measurement_stage(store, key)
        if part is not None:
            _metric_row(part[0], running=True)
            _margins(part[0], part[1], mchoice.name, cli)

    results.job_panel(
        key,
        "edit measurement",
        start,
        "Measure privacy and quality for this edit (job)",
        done=got is not None,
        widget_key="measure",
        live=stage,
    )
    if got is not None:
        d, es = intervention.load_measurement(*got)
        _metric_row(d)
        _margins(d, es, mchoice.name, cli)
    elif not results.is_active(key):
        st.caption(
            f"Measures the attack on every candidate after this edit and after {DRAWS} random draws of the same "
            "size (one batched pass), and FD and class accuracy of samples."
        )
    st.caption("From a terminal:")
    st.code(cli, language="bash", wrap_lines=True)


def _curve(adapter, image_set, res, cfg, mchoice, dchoice, top) -> None:
    """The trade-off curve: extraction and quality over k%, UnitMem-selected vs random units (a job)."""
    st.subheader("The trade-off: privacy against quality")
    args = {
        **intervention.sweep_defaults(),
        "factor": float(state.get("iv_factor")),
        "op": state.get("iv_op"),
        "ranking": state.get("iv_ranking"),
        "seed": int(mchoice.seed),
    }
    store = results.user_store()
    key = intervention.sweep_key(adapter, res, image_set, store, **args)
    got = results.load(key)
    cli = commands.intervene_command(
        mchoice.args(), dchoice.args(), cfg, sweep=True, factor=args["factor"], op=args["op"], ranking=args["ranking"]
    )
    results.job_panel(
        key,
        "edit sweep",
        lambda: intervention.start_sweep(
            adapter, res, image_set, store=store, read_stores=[results.shipped_store()], **args
        ),
        "Run the sweep (job)",
        done=got is not None,
        widget_key="sweep",
    )
    if got is None:
        st.caption(
            f"Edits the top {', '.join(f'{k}%' for k in intervention.DEFAULT_TOP_PERCENTS)} and as many "
            f"random units ({DRAWS} draws each, all in one batched attack), and measures each. From a terminal:"
        )
        st.code(cli, language="bash", wrap_lines=True)
        return
    meta = got[1]
    df = pd.DataFrame(meta["rows"], columns=meta["columns"])
    df["selection"] = df["selection"].map({"unitmem": "top units", "random": "random units"}).fillna(df["selection"])
    q = "fd" if df["fd"].notna().any() else "class_acc"
    title = f"{mchoice.name}: images extracted and sample quality as more units are edited"
    ui.plotly(figures.tradeoff_curve(df, title, current_k=top, quality=q), df, title, key="iv_curve", cli=cli)
    draws = int(df["random_draws"].max()) if "random_draws" in df else 1
    band = f" Shaded: the 5-95% band of {draws} random draws." if draws > 1 else ""
    st.caption(f"{meta.get('how', '')}.{band} Dotted line: your k. Result {key}, {results.source_label(key)}.")


def _dose(adapter, image_set, res, cfg, mchoice, dchoice) -> None:
    """The dose-response curves (iarmem_core.dose): copies still extracted vs units edited, four selections."""
    from iarmem_core import dose, extraction

    st.subheader("Dose-response: which units remove the copies?")
    ekey = extraction.extraction_key(
        adapter, image_set, extraction.ExtractionConfig(seed=mchoice.seed), store=results.user_store()
    )
    if results.locate(ekey) is None:
        st.info("The curves follow the copies the attack extracts: run the attack on the Extraction page first.")
        return
    ids = extraction.load_extraction(results.locate(ekey), ekey).extracted_ids()
    dcfg = dose.CurveConfig(ranking=state.get("iv_ranking"), localize=localize.LocalizeConfig(seed=int(mchoice.seed)))
    store = results.user_store()
    key = dose.dose_response_key(adapter, image_set, res, dcfg, store, ids=ids)
    got = results.load(key)
    cli = commands.curve_command(mchoice.args(), dchoice.args(), cfg, dcfg)
    results.job_panel(
        key,
        "dose-response",
        lambda: dose.start_dose_response(adapter, image_set, res, dcfg, store=store, ids=ids),
        "Run the dose-response (job)",
        done=got is not None,
        widget_key="dose",
    )
    if got is None:
        st.caption(
            f"For the {len(ids)} copies the attack extracts, zeroes n units chosen four ways (the top units by "
            f"UnitMem at {', '.join(f'{k:g}%' for k in dcfg.percents)}; as many random units, "
            f"{dcfg.random_draws} draws; the union of the per-image minimal sets; a greedy cover guided by "
            "attribution) and counts the copies still extracted. From a terminal:"
        )
        st.code(cli, language="bash", wrap_lines=True)
        return
    meta = got[1]
    df = figures.dose_frame(meta)
    title = f"{mchoice.name}: copies still extracted as more units are zeroed"
    ui.plotly(figures.dose_curve(df, title, int(meta["n_units_total"])), df, title, key="iv_dose", cli=cli)
    sm, n_all, n0 = meta.get("summary", {}), int(meta["n_units_total"]), int(meta["extracted_before"])

    def needs(name: str, label: str) -> str:
        s = sm.get(name) or {}
        last = s.get("last") or {}
        if s.get("units_for_half") is None:
            return (
                f"{label}: fewer than half removed within the curve ({last.get('extracted', '?'):g} of {n0} "
                f"left at {last.get('n_units', 0):,} units)"
            )
        n = int(s["units_for_half"])
        return f"{label}: half removed at {n:,} units ({100 * n / n_all:.2g}% of all)"

    st.markdown(
        f"Of the **{n0} copies** the attack extracts:\n"
        + "\n".join(
            f"- {needs(k, v)}"
            for k, v in (
                ("unitmem", "top units by UnitMem"),
                ("random", "random units (median draw)"),
                ("union", "union of the per-image minimal sets"),
                ("greedy", "greedy cover"),
            )
        )
    )
    st.caption(
        "How to read it: a ranking that finds where the copies live removes them with few units, far below the "
        "random band; a curve inside the band says its units are no better than any units. The union and the "
        "greedy cover are built from the copies themselves (per-image minimal sets, attribution), so they show "
        "how few units suffice when you know where to look; they are not a privacy defence for copies nobody "
        f"has found. Counts use the localization's decision (the attack from its prefix, calibrated threshold). "
        f"Result {key}, {results.source_label(key)}."
    )


with ui.guard("The intervention page"):
    main()
