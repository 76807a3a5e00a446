"""Widgets shared by the pages: the projector style, explanations, charts with downloads, errors."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import edits, loaders
from iarmem_app.loaders import NeedsChoice, NeedsConfirmation, UserInputError
from iarmem_core import figures
from iarmem_core.store import StoreError

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


_MD_SPECIAL = re.compile(r"[!-/:-@\[-`{-~]")  # every ASCII punctuation character
_AUTOLINK = re.compile(r"(?i)(https?|ftp|mailto|www)(?=[:.])|(?=@)")  # where GFM would start a bare link
_WJ = "\u2060"  # WORD JOINER: invisible, and no "http://", "www." or "a@b" is left to autolink


def md_escape(text: object) -> str:
    """Text that markdown shows exactly as typed: every ASCII punctuation character becomes a numeric
    character reference (`&#58;` for ':'), so no link, image, emphasis, code, HTML, LaTeX or Streamlit
    directive can form; an invisible word joiner after "http", "www" and before "@" keeps bare URLs and
    e-mail addresses from being turned into links; line breaks become spaces. Everything a user or a URL
    supplies (paths, unit lists, file names, messages that quote them) goes through this or `code_span`
    before it reaches st.markdown, st.caption, st.error, an image caption, a label or a help text."""
    s = _AUTOLINK.sub(lambda m: (m.group(1) or "") + _WJ, " ".join(str(text).splitlines()))
    return _MD_SPECIAL.sub(lambda m: f"&#{ord(m.group())};", s)


def code_span(text: object) -> str:
    """`text` as an inline code span whose fence is longer than any run of backticks inside it, so the
    text cannot close the span early (CommonMark): shown verbatim, nothing inside is interpreted."""
    s = " ".join(str(text).splitlines())
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {s} {fence}"


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
    for i in range(n):  # captions render markdown: they may hold file names, so they are escaped
        cols[i % len(cols)].image(imgs_BHW3[i], caption=md_escape(captions[i]), width="stretch", output_format="PNG")


def picked_units(tags: list[str], result) -> dict[int, tuple[int, ...]]:
    """The picked units ({block: units}) of `tags` (the iv_units parameter) that exist in the model of UnitMem
    `result`; the others (a hand-edited URL) are dropped with a warning that names them."""
    bad = edits.unknown_units(tags, result)
    if bad:
        blocks = [int(b) for b in result.meta["blocks"]]
        st.warning(
            md_escape(
                f"URL parameter iv_units: dropped {', '.join(bad[:8])}{' and more' if len(bad) > 8 else ''}: "
                f"this model has blocks {min(blocks)}..{max(blocks)} with units 0..{int(result.n_units) - 1}"
            )
        )
    return edits.parse_units(tags, result)


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a failure inside a page as a message (what failed and what to do), never as a traceback."""
    try:
        yield
    except NeedsChoice as e:
        st.info(md_escape(e), icon=":material/info:")
    except NeedsConfirmation as e:  # a full-size model: loaded only on a click in this session
        st.warning(md_escape(e), icon=":material/memory:")
        st.button(
            f"Load {e.choice.name}",
            key="load_model_confirm",
            type="primary",
            icon=":material/download:",
            on_click=loaders.confirm,
            args=(e.choice,),
        )
    except UserInputError as e:
        st.error(md_escape(e), icon=":material/error:")
    except StoreError as e:  # damaged, read-only or full store: the message says what to do
        log.warning("%s: %s", what, e)
        st.error(md_escape(e), icon=":material/error:")
    except Exception as e:  # anything else: a short message, the details in the server log
        log.exception("%s failed", what)
        st.error(
            md_escape(
                f"{what} failed: {type(e).__name__}: {e}. The server log has the details; change the settings "
                "in the sidebar or report it with that log."
            ),
            icon=":material/error:",
        )
