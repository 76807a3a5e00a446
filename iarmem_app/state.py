"""The view state: every setting a user can change lives in st.session_state under one key and in the URL.

All parameters are registered here, once, with their default and type. `init()` runs at the top of every
script run: a new session (a refresh, a shared link) takes its values from the URL query string, and an
existing session keeps its values across page switches (re-assigning a widget's key keeps Streamlit from
dropping the value of a widget that the current page does not draw). `sync_url()` runs at the end and writes
every value that differs from its default back into the URL, so the address bar always holds the view.

Widgets are drawn with `widget(st.selectbox, "model", ...)`: the widget gets its own key (``w_model``), is
set from the parameter before it is drawn, and copies its value back in its on_change callback. Parameters
are plain session state, which Streamlit never drops (it drops the state of widgets a page does not draw).

A URL is input from anyone who sends a link: every value is checked when it is read (`check`). A number
that is not finite or outside the parameter's range is clamped into it, a value that is not one of the
choices falls back to the default, a malformed list item is dropped, an overlong text is refused; each case
leaves a note that names the parameter (`notes()`, shown at the top of the page as plain text). Nothing a
URL says starts heavy work: an unknown model is no model at all (`other_model` falls back to "", nothing
chosen), and loading a full-size model needs a click (iarmem_app.loaders).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from iarmem_app import config

MAX_TEXT = 4096  # longest accepted URL text value (paths, unit lists)
_UNIT_TAG = re.compile(r"^[0-9]{1,6}:[0-9]{1,9}$")


@dataclass(frozen=True)
class Param:
    key: str
    default: object
    kind: str = "str"  # str, int, float, bool, list (comma-separated strings)
    choices: Callable[[], list] | None = None  # valid values (others fall back to the default)
    lo: float | None = None  # numbers: the range a URL value is clamped into
    hi: float | None = None
    item: re.Pattern | None = None  # lists: the pattern every item must match


PARAMS: dict[str, Param] = {}


def register(
    key: str,
    default: object,
    kind: str = "str",
    choices: Callable[[], list] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    item: re.Pattern | None = None,
) -> None:
    PARAMS[key] = Param(key, default, kind, choices, lo, hi, item)


# sidebar
register("model", config.default_model(), choices=lambda: config.quick_models() + ["other"])
register("other_model", "", choices=lambda: [""] + config.other_models())  # "": none chosen yet
register("ckpt", "")
register("tok_ckpt", "")
register("data", "demo", choices=lambda: ["demo", "folder"])
register("folder", "")
register("device", "auto", choices=lambda: list(config.DEVICES))
register("seed", 0, "int", lo=0, hi=2**31 - 1)
register("backend", "local", choices=lambda: ["local", "ray"])
register("ray_address", config.ray_address())
# model page
register("image", "")
# memorization page
register("summary", "mean", choices=lambda: ["mean", "max", "top1pct_mean"])
register("mem_view", "unitmem", choices=lambda: ["unitmem", "null", "class"])
register("mem_block", -1, "int", lo=-1)
register("mem_group", "")
register("mem_unit", -1, "int", lo=-1)
# extraction page
register("ex_measure", "")
register("ex_threshold", -1.0, "float")
register("ex_show", "extracted", choices=lambda: ["extracted", "all", "planted", "held-out"])
# intervention page
register("iv_mode", "top-k%", choices=lambda: ["top-k%", "picked units"])
register("iv_top", 10.0, "float", lo=0.0, hi=50.0)
register("iv_factor", 0.5, "float", lo=0.0, hi=1.0)
register("iv_ranking", "global", choices=lambda: ["global", "per_block", "per_group"])
register("iv_op", "fc1_scale", choices=lambda: ["fc1_scale", "zero", "out_scale"])
register("iv_units", [], "list", item=_UNIT_TAG)
register("iv_edit_on", True, "bool")
register("iv_labels", "0,1,2,3,4,5,6,7")
register("iv_seed", 0, "int")  # the side-by-side samples only (no stored result depends on it)


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check(p: Param, raw: str | None) -> tuple[object, str | None]:
    """A URL string -> (the parameter's value, a note naming the parameter when the string was not usable
    as given). Invalid: the default; out of range or not finite: clamped; bad list items: dropped."""
    if raw is None:
        return p.default, None
    if len(raw) > MAX_TEXT:
        return p.default, f"URL parameter {p.key}: {len(raw):,} characters is too long (at most {MAX_TEXT}); ignored"
    try:
        if p.kind == "int":
            v: object = int(raw)
        elif p.kind == "float":
            v = float(raw)
            if not math.isfinite(v):
                return p.default, f"URL parameter {p.key}={_shown(raw)} is not a finite number; using {p.default}"
        elif p.kind == "bool":
            v = raw.lower() in ("1", "true", "yes", "on")
        elif p.kind == "list":
            items = [s for s in raw.split(",") if s]
            v = [s for s in items if p.item is None or p.item.match(s)]
            if len(v) < len(items):
                bad = [s for s in items if s not in v]
                return v, (
                    f"URL parameter {p.key}: dropped {', '.join(map(_shown, bad[:5]))}"
                    + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                    + " (expected block:unit, e.g. 3:17)"
                )
        else:
            v = raw
    except ValueError:
        return (
            p.default,
            f"URL parameter {p.key}={_shown(raw)} is not {'an integer' if p.kind == 'int' else 'a number'}; "
            f"using {p.default}",
        )
    if p.kind in ("int", "float") and (p.lo is not None or p.hi is not None):
        lo = -math.inf if p.lo is None else p.lo
        hi = math.inf if p.hi is None else p.hi
        if not lo <= v <= hi:
            c = min(max(v, lo), hi)
            c = int(c) if p.kind == "int" else float(c)
            rng = (
                f"{_num(p.lo)}..{_num(p.hi)}"
                if p.lo is not None and p.hi is not None
                else f">= {_num(p.lo)}"
                if p.lo is not None
                else f"<= {_num(p.hi)}"
            )
            return c, f"URL parameter {p.key}={_shown(raw)} is outside {rng}; using {_num(c)}"
    if p.choices is not None and v not in p.choices():
        if p.key == "other_model":
            return (
                p.default,
                f"URL parameter other_model={_shown(raw)} is not a registry model; choose one in the sidebar",
            )
        shown = ", ".join(map(str, p.choices()))
        return p.default, f"URL parameter {p.key}={_shown(raw)} is not one of {shown}; using {p.default}"
    return v, None


def parse(p: Param, raw: str | None):
    """A URL string -> the parameter's value, or its default when absent or invalid (see `check`)."""
    return check(p, raw)[0]


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
    notes = []
    for p in PARAMS.values():
        raw = qp.get(p.key)
        if p.key not in ss or (raw is not None and raw != last.get(p.key)):
            ss[p.key], note = check(p, raw)
            if note:
                notes.append(note)
        if p.choices is not None and ss[p.key] not in p.choices():
            ss[p.key] = p.default
    if notes:  # shown until the user changes a setting (a rerun or a page switch keeps them)
        ss["_url_notes"] = notes


def notes() -> list[str]:
    """What the URL had that could not be used as given (one line per parameter, plain text); kept until
    the user changes a setting."""
    return list(st.session_state.get("_url_notes", []))


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
        ss.pop("_url_notes", None)  # the user took over: the link's notes are done
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
