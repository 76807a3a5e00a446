"""A link is input from anyone: what a URL can and cannot make the app do (AppTest, and one real browser).

- No heavy work from a URL alone: an unknown model name loads nothing, a full-size model loads only after a
  click in the session that states its size; the model cache is bounded by memory.
- No markup from user text: paths, unit lists and messages that quote them are shown as typed; in the
  browser a crafted link produces no link and fetches nothing.
- Out-of-range numbers are clamped with a note naming the parameter, never a page-wide error.
- A damaged copy of a result in the user's store gives way to the intact shipped copy, with a warning.
"""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from iarmem_app import config, loaders
from iarmem_core import data, unitmem
from iarmem_core.adapters import load_adapter
from iarmem_core.store import ResultStore
from tests.support.browser import CHROMIUM

EVIL = (
    "[Log in again](https://evil.example/login) ![x](http://127.0.0.1:9/p.png) <img src=//x/p.png> "
    "`a` $evilmath$ :red[r] **b**"
)
# pieces of EVIL that would render as markup (a link, an image, HTML, a URL, LaTeX, a directive) if left as is
MARKUP = ("](https", "![x]", "<img", "evil.example", "127.0.0.1:9", "$evilmath$", ":red[r]", "**b**")


def shown(text: str) -> str:
    """Markdown source escaped by ui.md_escape, as the browser shows it."""
    return html.unescape(text).replace("\u2060", "")


def _outside_code(text: str) -> str:
    return re.sub(r"(`+) .*? \1", "", text)


def rendered_texts(at) -> list[str]:
    """The markdown source of everything AppTest sees that Streamlit renders as markdown."""
    out = []
    for kind in ("markdown", "caption", "error", "warning", "info", "success", "subheader", "title"):
        out += [e.value for e in at.get(kind)]
    out += [c for img in at.image for c in img.captions]
    for m in at.metric:
        out += [m.label, m.proto.help or ""]
    return out


