"""Widgets shared by the pages: the projector style, explanations, charts with downloads, errors."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app.loaders import UserInputError
from iarmem_core import figures

log = logging.getLogger("iarmem.app")

CSS = """
<style>
/* a room with a projector: larger type everywhere, roomier widgets */
html, body, [data-testid="stAppViewContainer"] { font-size: 19px; }
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.05rem; }
[data-testid="stMetricValue"], [data-testid="stMetricValue"] * { font-size: 2.2rem !important; line-height: 1.2; }
[data-testid="stMetricLabel"] p { font-size: 1.05rem !important; }
[data-testid="stCaptionContainer"] { font-size: 0.95rem; }
[data-testid="stSidebar"] [data-testid="stMarkdownContainer"] p { font-size: 1rem; }
/* metric labels wrap instead of being cut ("Held-out 'extracted'" at 1280 px) */
[data-testid="stMetricLabel"], [data-testid="stMetricLabel"] * {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important; }
/* a projector (1280x720): less empty space above the title (just below the fixed header with the menu), so
   the page's main figure starts above the fold */
[data-testid="stMainBlockContainer"], .block-container { padding-top: 4rem !important; }
h1 { font-size: 2.2rem !important; line-height: 1.2 !important; padding-top: 0.2rem !important; }
@media (max-height: 800px) { h1 { font-size: 1.8rem !important; } }
/* the CLI popover shows its whole command (wrapped), however long */
[data-testid="stPopoverBody"] { max-width: min(92vw, 980px) !important; width: min(92vw, 980px) !important; }
/* small images are sent at their own size and scaled by the browser without blurring the tokens */
[data-testid="stImage"] img, [data-testid="stFullScreenFrame"] img { image-rendering: pixelated; }
</style>
"""


def apply_style() -> None:
    st.html(CSS)


def explain(text: str, title: str = "What am I looking at?", expanded: bool = False) -> None:
    """The page's short, collapsible explanation for teaching (markdown, LaTeX allowed)."""
    with st.expander(title, expanded=expanded, icon=":material/school:"):
        st.markdown(text)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "chart"


def plotly_config(name: str) -> dict:
    # the toolbar's camera saves a PNG in the browser, at twice the size for slides
    return {"displaylogo": False, "toImageButtonOptions": {"format": "png", "filename": slug(name), "scale": 2}}


def downloads(chart, df: pd.DataFrame, name: str, cli: str | None, key: str) -> None:
    """CSV and PNG of one chart, and the CLI command that reproduces its numbers."""
    row = st.container(horizontal=True, gap="small")
    c1 = c2 = c3 = row
    c1.download_button(
        "CSV",
        df.to_csv(index=False).encode(),
        file_name=f"{slug(name)}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        icon=":material/table:",
        on_click="ignore",
    )

    def png() -> bytes:
        try:
            return figures.to_png(chart)
        except Exception as e:  # the renderer is optional: say why in the file rather than fail the click
            log.warning("PNG export failed: %s", e)
            return b""

    missing = figures.png_renderer_missing(chart)
    c2.download_button(
        "PNG",
        png,
        file_name=f"{slug(name)}.png",
        mime="image/png",
        key=f"{key}_png",
        icon=":material/image:",
        on_click="ignore",
        disabled=missing is not None,
        help=missing,
    )
    if cli:
        with c3.popover("CLI command", icon=":material/terminal:"):
            st.caption("Reproduces these numbers from a terminal (same store, same result key):")
            st.code(cli, language="bash", wrap_lines=True)


def plotly(fig, df: pd.DataFrame, name: str, key: str, cli: str | None = None, on_select=None) -> object:
    """A plotly chart with its downloads; returns the selection state when `on_select` is given."""
    kw = {"on_select": on_select, "selection_mode": ("points",)} if on_select is not None else {}
    # theme=None: keep the figure's own large fonts and colour-blind-safe colours
    out = st.plotly_chart(fig, key=key, config=plotly_config(name), width="stretch", theme=None, **kw)
    downloads(fig, df, name, cli, key)
    return out


def altair(chart, df: pd.DataFrame, name: str, key: str, cli: str | None = None) -> None:
    st.altair_chart(chart, key=key, width="stretch", theme=None)
    downloads(chart, df, name, cli, key)


def images(imgs_BHW3: np.ndarray, captions: list[str], columns: int | None = None) -> None:
    """A row (or rows) of small images sent at their own size and drawn column-wide by the browser
    (pixelated: tokens stay crisp; nothing is re-encoded larger)."""
    n = len(imgs_BHW3)
    if n == 0:
        return
    cols = st.columns(columns or max(n, 4))  # a lone image stays thumbnail-sized
    for i in range(n):
        cols[i % len(cols)].image(imgs_BHW3[i], caption=captions[i], width="stretch", output_format="PNG")


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a failure inside a page as a message (what failed and what to do), never as a traceback."""
    try:
        yield
    except UserInputError as e:
        st.error(str(e), icon=":material/error:")
    except Exception as e:  # anything else: a short message, the details in the server log
        log.exception("%s failed", what)
        st.error(
            f"{what} failed: {type(e).__name__}: {e}. The server log has the details; change the settings "
            "in the sidebar or report it with that log.",
            icon=":material/error:",
        )
