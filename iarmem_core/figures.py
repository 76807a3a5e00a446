"""Figures from result arrays: the app, the CLI and a notebook draw the same charts from the same numbers.

Every builder takes plain arrays (or a tidy DataFrame made by the matching ``*_frame`` function, which is
also the chart's CSV) and returns a plotly figure, or an altair chart for the distributions. No streamlit
here. Colour maps are colour-blind safe (viridis for magnitudes, cividis for differences) and the type is
large enough for a projector.

Example:
    >>> import numpy as np
    >>> df = heatmap_frame(np.random.rand(4, 3), [0, 1, 2, 3], ["1x1", "2x2", "3x3"])
    >>> fig = unitmem_heatmap(df, title="UnitMem, mean over units")
    >>> png = to_png(fig)          # needs kaleido (+ a Chrome/Chromium) for plotly, vl-convert for altair
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

SEQUENTIAL = "Viridis"  # magnitudes: UnitMem, activations
DIFFERENCE = "Cividis"  # |after - before|
DIVERGING = "PuOr"  # signed quantities around a centre (colour-blind safe)
FONT_SIZE = 18
PNG_WIDTH = 900  # px (before `scale`) of an exported altair chart that has no width of its own
TITLE_SIZE = 22
SERIES = {
    "top units": "#0072B2",
    "random units": "#E69F00",
    "before": "#009E73",
    "planted": "#D55E00",
    "other": "#56B4E9",
    "held-out": "#999999",
}  # Okabe-Ito: colour-blind safe


def _layout(fig: go.Figure, title: str, height: int = 460, **kw) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": TITLE_SIZE}},
        font={"size": FONT_SIZE},
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 30, "t": 70, "b": 60},
        **kw,
    )
    return fig


# ---- UnitMem heatmaps ------------------------------------------------------------------------------
def heatmap_frame(
    z_LG: np.ndarray, blocks: Sequence[int], groups: Sequence[str], value: str = "unitmem"
) -> pd.DataFrame:
    """Tidy [block, group, value] rows of a block x group matrix (the heatmap's CSV)."""
    z = np.asarray(z_LG, dtype=np.float64)
    if z.shape != (len(blocks), len(groups)):
        raise ValueError(f"matrix is {z.shape}, but {len(blocks)} blocks x {len(groups)} groups were named")
    rows = [
        {"block": int(b), "group": str(g), "group_index": gi, value: float(z[bi, gi])}
        for bi, b in enumerate(blocks)
        for gi, g in enumerate(groups)
    ]
    return pd.DataFrame(rows)


def frame_matrix(df: pd.DataFrame, value: str = "unitmem") -> tuple[np.ndarray, list[int], list[str]]:
    """Back from a heatmap frame to (z [blocks, groups], blocks, groups), in first-seen order."""
    blocks = list(dict.fromkeys(int(b) for b in df["block"]))
    groups = list(dict.fromkeys(str(g) for g in df["group"]))
    z = df.pivot(index="block", columns="group", values=value).loc[blocks, groups].to_numpy()
    return z, blocks, groups


def unitmem_heatmap(
    df: pd.DataFrame,
    title: str,
    value: str = "unitmem",
    x_title: str = "scale (coarse -> fine)",
    zmax: float | None = None,
    selected: tuple[int, str] | None = None,
) -> go.Figure:
    """Block (rows, block 0 on top) x group heatmap with a clickable point at every cell centre.

    Plotly heatmaps emit no selection events, so an invisible scatter trace carries the clicks; its
    customdata is [block, group]. `selected` outlines one cell.
    """
    z, blocks, groups = frame_matrix(df, value)
    text = [[f"{v:.3f}" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=groups,
            y=[f"block {b}" for b in blocks],
            colorscale=SEQUENTIAL,
            zmin=0,
            zmax=zmax if zmax is not None else max(float(np.nanmax(z)), 1e-6),
            text=text,
            texttemplate="%{text}" if z.size <= 120 else None,
            textfont={"size": 14},
            colorbar={"title": {"text": value}},
            hoverinfo="skip",
        )
    )
    xs = [g for _ in blocks for g in groups]
    ys = [f"block {b}" for b in blocks for _ in groups]
    custom = [[b, g, float(z[bi, gi])] for bi, b in enumerate(blocks) for gi, g in enumerate(groups)]
    # hover and clicks go to this trace: a trace with hoverinfo="skip" gets no click events
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            marker={"size": 40, "opacity": 0.0, "symbol": "square"},
            customdata=custom,
            hovertemplate="%{y}, %{x}: %{customdata[2]:.4f}<extra></extra>",
            showlegend=False,
            name="cells",
        )
    )
    if selected is not None and selected[1] in groups and selected[0] in blocks:
        fig.add_trace(
            go.Scatter(
                x=[selected[1]],
                y=[f"block {selected[0]}"],
                mode="markers",
                hoverinfo="skip",
                showlegend=False,
                marker={"size": 46, "symbol": "square-open", "color": "#E69F00", "line": {"width": 4}},
                name="selected",
            )
        )
    fig.update_yaxes(autorange="reversed", title="transformer block")
    fig.update_xaxes(title=x_title, type="category")
    return _layout(fig, title, height=max(320, 70 + 52 * len(blocks)), clickmode="event+select", dragmode=False)


