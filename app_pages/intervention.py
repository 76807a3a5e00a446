"""Intervention: edit the most memorizing units; samples before/after, the numbers, the trade-off curve."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import edits, loaders, results, state, ui
from iarmem_core import figures, intervention, unitmem
from iarmem_core.cli import commands

OPS = {
    "fc1_scale": "scale the fc1 weight rows (paper)",
    "zero": "zero the unit",
    "out_scale": "scale the unit's output",
}
RANKINGS = {"global": "global (all blocks together)", "per_block": "per block", "per_group": "per scale / group"}

st.title("Intervention: remove memorization by editing units")
ui.explain(r"""
**The edit.** The units with the highest UnitMem are selected (the top $k$% of all units, or units you pick),
and the rows of the MLP's first weight matrix that produce them are multiplied by a **factor** (the paper:
0.5, biases unchanged): the unit's pre-activation becomes $f\,(w_u^\top x) + b_u$. Nothing is written into
the weights: the edit is a hook that lives only while these samples are drawn, so other users of the same
model never see it.

**What to look for.** The samples on the left and right use the **same seed**, so any difference is the
edit's doing; the difference map shows where they differ. A good edit leaves samples nearly unchanged
(quality) while the extraction attack recovers fewer training images (privacy). The **random-units control**
edits as many randomly chosen units the same way: if it removes as much, the selection did not matter. One
random draw is one sample of chance, so on the demo models the control is drawn 10 times and the top units are
compared with all draws (the range, and the chance $p$ that a random draw removes at least as much).
""")


def _class_names(adapter) -> list[str]:
    from iarmem_core.data import FASHION_CLASSES

    n = adapter.num_classes
    return list(FASHION_CLASSES) if n == len(FASHION_CLASSES) else [str(i) for i in range(n)]


@st.cache_data(max_entries=64, show_spinner=False)
def _samples(_adapter, model_key: str, labels: tuple[int, ...], edit_dict: dict | None, seed: int) -> np.ndarray:
    edit = (
        None
        if edit_dict is None
        else edits.make_edit(
            {int(b): tuple(u) for b, u in edit_dict["units"].items()}, edit_dict["op"], edit_dict["factor"]
        )
    )
    return edits.samples(_adapter, list(labels), edit, seed).numpy()


def _labels(adapter) -> list[int]:
    out = []
    for s in str(state.get("iv_labels")).split(","):
        try:
            v = int(s)
        except ValueError:
            continue
        if 0 <= v < adapter.num_classes:
            out.append(v)
    return out[:16] or list(range(min(8, adapter.num_classes)))


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
    if state.get("iv_mode") == "top-k%":
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
    n_units = sum(len(u) for u in units.values())
    c3.metric(
        "Units edited",
        f"{n_units:,}",
        help=f"of {n_total:,} units; per block: " + ", ".join(f"{b}: {len(u)}" for b, u in sorted(units.items())),
    )
    edit = edits.make_edit(units, state.get("iv_op"), float(state.get("iv_factor")))
    on = bool(state.get("iv_edit_on")) and edit.n_units > 0

    # 2. samples with and without the edit (quick, in-process) ----------------------------------------------
    labels = tuple(_labels(adapter))
    seed = int(mchoice.seed)
    mkey = f"{mchoice}"
    before = _samples(adapter, mkey, labels, None, seed)
    after = _samples(adapter, mkey, labels, edit.to_dict() if on else None, seed)
    names = _class_names(adapter)
    st.subheader("Samples at the same seed: without and with the edit")
    st.caption(
        f"Sampling settings of {mchoice.name}: {edits.describe_sampling(edits.sampling_settings(adapter))}, "
        f"seed {seed} (top-k 0 and top-p 0 mean no truncation)."
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

    # 3. numbers before/after and the trade-off curve (jobs) -------------------------------------------------
    st.subheader("Privacy and quality, before and after")
    picked = state.get("iv_mode") == "picked units"
    _numbers(
        adapter,
        image_set,
        res,
        cfg,
        mchoice,
        dchoice,
        units if picked else None,
        None if picked else float(state.get("iv_top")),
    )
    _curve(adapter, image_set, res, cfg, mchoice, dchoice)


def _metric_row(d: intervention.InterventionResult, label: str) -> None:
    rc = d.random_control
    c = st.columns(3)
    c[0].metric(
        f"Extracted {label}",
        d.extracted_after,
        help=f"before the edit: {d.extracted_before}",
        **_delta(d.extracted_after, d.extracted_before, "inverse"),
    )
    c[1].metric(
        "Frechet distance",
        _fmt(d.fd_after),
        help=f"before: {_fmt(d.fd_before)}; {d.fd_metric}, {d.n_samples} samples (lower = better)",
        **_delta(d.fd_after, d.fd_before, "inverse"),
    )
    c[2].metric(
        "Class accuracy",
        _fmt(d.class_acc_after),
        help=f"before: {_fmt(d.class_acc_before)}",
        **_delta(d.class_acc_after, d.class_acc_before),
    )
    if rc is not None:
        st.markdown(
            f"**Random-units control** ({rc.n_units} random units, same edit): "
            f"extracted {rc.extracted_after}, Frechet distance {_fmt(rc.fd_after)}, "
            f"class accuracy {_fmt(rc.class_acc_after)}."
        )
        if rc.draws > 1:
            st.markdown(
                f"Over {rc.draws} random draws of the same size: extracted "
                f"{_fmt(rc.extracted_after_mean)} on average (from {rc.extracted_after_min} "
                f"to {rc.extracted_after_max}); p = {rc.p_value:.2g}, the chance that a random "
                f"draw removes at least as much as the top units (smallest possible: "
                f"{1 / (rc.draws + 1):.2g})."
            )


def _fmt(v) -> str:
    return "-" if v is None else f"{float(v):.3g}"


def _delta(after, before, color: str = "normal") -> dict:
    """st.metric's delta arguments: after - before, signed, 3 significant digits; no change: grey, no arrow."""
    if after is None or before is None:
        return {}
    diff = float(after) - float(before)
    if diff == 0:
        return {"delta": "no change", "delta_arrow": "off", "delta_color": "off"}
    return {"delta": f"{diff:+.3g}", "delta_color": color}


