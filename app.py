"""iarmem: the Streamlit app. `streamlit run app.py` opens on the demo model with its results ready.

Page config, the projector style, the sidebar (model, data, device, seed) and st.navigation over the pages
in app_pages/, registered explicitly. (Not `pages/`: Streamlit runs a file of a folder named `pages` on its
own, without this entry script, when a fresh server's first request is a page's URL.) The view state lives
in the URL (iarmem_app.state).
"""

from __future__ import annotations

import streamlit as st

from iarmem_app import config, loaders, results, state, talk, ui

st.set_page_config(
    page_title="iarmem: memorization in image autoregressive models",
    page_icon=":material/memory:",
    layout="wide",
    initial_sidebar_state="expanded",
)
ui.apply_style()
state.init()
for note in state.notes():  # what the URL asked for that could not be used as given (plain text)
    st.warning(ui.md_escape(note), icon=":material/link_off:")

MEMORIZATION = st.Page(
    "app_pages/memorization.py", title="Memorization", icon=":material/grid_on:", url_path="memorization"
)


def _home() -> None:
    """The address without a page opens the Memorization page. (The default page of st.navigation only answers
    at "/", so /memorization would say "Page not found" if Memorization were the default page itself.)"""
    st.switch_page(MEMORIZATION, query_params=st.query_params.to_dict())


PAGES = [
    st.Page(_home, title="iarmem", url_path="home", default=True, visibility="hidden"),
    st.Page("app_pages/model.py", title="Model", icon=":material/view_in_ar:", url_path="model"),
    MEMORIZATION,
    st.Page("app_pages/extraction.py", title="Extraction", icon=":material/image_search:", url_path="extraction"),
    st.Page("app_pages/intervention.py", title="Intervention", icon=":material/content_cut:", url_path="intervention"),
]
page = st.navigation(PAGES)


def _label(name: str) -> str:
    return {
        "demo-var-ctl": "demo-var-ctl (positive control, VAR)",
        "demo-var": "demo-var (natural, VAR)",
        "demo-rar": "demo-rar (natural, RAR)",
        "test-var": "test-var (tiny VAR, random weights)",
        "test-rar": "test-rar (tiny RAR, random weights)",
        "other": "another registry model ...",
    }.get(name, name)


def _seed_input(col) -> None:
    """The analysis seed. It picks the data selection and seeds every analysis, so a new seed means new results:
    the change waits for a confirmation that says so (the samples of the Intervention page have their own seed)."""
    ss = st.session_state
    ss["w_seed"] = int(ss.get("_seed_pending", ss["seed"]))

    def changed() -> None:
        new = int(ss["w_seed"])
        if new == int(ss["seed"]):
            ss.pop("_seed_pending", None)
        else:
            ss["_seed_pending"] = new

    col.number_input(
        "Seed",
        min_value=0,
        max_value=2**31 - 1,
        step=1,
        key="w_seed",
        on_change=changed,
        help="Seed of the data selection and of every analysis (UnitMem, the attack, the measured quality). The "
        "results shipped with iarmem are for seed 0. The samples on the Intervention page have their own seed.",
    )
    pending = ss.get("_seed_pending")
    if pending is not None:
        st.warning(
            f"Seed {pending} draws another data selection: the results for seed {ss['seed']}"
            f"{' (shipped with iarmem)' if int(ss['seed']) == 0 else ''} do not apply to it, and every analysis "
            "has to run anew for this seed.",
            icon=":material/warning:",
        )
        a, b = st.columns(2)

        def use() -> None:
            state.set_many(seed=int(ss.pop("_seed_pending")))

        def keep() -> None:
            ss.pop("_seed_pending", None)

        a.button(f"Use seed {pending}", on_click=use, key="seed_use", type="primary")
        b.button(f"Keep seed {ss['seed']}", on_click=keep, key="seed_keep")


with st.sidebar:
    st.markdown("### Model")
    state.widget(
        st.selectbox,
        "model",
        "Model",
        config.quick_models() + ["other"],
        format_func=_label,
        label_visibility="collapsed",
    )
    loaders.world_banner(state.get("model"))
    talk.sidebar()
    if state.get("model") == "other":
        state.widget(
            st.selectbox,
            "other_model",
            "Registry model",
            [""] + config.other_models(),
            format_func=lambda m: m or "choose a model ...",
            help="Full-size models need their official checkpoints; without them the weights are random. "
            "A full-size model loads only after you confirm it (the button says its size).",
        )
        state.widget(
            st.text_input,
            "ckpt",
            "Transformer checkpoint",
            placeholder="/path/to/var_d16.pth",
            help="A .pth/.pt/.bin/.safetensors file inside the allowed folders (IARMEM_ALLOWED_ROOTS).",
        )
        state.widget(st.text_input, "tok_ckpt", "Tokenizer checkpoint", placeholder="/path/to/vae_ch160v4096z32.pth")
    st.markdown("### Data")
    state.widget(
        st.radio,
        "data",
        "Data",
        ["demo", "folder"],
        horizontal=True,
        label_visibility="collapsed",
        format_func=lambda d: "bundled demo" if d == "demo" else "image folder",
    )
    if state.get("data") == "folder":
        state.widget(
            st.text_input,
            "folder",
            "ImageFolder path",
            placeholder="/data/imagenet/train",
            help=f"<root>/<class>/<images>; a class-stratified sample of {config.N_IMAGES} images is used.",
        )
    c1, c2 = st.columns(2)
    state.widget(c1.selectbox, "device", "Device", list(config.DEVICES))
    _seed_input(c2)
    st.markdown("### Jobs")
    state.widget(
        st.selectbox,
        "backend",
        "Run jobs on",
        ["local", "ray"],
        format_func=lambda b: "this machine" if b == "local" else "a Ray cluster",
    )
    if state.get("backend") == "ray":
        state.widget(st.text_input, "ray_address", "Ray Jobs API address", placeholder="http://HEAD:8265")
    st.caption(results.where_text())
    st.caption("The address bar holds this view: copy it to share exactly what you see.")

try:
    page.run()
finally:
    state.sync_url()  # also after st.stop(): the URL always holds the view
