"""The view state: every setting a user can change lives in st.session_state under one key and in the URL.

All parameters are registered here, once, with their default and type. `init()` runs at the top of every
script run: a new session (a refresh, a shared link) takes its values from the URL query string, and an
existing session keeps its values across page switches (re-assigning a widget's key keeps Streamlit from
dropping the value of a widget that the current page does not draw). `sync_url()` runs at the end and writes
every value that differs from its default back into the URL, so the address bar always holds the view.

Widgets are drawn with `widget(st.selectbox, "model", ...)`: the widget gets its own key (``w_model``), is
set from the parameter before it is drawn, and copies its value back in its on_change callback. Parameters
are plain session state, which Streamlit never drops (it drops the state of widgets a page does not draw).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from iarmem_app import config


@dataclass(frozen=True)
class Param:
    key: str
    default: object
    kind: str = "str"  # str, int, float, bool, list (comma-separated strings)
    choices: Callable[[], list] | None = None  # valid values (others fall back to the default)


PARAMS: dict[str, Param] = {}


def register(key: str, default: object, kind: str = "str", choices: Callable[[], list] | None = None) -> None:
    PARAMS[key] = Param(key, default, kind, choices)


# sidebar
register("model", config.default_model(), choices=lambda: config.quick_models() + ["other"])
register("other_model", "var-d16", choices=config.other_models)
register("ckpt", "")
register("tok_ckpt", "")
register("data", "demo", choices=lambda: ["demo", "folder"])
register("folder", "")
register("device", "auto", choices=lambda: list(config.DEVICES))
register("seed", 0, "int")
# model page
register("image", "")
# memorization page
register("summary", "mean", choices=lambda: ["mean", "max", "top1pct_mean"])
register("mem_block", -1, "int")
register("mem_group", "")
register("mem_unit", -1, "int")
# extraction page
register("ex_measure", "")
register("ex_threshold", -1.0, "float")
register("ex_show", "extracted", choices=lambda: ["extracted", "all", "planted", "held-out"])
# intervention page
register("iv_mode", "top-k%", choices=lambda: ["top-k%", "picked units"])
register("iv_top", 10.0, "float")
register("iv_factor", 0.5, "float")
register("iv_ranking", "global", choices=lambda: ["global", "per_block", "per_group"])
register("iv_op", "fc1_scale", choices=lambda: ["fc1_scale", "zero", "out_scale"])
register("iv_units", [], "list")
register("iv_edit_on", True, "bool")
register("iv_labels", "0,1,2,3,4,5,6,7")
register("iv_seed", 0, "int")  # the side-by-side samples only (no stored result depends on it)


def parse(p: Param, raw: str | None):
    """A URL string -> the parameter's value, or its default when absent or invalid."""
    if raw is None:
        return p.default
    try:
        if p.kind == "int":
            v: object = int(raw)
        elif p.kind == "float":
            v = float(raw)
        elif p.kind == "bool":
            v = raw.lower() in ("1", "true", "yes", "on")
        elif p.kind == "list":
            v = [s for s in raw.split(",") if s]
        else:
            v = raw
    except ValueError:
        return p.default
    if p.choices is not None and v not in p.choices():
        return p.default
    return v


def fmt(p: Param, v) -> str:
    if p.kind == "list":
        return ",".join(str(s) for s in v)
    if p.kind == "bool":
        return "1" if v else "0"
    return str(v)


def init() -> None:
    """Fill st.session_state from the URL and keep values across page switches.

    A new session (refresh, shared link) takes every value from the URL. An existing session keeps its
    values, except those whose URL value changed since the last run wrote it (a link with query parameters,
    an edited address): the URL wins there.
    """
    ss = st.session_state
    qp = st.query_params
    last = ss.get("_url_last", {})
    for p in PARAMS.values():
        raw = qp.get(p.key)
        if p.key not in ss or (raw is not None and raw != last.get(p.key)):
            ss[p.key] = parse(p, raw)
        if p.choices is not None and ss[p.key] not in p.choices():
            ss[p.key] = p.default


def sync_url() -> None:
    """Write every non-default value into the URL query string (nothing else)."""
    ss = st.session_state
    want = {p.key: fmt(p, ss[p.key]) for p in PARAMS.values() if p.key in ss and ss[p.key] != p.default}
    ss["_url_last"] = want
    if dict(st.query_params.to_dict()) != want:
        st.query_params.from_dict(want)


def widget(fn, key: str, *args, on_change=None, **kw):
    """Draw widget `fn` (st.selectbox, st.slider, ...) for parameter `key`; returns its value."""
    ss = st.session_state
    wkey = f"w_{key}"
    ss[wkey] = ss[key]

    def _copy() -> None:
        ss[key] = ss[wkey]
        if on_change is not None:
            on_change()

    fn(*args, key=wkey, on_change=_copy, **kw)
    return ss[key]


def get(key: str):
    return st.session_state[key]


def set_many(**values) -> None:
    """Set parameters from a callback (before the widgets that show them are drawn)."""
    for k, v in values.items():
        if k not in PARAMS:
            raise KeyError(f"unknown view parameter {k!r}")
        st.session_state[k] = v


def model_name() -> str:
    """The registry name of the chosen model."""
    return st.session_state["other_model"] if st.session_state["model"] == "other" else st.session_state["model"]