def _numbers(adapter, image_set, res, cfg, mchoice, dchoice, units, top) -> None:
    """Extraction, FD and class accuracy before and after the current edit (and its random control): a job."""
    kw = dict(
        top_percent=top,
        units=units,
        factor=float(state.get("iv_factor")),
        op=state.get("iv_op"),
        ranking=state.get("iv_ranking"),
        seed=int(mchoice.seed),
    )
    store = results.user_store()
    key = intervention.measurement_key(adapter, res, image_set, store, **kw)
    got = results.load(key)
    results.job_panel(
        key,
        "edit measurement",
        lambda: intervention.start_measurement(adapter, res, image_set, store, **kw),
        "Measure privacy and quality for this edit (job)",
        done=got is not None,
        widget_key="measure",
    )
    if got is not None:
        _metric_row(intervention.measurement_from_meta(got[1]), "after the edit")
    if units is not None and not units:
        st.caption("Pick at least one unit to get the command that measures this edit from a terminal.")
        return
    cmd = commands.intervene_command(
        mchoice.args(),
        dchoice.args(),
        cfg,
        top_percent=top,
        units=units,
        factor=kw["factor"],
        op=kw["op"],
        ranking=kw["ranking"],
    )
    st.caption("From a terminal:")
    st.code(cmd, language="bash", wrap_lines=True)


def _curve(adapter, image_set, res, cfg, mchoice, dchoice) -> None:
    """The trade-off curve: extraction vs quality over k%, UnitMem-selected vs random units (a job)."""
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
        lambda: intervention.start_sweep(adapter, res, image_set, store=store, **args),
        "Run the sweep (job)",
        done=got is not None,
        widget_key="sweep",
    )
    if got is None:
        st.caption(
            f"Edits the top {', '.join(f'{k}%' for k in intervention.DEFAULT_TOP_PERCENTS)} and as many "
            f"random units, and measures each. From a terminal: {ui.code_span(cli)}"
        )
        return
    meta = got[1]
    df = pd.DataFrame(meta["rows"], columns=meta["columns"])
    df["selection"] = df["selection"].map({"unitmem": "top units", "random": "random units"}).fillna(df["selection"])
    x = "fd" if df["fd"].notna().any() else "class_acc"
    title = f"{mchoice.name}: images extracted vs sample quality as more units are edited"
    ui.plotly(figures.tradeoff_curve(df, title, x=x), df, title, key="iv_curve", cli=cli)
    draws = int(df["random_draws"].max()) if "random_draws" in df else 1
    bars = f" Bars on the random points: the range over {draws} random draws." if draws > 1 else ""
    st.caption(f"{meta.get('how', '')}.{bars} Result {key}, {results.source_label(key)}.")


with ui.guard("The intervention page"):
    main()