def signed_heatmap(
    df: pd.DataFrame,
    title: str,
    value: str,
    center: float = 0.0,
    x_title: str = "scale",
    span: float | None = None,
    fmt: str = ".2f",
) -> go.Figure:
    """A block x group heatmap of a quantity with a meaningful centre (a difference, or a share beside the share
    expected by chance): a diverging, colour-blind-safe scale centred on `center`."""
    z, blocks, groups = frame_matrix(df, value)
    finite = np.abs(z[np.isfinite(z)] - center)
    half = span if span is not None else max(float(finite.max()) if finite.size else 0.0, 1e-6)
    text = [["" if not np.isfinite(v) else f"{v:{fmt}}" for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=groups,
            y=[f"block {b}" for b in blocks],
            colorscale=DIVERGING,
            zmid=center,
            zmin=center - half,
            zmax=center + half,
            text=text,
            texttemplate="%{text}" if z.size <= 120 else None,
            textfont={"size": 14},
            colorbar={"title": {"text": value}},
            hovertemplate="%{y}, %{x}: %{z:" + fmt + "}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text=x_title, type="category")
    return _layout(fig, title, height=max(320, 60 + 46 * len(blocks)))


def grid_frame(z_hw: np.ndarray, value: str = "unitmem") -> pd.DataFrame:
    """Tidy [row, col, value] of a token grid."""
    z = np.asarray(z_hw, dtype=np.float64)
    return pd.DataFrame(
        [{"row": r, "col": c, value: float(z[r, c])} for r in range(z.shape[0]) for c in range(z.shape[1])]
    )


def token_grid_heatmap(df: pd.DataFrame, title: str, value: str = "unitmem", zmax: float | None = None) -> go.Figure:
    """One scale's token grid (row 0 on top), one cell per token position."""
    h, w = int(df["row"].max()) + 1, int(df["col"].max()) + 1
    z = np.full((h, w), np.nan)
    z[df["row"].to_numpy(), df["col"].to_numpy()] = df[value].to_numpy()
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale=SEQUENTIAL,
            zmin=0,
            zmax=zmax if zmax is not None else max(float(np.nanmax(z)), 1e-6),
            colorbar={"title": {"text": value}},
            hovertemplate="row %{y}, col %{x}: %{z:.4f}<extra></extra>",
            text=[[f"{v:.2f}" for v in row] for row in z],
            texttemplate="%{text}" if z.size <= 64 else None,
        )
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title="token row", dtick=1)
    fig.update_xaxes(title="token column", dtick=1, constrain="domain")
    return _layout(fig, title, height=420)


# ---- one unit --------------------------------------------------------------------------------------
def profile_frame(values_G: np.ndarray, groups: Sequence[str], value: str = "unitmem") -> pd.DataFrame:
    return pd.DataFrame({"group": [str(g) for g in groups], value: np.asarray(values_G, dtype=np.float64)})


