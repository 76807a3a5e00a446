"""Figures and app helpers without a browser: frames round-trip, colour maps, unit selection, URL parsing."""

from __future__ import annotations

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


def test_tradeoff_curve_has_both_selections():
    df = pd.DataFrame(
        {
            "top_percent": [0, 10, 0, 10],
            "fd": [1.0, 1.5, 1.0, 1.2],
            "extracted": [13, 2, 13, 11],
            "selection": ["top units", "top units", "random units", "random units"],
        }
    )
    fig = figures.tradeoff_curve(df, "t")
    assert [t.name for t in fig.data] == ["top units", "random units"]
    assert list(fig.data[0].y) == [13, 2] and list(fig.data[0].text) == ["0%", "10%"]


def test_tradeoff_curve_shows_the_range_of_the_random_draws():
    df = pd.DataFrame(
        {
            "top_percent": [0, 10, 0, 10],
            "fd": [1.0, 1.5, 1.0, 1.2],
            "extracted": [13, 9, 13, 12],
            "selection": ["top units", "top units", "random units", "random units"],
            "random_draws": [0, 5, 0, 5],
            "random_extracted_min": [13, 11, 13, 11],
            "random_extracted_max": [13, 13, 13, 13],
        }
    )
    fig = figures.tradeoff_curve(df, "t")
    top, rnd = fig.data
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] > 13  # room above the highest point
    assert top.error_y.array is None  # the ranked edit is one selection
    assert list(rnd.error_y.array) == [0, 1] and list(rnd.error_y.arrayminus) == [0, 1]  # 12 in [11, 13]
    one = df.assign(random_draws=[0, 1, 0, 1])
    assert figures.tradeoff_curve(one, "t").data[1].error_y.array is None  # a single draw has no range


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