def assert_no_markup(at) -> None:
    for text in rendered_texts(at):
        bare = _outside_code(text)
        for m in MARKUP:
            assert m not in bare, f"{m!r} would render as markup in {text[:300]!r}"


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("IARMEM_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def loads(monkeypatch):
    """Every model load the app asks for, by name; a full-size model is replaced by test-var (no 1.7 GB)."""
    calls: list[str] = []
    real = loaders.load_adapter

    def fake(name, **kw):
        calls.append(name)
        return real("test-var" if name.startswith(("var-", "rar-", "llamagen-")) else name, **kw)

    monkeypatch.setattr(loaders, "load_adapter", fake)
    loaders.clear_models()
    yield calls
    loaders.clear_models()


# ---------------------------------------------------------------------------------------------------------
# heavy work


def test_a_link_alone_never_loads_an_unknown_or_full_size_model(app, own_store, loads):
    from streamlit.testing.v1 import AppTest

    app.query_params.update({"model": "other"})
    at = app.run()
    no_exception(at)
    assert loads == [] and any("Choose a registry model" in shown(i.value) for i in at.info)

    at = AppTest.from_file(app._script_path, default_timeout=120)
    at.query_params.update({"model": "other", "other_model": "var-d16x"})
    at.run()
    no_exception(at)
    assert loads == [] and at.session_state["other_model"] == ""
    assert any("URL parameter other_model='var-d16x' is not a registry model" in shown(w.value) for w in at.warning)

    at = AppTest.from_file(app._script_path, default_timeout=120)
    at.query_params.update({"model": "other", "other_model": "var-d16"})
    at.run()
    no_exception(at)
    assert loads == []  # nothing loaded from the link alone
    cost = " ".join(shown(w.value) for w in at.warning)
    assert "var-d16 is a full-size model: 419 M parameters, about 1.7 GB of memory" in cost
    assert "random weights" in cost
    at.button(key="load_model_confirm").click().run()  # the explicit click
    no_exception(at)
    assert loads == ["var-d16"]
    # a second session finds it loaded: no click, no second load
    at2 = AppTest.from_file(app._script_path, default_timeout=120)
    at2.query_params.update({"model": "other", "other_model": "var-d16"})
    at2.run()
    no_exception(at2)
    assert loads == ["var-d16"] and not [b for b in at2.button if b.key == "load_model_confirm"]


def test_the_model_cache_is_bounded_by_memory(monkeypatch):
    class Fake:
        def __init__(self, name):
            self.name = name

    sizes = {"demo-var": 400, "demo-rar": 300, "test-var": 500, "test-rar": 2000}
    monkeypatch.setattr(loaders, "load_adapter", lambda name, **kw: Fake(name))
    monkeypatch.setattr(loaders, "_adapter_bytes", lambda a: sizes[a.name])
    monkeypatch.setattr(loaders, "model_size", lambda name: (0, sizes[name]))
    monkeypatch.setenv(config.MODEL_MEMORY_ENV, str(1000 / 1e9))  # 1000 bytes
    loaders.clear_models()
    try:

        def choice(name):
            return loaders.ModelChoice(name, None, None, "cpu", 0)

        a = loaders._load_model(choice("demo-var"))
        assert loaders._load_model(choice("demo-var")) is a  # cached
        loaders._load_model(choice("demo-rar"))
        assert [c.name for c, _ in loaders.cached_models()] == ["demo-var", "demo-rar"]  # 700 bytes
        loaders._load_model(choice("demo-var"))  # used again: now the most recent
        loaders._load_model(choice("test-var"))  # 500 more: the least recently used (demo-rar) goes
        assert [c.name for c, _ in loaders.cached_models()] == ["demo-var", "test-var"]
        assert sum(b for _, b in loaders.cached_models()) <= 1000
        with pytest.raises(
            loaders.UserInputError, match=r"more than the app's model memory budget.*APP_MODEL_MEMORY_GB"
        ):
            loaders._load_model(choice("test-rar"))  # alone larger than the budget: refused, nothing dropped
        assert [c.name for c, _ in loaders.cached_models()] == ["demo-var", "test-var"]
    finally:
        loaders.clear_models()


# ---------------------------------------------------------------------------------------------------------
# user text is text


def test_url_text_is_never_rendered_as_markup(app, own_store, tmp_path, monkeypatch):
    app.query_params.update({"data": "folder", "folder": EVIL})
    at = app.run()
    no_exception(at)
    msg = " ".join(shown(e.value) for e in at.error)
    assert EVIL in msg and "does not exist" in msg  # shown exactly as typed ...
    assert_no_markup(at)  # ... and nothing in it became a link, an image, code or a directive
    # a folder that exists, named like a link: its path appears in the data card and the CLI command
    monkeypatch.setenv("IARMEM_ALLOWED_ROOTS", str(tmp_path))
    evil_dir = tmp_path / "[Log in again](javascript:alert(1)) `x` $y$"
    from PIL import Image

    for c in ("a", "b"):
        (evil_dir / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (30 * i, 60, 0)).save(evil_dir / c / f"![p](http:{i}.png")
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(app._script_path, default_timeout=120)
    at.query_params.update({"data": "folder", "folder": str(evil_dir)})
    at.run()
    no_exception(at)
    assert any(str(evil_dir) in m.value for m in at.info)  # the CLI command, verbatim in a code span
    assert_no_markup(at)
    at.switch_page("app_pages/model.py").run()
    no_exception(at)
    assert any(str(evil_dir) in m.value for m in at.markdown)
    assert_no_markup(at)


def test_out_of_range_url_numbers_are_clamped_with_a_note(app, own_store):
    app.query_params.update({"iv_top": "999", "iv_factor": "7", "seed": "-1", "ex_threshold": "nan"})
    at = app.run()
    at.switch_page("app_pages/intervention.py").run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    notes = " ".join(shown(w.value) for w in at.warning)
    for p, using in (("iv_top='999'", "using 50"), ("iv_factor='7'", "using 1"), ("seed='-1'", "using 0")):
        assert f"URL parameter {p} is outside" in notes and using in notes, notes
    assert "URL parameter ex_threshold='nan' is not a finite number" in notes
    assert (at.session_state["iv_top"], at.session_state["iv_factor"], at.session_state["seed"]) == (50.0, 1.0, 0)
    assert any("Mean absolute pixel change" in m.value for m in at.markdown)  # the page works
    assert at.query_params["iv_top"] == "50.0"  # the URL now holds what is shown

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(app._script_path, default_timeout=120)
    at.query_params.update({"iv_mode": "picked units", "iv_units": "99:99999,abc,0:3,[x](y)"})
    at.run()
    at.switch_page("app_pages/intervention.py").run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    notes = " ".join(shown(w.value) for w in at.warning)
    assert "URL parameter iv_units: dropped 'abc', '[x](y)'" in notes
    assert "URL parameter iv_units: dropped 99:99999: this model has blocks" in notes
    edited = [shown(c.value) for c in at.caption if "units edited" in c.value]
    assert edited and edited[0].startswith("**1 units edited**"), edited  # only 0:3 is a unit of this model
    assert_no_markup(at)


# ---------------------------------------------------------------------------------------------------------
# a damaged result


def test_a_damaged_user_copy_gives_way_to_the_shipped_one(app, own_store):
    name = config.default_model()
    adapter = load_adapter(name, device="cpu")
    sel = data.select_demo(n=config.N_IMAGES, seed=0)
    shipped = ResultStore(config.SHIPPED_STORE, read_only=True)
    key = shipped.key(unitmem.KIND, unitmem.job_spec(adapter, sel, unitmem.default_config(name, seed=0)))
    arrays, meta = shipped.load(key)
    user = ResultStore(own_store)
    shutil.copytree(shipped.result_dir(key), user.result_dir(key))
    vdir = user.result_dir(key) / (user.result_dir(key) / "CURRENT").read_text().strip()
    f = vdir / "block_mean_LG.npy"
    f.write_bytes(f.read_bytes()[:-8] + np.float64(99.0).tobytes())  # a damaged copy, the same size
    at = app.run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    warn = " ".join(shown(w.value) for w in at.warning)
    assert f"Your copy of result {key} in {own_store} is damaged" in warn and "block_mean_LG.npy" in warn
    assert "intact copy shipped with iarmem" in warn
    from tests.app.test_app_pages import chart, values

    cols = list(meta["scale_groups"]) if len(meta["token_grids"]) > 1 else None
    z = values(chart(at, "UnitMem per block")["data"][0]["z"])
    want = arrays["block_mean_LG"] if cols is None else arrays["block_mean_LG"][:, cols]
    np.testing.assert_allclose(z, want[:, : z.shape[1]], rtol=1e-6)  # the intact numbers, not the 99
    assert any("shipped with iarmem" in c.value for c in at.caption)
    assert f.exists()  # the damaged copy is left for the user


def test_the_server_listens_on_localhost_only():
    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------
# the same link in a real browser: no link, no image, no request to anywhere


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: run scripts/setup-dev.sh")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed")
def test_a_crafted_link_renders_no_link_and_fetches_nothing(tmp_path):
    import urllib.parse

    from tests.support.browser import chromium, settle, start_server, stop_server

    proc, url = start_server(tmp_path / "store", tmp_path / "streamlit.log")
    try:
        with chromium() as page:
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            q = urllib.parse.urlencode({"data": "folder", "folder": EVIL, "iv_units": EVIL, "iv_mode": "picked units"})
            page.goto(f"{url}/intervention?{q}")
            page.get_by_text("does not exist").first.wait_for(timeout=90_000)
            settle(page)
            links = page.eval_on_selector_all("a", "els => els.map(e => e.href)")
            imgs = page.eval_on_selector_all("img", "els => els.map(e => e.src)")
            text = page.inner_text("body")
    finally:
        stop_server(proc)
    assert "[Log in again](https://evil.example/login)" in text.replace("\u2060", "")  # shown as typed
    assert not [u for u in links if not u.startswith(url)], links  # (the page's own anchors carry its URL)
    assert not [u for u in imgs if not u.startswith((url, "data:", "blob:"))], imgs
    # nothing the link names is fetched (Streamlit itself fetches the page icon's glyph from Google's font
    # server; that request does not depend on the link)
    own = (url, "data:", "blob:", "ws://127.0.0.1", "https://fonts.gstatic.com/s/i/")
    assert not [u for u in requests if not u.startswith(own)], requests
    assert not [u for u in requests if "evil" in u.split("?")[0] or "127.0.0.1:9/" in u or "//x/" in u]