def unit_profile(df: pd.DataFrame, title: str, value: str = "unitmem", highlight: str | None = None) -> go.Figure:
    """A unit's UnitMem per group (bars; the selected group in orange)."""
    colors = [SERIES["planted"] if g == highlight else SERIES["top units"] for g in df["group"]]
    fig = go.Figure(
        go.Bar(x=df["group"], y=df[value], marker_color=colors, hovertemplate="%{x}: %{y:.4f}<extra></extra>")
    )
    fig.update_yaxes(title=value, range=[0, max(1.0, float(df[value].max()))])
    fig.update_xaxes(title="group", type="category")
    return _layout(fig, title, height=360)


def activation_frame(mu_N: np.ndarray, image_ids: Sequence[str], planted_N: Sequence[bool] | None) -> pd.DataFrame:
    planted = [bool(p) for p in planted_N] if planted_N is not None else [False] * len(image_ids)
    return pd.DataFrame(
        {"image_id": list(image_ids), "mean_abs_activation": np.asarray(mu_N, np.float64), "planted": planted}
    )


def activation_histogram(df: pd.DataFrame, title: str, mu_rest: float | None = None) -> go.Figure:
    """Distribution over images of a unit's mean |activation| (planted images in orange)."""
    fig = go.Figure()
    for flag, name in ((False, "other"), (True, "planted")):
        sub = df[df["planted"] == flag]
        if len(sub):
            fig.add_trace(
                go.Histogram(
                    x=sub["mean_abs_activation"], name=name, marker_color=SERIES[name], nbinsx=40, opacity=0.85
                )
            )
    if mu_rest is not None:
        fig.add_vline(x=mu_rest, line_dash="dash", line_color="#333", annotation_text="mu_rest")
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title="mean |activation| over the group's positions")
    fig.update_yaxes(title="images")
    return _layout(fig, title, height=360, legend={"orientation": "h", "y": -0.25})


def distribution_frame(unitmem_LU: np.ndarray, blocks: Sequence[int]) -> pd.DataFrame:
    """Tidy [block, unit, unitmem] of every unit (one group)."""
    um = np.asarray(unitmem_LU, dtype=np.float64)
    L, U = um.shape
    return pd.DataFrame(
        {"block": np.repeat(np.asarray(blocks), U), "unit": np.tile(np.arange(U), L), "unitmem": um.reshape(-1)}
    )


def unitmem_distributions(df: pd.DataFrame, title: str):
    """Altair: UnitMem distribution per block (box plot over units, outliers as points)."""
    import altair as alt

    return (
        alt.Chart(df, title=alt.Title(title, fontSize=TITLE_SIZE))
        .mark_boxplot(size=28, extent=1.5, color="#0072B2", median={"color": "#E69F00", "strokeWidth": 3})
        .encode(
            x=alt.X("block:O", title="transformer block"),
            y=alt.Y("unitmem:Q", title="UnitMem of each unit", scale=alt.Scale(domain=[0, 1])),
        )
        .properties(height=360)
        .configure_axis(labelFontSize=FONT_SIZE - 2, titleFontSize=FONT_SIZE)
    )


# ---- extraction --------------------------------------------------------------------------------------
def similarity_histogram(table: pd.DataFrame, measure: str, threshold: float, title: str) -> go.Figure:
    """Similarity of generation vs reconstruction per candidate, by split, with the threshold line."""
    fig = go.Figure()
    split = table["split"] if "split" in table else pd.Series(["train"] * len(table))
    planted = table["planted"].fillna(False).astype(bool) if "planted" in table else pd.Series([False] * len(table))
    groups = (
        ("planted", (split != "heldout") & planted),
        ("other", (split != "heldout") & ~planted),
        ("held-out", split == "heldout"),
    )
    for name, mask in groups:
        vals = table.loc[mask.to_numpy(), measure]
        if len(vals):
            fig.add_trace(go.Histogram(x=vals, name=name, marker_color=SERIES[name], nbinsx=30, opacity=0.8))
    fig.add_vline(
        x=threshold, line_width=3, line_dash="dash", line_color="#333", annotation_text=f"threshold {threshold:.4g}"
    )
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title=f"similarity ({measure})")
    fig.update_yaxes(title="candidates")
    return _layout(fig, title, height=360, legend={"orientation": "h", "y": -0.25})


