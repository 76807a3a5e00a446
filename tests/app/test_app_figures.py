"""Figures and app helpers without a browser: frames round-trip, colour maps, unit selection, URL parsing."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from iarmem_app import edits, state
from iarmem_core import figures
from iarmem_core.unitmem import UnitMemResult


def test_heatmap_frame_round_trips_and_cells_are_clickable():
    z = np.arange(12, dtype=np.float64).reshape(4, 3) / 11
    df = figures.heatmap_frame(z, [0, 1, 2, 3], ["1x1", "2x2", "3x3"])
    assert len(df) == 12 and list(df.columns) == ["block", "group", "group_index", "unitmem"]
    back, blocks, groups = figures.frame_matrix(df)
    np.testing.assert_array_equal(back, z)
    fig = figures.unitmem_heatmap(df, "t", selected=(2, "3x3"))
    heat, cells, sel = fig.data
    np.testing.assert_array_equal(np.asarray(heat.z), z)
    # one invisible clickable point per cell, carrying [block, group, value]
    assert len(cells.customdata) == 12 and list(cells.customdata[5]) == [1, "3x3", pytest.approx(5 / 11)]
    assert cells.hoverinfo != "skip"  # plotly sends no click events for hoverinfo="skip"
    assert sel.x == ("3x3",) and sel.y == ("block 2",)
    with pytest.raises(ValueError, match="2 blocks x 3 groups"):
        figures.heatmap_frame(z, [0, 1], ["a", "b", "c"])


def test_colormap_ends_and_difference_maps():
    lut = figures.colormap(np.array([0.0, 1.0, 2.0]), "Viridis", vmax=1.0)
    assert lut.dtype == np.uint8 and lut.shape == (3, 3)
    assert tuple(lut[0]) == (68, 1, 84) and tuple(lut[1]) == (253, 231, 37)  # viridis ends
    assert tuple(lut[2]) == tuple(lut[1])  # clipped at vmax
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1, :, 0, 0] = 0.5
    d = figures.difference_maps(a, b)
    assert d.shape == (2, 4, 4) and d[0].max() == 0 and d[1, 0, 0] == pytest.approx(0.5) and d[1].sum() == 0.5
    img = figures.to_uint8(b)
    assert img.shape == (2, 4, 4, 3) and img[1, 0, 0, 0] == 128


def test_tradeoff_curve_has_k_on_the_x_axis_of_two_panels():
    df = pd.DataFrame(
        {
            "top_percent": [10, 0, 10, 0],  # out of order: joined in k order anyway
            "fd": [1.5, 1.0, 1.2, 1.0],
            "extracted": [2, 13, 11, 13],
            "selection": ["top units", "top units", "random units", "random units"],
        }
    )
    fig = figures.tradeoff_curve(df, "t", current_k=10)
    ext = [t for t in fig.data if t.xaxis == "x"]
    qual = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in ext] == ["top units", "random units"] and len(qual) == 2
    assert list(ext[0].x) == [0, 10] and list(ext[0].y) == [13, 2]  # k order
    assert list(qual[0].y) == [1.0, 1.5] and list(fig.layout.xaxis.tickvals) == [0, 10]
    assert all(t.text is None for t in fig.data)  # no labels on the points that could collide
    # the current k is marked in both panels
    assert sum(1 for s in fig.layout.shapes if s.x0 == 10 and s.x1 == 10) == 2


def test_tradeoff_curve_shows_the_band_of_the_random_draws():
    df = pd.DataFrame(
        {
            "top_percent": [0, 10, 0, 10],
            "fd": [1.0, 1.5, 1.0, 1.2],
            "extracted": [13, 9, 13, 12],
            "extracted_lo": [10, 6, 10, 9],
            "extracted_hi": [16, 12, 16, 15],
            "selection": ["top units", "top units", "random units", "random units"],
            "random_draws": [0, 20, 0, 20],
            "random_extracted_mean": [13, 12.5, 13, 12.5],
            "random_extracted_q05": [13, 11, 13, 11],
            "random_extracted_q95": [13, 14, 13, 14],
        }
    )
    fig = figures.tradeoff_curve(df, "t")
    band = fig.data[0]
    assert band.fill == "toself" and "20 draws" in band.name
    assert list(band.x) == [0, 10, 10, 0] and list(band.y) == [13, 14, 11, 13]  # q95 out, q05 back
    top = [t for t in fig.data if t.name == "top units"][0]
    assert list(top.error_y.array) == [3, 3] and list(top.error_y.arrayminus) == [3, 3]
    rnd = [t for t in fig.data if t.name.startswith("random units (mean")][0]
    assert list(rnd.y) == [13, 12.5]
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] > 16  # room above the interval


def test_margin_chart_marks_the_threshold_and_planted_images():
    df = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "planted": [1, 0, -1],
            "count": [64, -1, -1],
            "margin_before": [0.3, 0.0, -0.2],
            "margin_after": [0.1, -0.1, -0.3],
            "margin_random_median": [0.25, 0.0, -0.2],
            "margin_random_q05": [0.2, -0.05, -0.25],
            "margin_random_q95": [0.3, 0.02, -0.1],
        }
    )
    fig = figures.margin_chart(df, "m", "token_match")
    names = [t.name for t in fig.data]
    assert names == ["random draws: median, 5-95%", "before the edit", "after the edit (top units)"]
    assert list(fig.data[2].y) == [0.1, -0.1, -0.3] and list(fig.data[2].marker.symbol) == [
        "diamond",
        "circle",
        "circle",
    ]
    assert "planted 64x" in fig.data[1].text[0]
    assert fig.layout.shapes[0].y0 == 0  # the threshold line


def test_png_export_of_both_chart_kinds():
    df = figures.heatmap_frame(np.eye(2), [0, 1], ["a", "b"])
    charts = [figures.unitmem_distributions(figures.distribution_frame(np.random.rand(2, 8), [0, 1]), "d")]
    if figures.png_renderer_missing(go.Figure()) is None:
        charts.append(figures.unitmem_heatmap(df, "h"))
    for c in charts:
        if figures.png_renderer_missing(c) is not None:
            pytest.skip(figures.png_renderer_missing(c))
        png = figures.to_png(c)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if not isinstance(c, go.Figure):  # the box plot: a slide's width, not vega-lite's ~250 px default
            from PIL import Image

            assert Image.open(io.BytesIO(png)).size[0] >= 2 * figures.PNG_WIDTH


def test_png_button_says_what_is_missing_without_a_browser(monkeypatch):
    """kaleido without any Chrome/Chromium: the PNG button is disabled with the fix, never an empty file."""
    if figures.png_renderer_missing(go.Figure()) is not None and figures.find_chrome() is not None:
        pytest.skip("kaleido is not installed")
    monkeypatch.setattr(figures, "find_chrome", lambda: None)
    msg = figures.png_renderer_missing(go.Figure())
    assert msg is not None and "Chromium" in msg and "camera" in msg


def _result(um_LGU: np.ndarray) -> UnitMemResult:
    L, G, U = um_LGU.shape
    return UnitMemResult(
        {"unitmem_LGU": um_LGU}, {"blocks": list(range(L)), "scale_groups": list(range(G)), "n_units": U}
    )


def test_select_units_takes_the_top_percent_by_max_over_groups():
    um = np.zeros((2, 2, 10), np.float32)
    um[1, 0, 3] = 0.9  # the best unit: block 1, unit 3 (its max over groups)
    um[0, 1, 7] = 0.8
    um[0, 0, 2] = 0.5
    assert edits.select_units(_result(um), 10.0) == {0: (7,), 1: (3,)}  # 10% of 20 units
    assert edits.select_units(_result(um), 15.0) == {0: (2, 7), 1: (3,)}
    assert edits.select_units(_result(um), 10.0, ranking="per_block") == {0: (7,), 1: (3,)}
    assert edits.parse_units(["3:17", "3:2", "bad", "1:0"]) == {1: (0,), 3: (2, 17)}


def test_url_values_parse_with_fallbacks():
    p = state.PARAMS
    assert state.parse(p["seed"], "7") == 7 and state.parse(p["seed"], "x") == 0
    assert state.parse(p["iv_factor"], "0.25") == 0.25
    assert state.parse(p["iv_edit_on"], "0") is False and state.parse(p["iv_edit_on"], "1") is True
    assert state.parse(p["iv_units"], "1:2,3:4") == ["1:2", "3:4"]
    assert state.parse(p["summary"], "median") == "mean"  # not a choice: the default
    assert state.fmt(p["iv_units"], ["1:2", "3:4"]) == "1:2,3:4"


def test_the_library_imports_no_streamlit():
    """iarmem_core (figures included) must run in a notebook or the CLI without streamlit (ARCHITECTURE.md)."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, iarmem_core\n"
        "for m in pkgutil.walk_packages(iarmem_core.__path__, 'iarmem_core.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "print('streamlit' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )
    assert out.stdout.strip() == "False", out.stderr