# ---- intervention --------------------------------------------------------------------------------------
def tradeoff_curve(df: pd.DataFrame, title: str, current_k: float | None = None, quality: str = "fd") -> go.Figure:
    """The trade-off as more units are edited: k% on the x axis of two panels, images extracted (left) and
    sample quality (right), for the top units and the random control; the current k marked.

    `df` has columns top_percent, selection ("top units" / "random units"), extracted and `quality` ("fd" or
    "class_acc"). Optional: random_extracted_q05 / _q95 (several random draws: a shaded 5-95% band of the
    draws' counts, with their mean as the random line when random_extracted_mean is there),
    extracted_lo / _hi and fd_lo / _hi (intervals, drawn as bars). Points are joined in k order on a k axis,
    so nothing zig-zags and no label is needed on the points (hover shows every number).
    """
    from plotly.subplots import make_subplots

    qname = {"fd": "Frechet distance (lower = better)", "class_acc": "class accuracy of samples"}.get(quality, quality)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("images extracted", qname), horizontal_spacing=0.12)
    ks = sorted(float(k) for k in df["top_percent"].unique())
    top = df[df["selection"] == "top units"].sort_values("top_percent")
    rnd = df[df["selection"] == "random units"].sort_values("top_percent")
    band = {"random_extracted_q05", "random_extracted_q95"} <= set(rnd.columns) and len(rnd)
    if band and "random_draws" in rnd and (rnd["random_draws"] > 1).any():
        n = int(rnd["random_draws"].max())
        xs = list(rnd["top_percent"]) + list(rnd["top_percent"])[::-1]
        ys = list(rnd["random_extracted_q95"]) + list(rnd["random_extracted_q05"])[::-1]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                fill="toself",
                fillcolor="rgba(230, 159, 0, 0.25)",
                line={"width": 0},
                hoverinfo="skip",
                name=f"random units: 5-95% of {n} draws",
            ),
            row=1,
            col=1,
        )
    for sel, sub in (("top units", top), ("random units", rnd)):
        if not len(sub):
            continue
        color = SERIES[sel]
        style = {"width": 4, "color": color, "dash": "solid" if sel == "top units" else "dash"}
        y_ext = sub["extracted"]
        name = sel
        if sel == "random units" and "random_extracted_mean" in sub and band:
            y_ext, name = sub["random_extracted_mean"], "random units (mean of the draws)"
        err = None
        if sel == "top units" and {"extracted_lo", "extracted_hi"} <= set(sub.columns):
            err = _err(sub["extracted"], sub["extracted_lo"], sub["extracted_hi"], color)
        fig.add_trace(
            go.Scatter(
                x=sub["top_percent"],
                y=y_ext,
                mode="lines+markers",
                name=name,
                legendgroup=sel,
                marker={"size": 12, "color": color},
                line=style,
                error_y=err,
                hovertemplate="k = %{x:g}%<br>%{y:.3g} images extracted<extra>" + sel + "</extra>",
            ),
            row=1,
            col=1,
        )
        if quality in sub and sub[quality].notna().any():
            qerr = None
            if quality == "fd" and {"fd_lo", "fd_hi"} <= set(sub.columns) and sub["fd_lo"].notna().any():
                qerr = _err(sub["fd"], sub["fd_lo"], sub["fd_hi"], color)
            fig.add_trace(
                go.Scatter(
                    x=sub["top_percent"],
                    y=sub[quality],
                    mode="lines+markers",
                    name=sel if sel == "top units" else "random units (first draw)",
                    legendgroup=sel,
                    showlegend=False,
                    marker={"size": 12, "color": color},
                    line=style,
                    error_y=qerr,
                    hovertemplate="k = %{x:g}%<br>%{y:.4g}<extra>" + sel + "</extra>",
                ),
                row=1,
                col=2,
            )
    tops = [
        df[c].max() for c in ("extracted", "random_extracted_q95", "extracted_hi") if c in df and df[c].notna().any()
    ]
    ymax = float(max(tops)) if tops else 0.0
    fig.update_yaxes(rangemode="tozero", range=[0, ymax * 1.1 + 1] if ymax > 0 else None, row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    for c in (1, 2):
        fig.update_xaxes(title="units edited: top k% by UnitMem", tickvals=ks, ticksuffix="%", row=1, col=c)
    if current_k is not None:
        for c in (1, 2):
            fig.add_vline(x=float(current_k), line_width=2, line_dash="dot", line_color="#333", row=1, col=c)
        fig.add_annotation(
            x=float(current_k),
            y=1.0,
            yref="paper",
            xref="x",
            text=f"your k = {float(current_k):g}%",
            showarrow=False,
            yshift=-4,
            xanchor="left",
            font={"size": FONT_SIZE - 3},
        )
    fig.update_annotations(font_size=FONT_SIZE)
    return _layout(fig, title, height=430, legend={"orientation": "h", "y": -0.3})


DOSE_SERIES = {
    "unitmem": ("top units by UnitMem", SERIES["top units"], "solid"),
    "random": ("random units (median of the draws)", SERIES["random units"], "dash"),
    "union": ("union of the per-image minimal sets", "#009E73", "solid"),
    "greedy": ("greedy cover (attribution-guided)", "#CC79A7", "dot"),
}


def dose_frame(res: Mapping) -> pd.DataFrame:
    """One row per point of the dose-response curves of `dose.run_dose_response`: selection, n_units,
    extracted (the random curve: the draws' median) and q05 / q95 (the random band)."""
    rows = []
    for name, pts in res.get("curves", {}).items():
        for r in pts:
            rows.append(
                {
                    "selection": name,
                    "n_units": int(r["n_units"]),
                    "extracted": float(r["extracted"]),
                    "q05": r.get("q05"),
                    "q95": r.get("q95"),
                    "top_percent": r.get("top_percent"),
                    "n_images": r.get("n_images"),
                }
            )
    return pd.DataFrame(rows, columns=["selection", "n_units", "extracted", "q05", "q95", "top_percent", "n_images"])


def dose_curve(df: pd.DataFrame, title: str, n_units_total: int) -> go.Figure:
    """Copies still extracted against the number of units edited (log axis) for the four selections of `dose`,
    the random curve with its shaded 5-95% band; the unedited model's count (n = 0) is a dotted line."""
    fig = go.Figure()
    d = df[df["n_units"] > 0]
    n0 = df.loc[df["n_units"] == 0, "extracted"]
    rnd = d[d["selection"] == "random"].sort_values("n_units")
    if len(rnd) and rnd["q05"].notna().any():
        r = rnd.dropna(subset=["q05"])
        fig.add_trace(
            go.Scatter(
                x=list(r["n_units"]) + list(r["n_units"])[::-1],
                y=list(r["q95"]) + list(r["q05"])[::-1],
                mode="lines",
                fill="toself",
                fillcolor="rgba(230, 159, 0, 0.25)",
                line={"width": 0},
                hoverinfo="skip",
                name="random units: 5-95% of the draws",
            )
        )
    for name, (label, color, dash) in DOSE_SERIES.items():
        sub = d[d["selection"] == name].sort_values("n_units")
        if not len(sub):
            continue
        fig.add_trace(
            go.Scatter(
                x=sub["n_units"],
                y=sub["extracted"],
                customdata=100.0 * sub["n_units"] / max(1, n_units_total),
                mode="lines+markers",
                name=label,
                marker={"size": 10, "color": color},
                line={"width": 4, "color": color, "dash": dash},
                hovertemplate="%{x} units (%{customdata:.2f}% of all)<br>%{y:g} copies still "
                f"extracted<extra>{label}</extra>",
            )
        )
    if len(n0):
        fig.add_hline(
            y=float(n0.iloc[0]),
            line_dash="dot",
            line_color="#333",
            annotation_text=f"unedited: {float(n0.iloc[0]):g} copies",
            annotation_position="top right",
            annotation_font_size=FONT_SIZE - 3,
        )
    ymax = float(df["extracted"].max()) if len(df) else 1.0
    fig.update_yaxes(title="copies still extracted", rangemode="tozero", range=[0, ymax * 1.08 + 0.5])
    fig.update_xaxes(title=f"units edited (log scale; {n_units_total:,} units in all)", type="log")
    return _layout(fig, title, height=460, legend={"orientation": "h", "y": -0.28})


def _err(y, lo, hi, color: str) -> dict:
    return {
        "type": "data",
        "symmetric": False,
        "array": (pd.Series(hi).to_numpy(float) - pd.Series(y).to_numpy(float)).clip(min=0),
        "arrayminus": (pd.Series(y).to_numpy(float) - pd.Series(lo).to_numpy(float)).clip(min=0),
        "color": color,
        "thickness": 2,
    }


def margin_chart(df: pd.DataFrame, title: str, measure: str) -> go.Figure:
    """The margin view: per candidate (x, sorted by its margin before the edit) similarity minus threshold
    before the edit and after it, with the random draws' 5-95% band; above 0 = extracted.

    `df` is `intervention.margin_table(...)`: image_id, planted, count, margin_before, margin_after and
    optionally margin_random_median / _q05 / _q95.
    """
    x = np.arange(len(df))
    planted = df["planted"].to_numpy() == 1 if "planted" in df else np.zeros(len(df), bool)
    label = [
        f"{i}" + ((f" (planted {int(c)}x)" if int(c) else " (planted)") if p else "")
        for i, p, c in zip(df["image_id"], planted, df["count"])
    ]
    fig = go.Figure()
    if "margin_random_q05" in df:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=df["margin_random_median"],
                mode="markers",
                name="random draws: median, 5-95%",
                marker={"size": 7, "color": SERIES["random units"], "symbol": "line-ew-open", "line": {"width": 3}},
                error_y=_err(
                    df["margin_random_median"], df["margin_random_q05"], df["margin_random_q95"], SERIES["random units"]
                ),
                text=label,
                hovertemplate="%{text}<br>random draws: median %{y:.3f}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=df["margin_before"],
            mode="markers",
            name="before the edit",
            marker={"size": 9, "color": SERIES["held-out"], "symbol": np.where(planted, "diamond", "circle")},
            text=label,
            hovertemplate="%{text}<br>before: %{y:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=df["margin_after"],
            mode="markers",
            name="after the edit (top units)",
            marker={"size": 11, "color": SERIES["top units"], "symbol": np.where(planted, "diamond", "circle")},
            text=label,
            hovertemplate="%{text}<br>after: %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=0, line_width=2, line_dash="dash", line_color="#333", annotation_text="threshold")
    fig.update_xaxes(title="candidates, by margin before the edit (diamonds: planted items)", showticklabels=False)
    fig.update_yaxes(title=f"{measure} minus threshold")
    return _layout(fig, title, height=400, legend={"orientation": "h", "y": -0.22})


def before_after_bars(df: pd.DataFrame, title: str) -> go.Figure:
    """Grouped bars of one metric before the edit, after it, and after the random control."""
    fig = go.Figure(
        go.Bar(
            x=df["setting"],
            y=df["value"],
            marker_color=[SERIES.get(s, "#0072B2") for s in df["color"]],
            text=[f"{v:.3g}" for v in df["value"]],
            textposition="outside",
        )
    )
    fig.update_yaxes(title=str(df["metric"].iloc[0]) if len(df) else "", rangemode="tozero")
    return _layout(fig, title, height=340)


# ---- images --------------------------------------------------------------------------------------------
def colormap(x: np.ndarray, scale: str = SEQUENTIAL, vmax: float | None = None) -> np.ndarray:
    """Float array [...] -> uint8 RGB [..., 3] through a plotly colour scale (0 -> first colour)."""
    x = np.asarray(x, dtype=np.float64)
    top = float(np.nanmax(x)) if vmax is None else float(vmax)
    t = np.clip(x / top, 0.0, 1.0) if top > 0 else np.zeros_like(x)
    lut = np.array(
        [[int(c) for c in s[4:-1].split(",")] for s in sample_colorscale(scale, np.linspace(0, 1, 256))], dtype=np.uint8
    )
    return lut[np.round(np.nan_to_num(t) * 255).astype(np.int64)]


def to_uint8(images_B3HW) -> np.ndarray:
    """Float images [B, 3, H, W] in [0, 1] (tensor or array) -> uint8 [B, H, W, 3]."""
    a = np.asarray(images_B3HW.detach().cpu() if hasattr(images_B3HW, "detach") else images_B3HW, np.float32)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def difference_maps(before_B3HW, after_B3HW) -> np.ndarray:
    """Mean over channels of |after - before|, [B, H, W] in [0, 1]."""
    b = np.asarray(before_B3HW.detach().cpu() if hasattr(before_B3HW, "detach") else before_B3HW, np.float32)
    a = np.asarray(after_B3HW.detach().cpu() if hasattr(after_B3HW, "detach") else after_B3HW, np.float32)
    return np.abs(a - b).mean(axis=1)


def token_map_image(ids_hw: np.ndarray, vocab_size: int) -> np.ndarray:
    """A token-id map [h, w] as a colour image (colour = id / vocab; neighbouring ids are not similar)."""
    return colormap(np.asarray(ids_hw, np.float64) / max(vocab_size - 1, 1), SEQUENTIAL, vmax=1.0)


# ---- export --------------------------------------------------------------------------------------------
def find_chrome() -> str | None:
    """The Chrome/Chromium that kaleido would drive ($BROWSER_PATH, PATH, the usual places), or None.

    Never downloads one (kaleido can, but iarmem runs offline)."""
    try:
        from choreographer.browsers.chromium import Chromium  # kaleido's browser driver
    except ImportError:
        return None
    try:
        return Chromium.find_browser(skip_local=False)
    except Exception:  # a broken installation is as good as none
        return None


def png_renderer_missing(chart) -> str | None:
    """None when `to_png(chart)` can render, else what to install."""
    import importlib.util

    if isinstance(chart, go.Figure):
        if importlib.util.find_spec("kaleido") is None:
            return "PNG export needs kaleido and a local Chrome/Chromium; the chart toolbar's camera saves a PNG too"
        if find_chrome() is None:
            return (
                "PNG export of this chart needs a local Chrome or Chromium (e.g. apt-get install chromium, or "
                "BROWSER_PATH=/path/to/chrome); the chart toolbar's camera saves a PNG too"
            )
        return None
    if importlib.util.find_spec("vl_convert") is None:
        return "PNG export of this chart needs vl-convert-python"
    return None


def to_png(chart, scale: float = 2.0) -> bytes:
    """PNG bytes of a plotly figure (kaleido, which drives a local Chrome/Chromium) or an altair chart
    (vl-convert); a RuntimeError that says what to install when the renderer is missing."""
    if isinstance(chart, go.Figure):
        try:
            import kaleido  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "PNG export of plotly charts needs kaleido (pip install kaleido) and a local "
                "Chrome or Chromium; the camera icon in the chart toolbar saves a PNG too"
            ) from e
        return chart.to_image(format="png", scale=scale)
    try:
        import vl_convert as vlc
    except ImportError as e:
        raise RuntimeError("PNG export of altair charts needs vl-convert (pip install vl-convert-python)") from e
    import altair as alt

    if getattr(chart, "width", alt.Undefined) is alt.Undefined:
        # the app draws altair charts container-wide; a file has no container, so give it a slide's width
        # (vega-lite's default would make a 6-block box plot about 250 px wide)
        chart = chart.properties(width=PNG_WIDTH)
    return vlc.vegalite_to_png(chart.to_json(), scale=scale)
