"""Memorization: UnitMem per block x scale (or position), the token grid, one unit and its images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import loaders, results, state, ui
from iarmem_core import activations, figures, unitmem
from iarmem_core.cli import commands

SUMMARIES = {"mean": "mean over units", "max": "max over units", "top1pct_mean": "mean of the top 1% units"}
VIEWS = {
    "unitmem": "UnitMem",
    "null": "null control: training vs never-trained images",
    "class": "class-controlled UnitMem",
}

st.title("Memorization: which units fire for single training images?")
ui.explain(r"""
A **unit** is one hidden neuron of a transformer block's MLP (after its nonlinearity). For each unit $u$ and
group of token positions $G$ (VAR: one **scale**; next-token models: all positions, a row, or one position),
$\mu_u(x)$ is its mean $|$activation$|$ on training image $x$ (over 10 augmented views and the positions of $G$).

$$\text{UnitMem}(u, G) = \frac{\mu_{\max} - \mu_{\text{rest}}}{\mu_{\max} + \mu_{\text{rest}}}$$

$\mu_{\max}$ is the largest $\mu_u(x)$ over the images, $\mu_{\text{rest}}$ the mean over all the others.
UnitMem is near **1** when a unit fires for one image and hardly for the rest (it memorizes that image),
near **0** when it responds to many images alike.

**How to read it:** each heatmap cell summarizes the units of one block at one scale (bright = high UnitMem).
Click a cell to list its units; pick a unit to see the training image it fires for most. The paper reports that
in VAR high UnitMem sits in early blocks at coarse scales and moves deeper as scales get finer, and in RAR in
middle and late blocks; whether that pattern is memorization is what the controls below test.

**Note for teaching VAR:** the 1x1 scale's row sees only the class label (attention is block-causal across
scales), so units at that scale measure class selectivity, not memorization of one image: every image of a
class gives them the same input, the "image it fires for" is a tie, shown as *class c*.

**What a heatmap cannot show on its own.** A unit that fires for one *atypical* image (a large, bright
garment) scores as high as one that memorized a training image. Two controls tell them apart:
- **Null control**: D' mixed with as many images the model never saw. If memorization drives UnitMem, the top
  units point at training images far more often than at never-trained ones (the share of never-trained
  images among their argmax images stays well below their share of D', 50%). If the share is about 50%, the
  pattern is atypicality (or architecture), not memorization.
- **Class-controlled UnitMem**: the rest statistic is the mean over the *other images of the same class*, so
  class selectivity scores 0 (exactly 0 where a group sees only the class).
Which units *carry* a given image is a causal question: the Extraction page's "Which units carry this image?"
removes them and checks.
""")


def _on_cell() -> None:
    sel = st.session_state.get("mem_heatmap")
    pts = (sel or {}).get("selection", {}).get("points", []) if sel else []
    for p in pts:
        cd = p.get("customdata")
        if cd:
            state.set_many(mem_block=int(cd[0]), mem_group=str(cd[1]), mem_unit=-1)
            return


def _image_caption(res: unitmem.UnitMemResult, i: int, extra: str = "") -> str:
    planted, counts = res.planted, res.counts
    # the control canaries have no dose of the stream (they were trained into demo-var-ctl's units)
    tag = (f" - planted {counts[i]}x" if counts[i] else " - planted") if planted and planted[i] else ""
    return f"{res.image_ids[i]} (class {res.labels[i]}){tag}{extra}"


def _goto_intervention(block: int, unit: int) -> None:
    picked = list(state.get("iv_units"))
    tag = f"{block}:{unit}"
    if tag not in picked:
        picked.append(tag)
    state.set_many(iv_units=picked, iv_mode="picked units")


def _grid(adapter, image_set, mchoice, dchoice, li: int, block: int, scale_idx: int, h: int, w: int) -> None:
    """UnitMem per token position of one scale (the detail pass with every position as a group)."""
    if h * w == 1:
        st.info(f"Scale {h}x{w} has a single token: no grid to show. Pick a finer scale.")
        return
    dcfg = unitmem.default_config(adapter, detail=True, seed=mchoice.seed)
    dkey, dres = results.unitmem_result(adapter, image_set, dcfg)
    cli = commands.unitmem_command(mchoice.args(), dchoice.args(), dcfg)
    if dres is None:
        st.markdown(f"**UnitMem per token position** ({h}x{w} grid) needs a pass with every position as a group.")
        results.job_panel(
            dkey,
            "UnitMem per position",
            lambda: results.start_unitmem(adapter, image_set, dcfg),
            "Compute UnitMem per position (job)",
            done=False,
            widget_key="um_detail",
            command=cli,
        )
        return
    grid = dres.position_grid(block, scale_idx, state.get("summary"))
    gdf = figures.grid_frame(grid)
    title = f"Block {block}, scale {h}x{w}: per token position ({SUMMARIES[state.get('summary')]})"
    ui.plotly(figures.token_grid_heatmap(gdf, title), gdf, title, key="mem_grid", cli=cli)


def main() -> None:
    adapter, mchoice = loaders.get_model()
    image_set, dchoice = loaders.get_data(adapter)
    cfg = unitmem.default_config(adapter, seed=mchoice.seed)
    key, res = results.unitmem_result(adapter, image_set, cfg)
    cli = commands.unitmem_command(mchoice.args(), dchoice.args(), cfg)
    if res is None:
        st.info(
            f"No UnitMem result for **{mchoice.name}** on this data yet. It runs as a background job "
            f"({len(image_set)} images x {cfg.n_augs} views); you can leave the page or close the tab, and "
            f"the result lands in the store. The same job from the CLI: {ui.code_span(cli)}"
        )
        results.job_panel(
            key,
            "UnitMem",
            lambda: results.start_unitmem(adapter, image_set, cfg),
            "Compute UnitMem",
            done=False,
            widget_key="um",
            command=cli,
        )
        return
    meta = res.meta
    groups = res.groups
    blocks = res.blocks
    is_var = res.is_next_scale
    name_to_gid = {g["name"]: i for i, g in enumerate(groups)}

    # 1. the heatmap -----------------------------------------------------------------------------------
    c_view, c_sum = st.columns([3, 2])
    state.widget(c_view.radio, "mem_view", "View", list(VIEWS), format_func=VIEWS.get, horizontal=True)
    state.widget(
        c_sum.radio,
        "summary",
        "Summary over the units of a cell",
        list(SUMMARIES),
        format_func=SUMMARIES.get,
        horizontal=True,
    )
    if state.get("mem_view") == "null":
        _null_control(adapter, mchoice, cfg, res)
    elif state.get("mem_view") == "class":
        _class_controlled(adapter, image_set, mchoice, dchoice, cfg)
    col_ids = res.heatmap_group_ids()
    x_title = "scale (coarse -> fine)" if is_var else "token positions: all, then each row of the grid"
    z = res.summary(state.get("summary"))[:, col_ids]
    col_names = [groups[i]["name"] for i in col_ids]
    # the selected cell: from a click, the URL, or the hottest cell (VAR: past the 1x1 scale, whose units
    # see only the class label and so measure class selectivity)
    if state.get("mem_block") not in blocks or state.get("mem_group") not in name_to_gid:
        skip = 1 if is_var and z.shape[1] > 1 else 0
        bi, gi = np.unravel_index(int(np.argmax(z[:, skip:])), z[:, skip:].shape)
        gi += skip
        state.set_many(mem_block=blocks[bi], mem_group=col_names[gi])
    block, gname = int(state.get("mem_block")), str(state.get("mem_group"))
    li, gid = blocks.index(block), name_to_gid[gname]
    df = figures.heatmap_frame(z, blocks, col_names)
    per = "scale" if is_var else "position"
    title = f"{mchoice.name}: UnitMem per block x {per} ({SUMMARIES[state.get('summary')]})"
    fig = figures.unitmem_heatmap(df, title, x_title=x_title, selected=(block, gname) if gname in col_names else None)
    ui.plotly(fig, df, title, key="mem_heatmap", cli=cli, on_select=_on_cell)
    views = (meta.get("views") or {}).get("rule") or f"{meta['config']['n_augs']} views ({meta['augmentation']})"
    st.caption(
        f"{len(meta['image_ids'])} images; views: {views}; mu_rest = {meta['config']['rest']} of the other images; "
        f"{meta['n_units']} units per block. Result {key}, {results.source_label(key)}. Click a cell to inspect it. "
        f"{_distinct_caption(res, col_ids)}"
    )

    # 2. the chosen cell: token grid and its units -------------------------------------------------------
    st.subheader(f"Block {block}, {gname}")
    c1, c2 = st.columns(2)
    state.widget(c1.selectbox, "mem_block", "Block", blocks, on_change=lambda: state.set_many(mem_unit=-1))
    choosable = [groups[i]["name"] for i in range(len(groups)) if groups[i]["kind"] in ("scale", "row")] or col_names
    if gname not in choosable:
        choosable = choosable + [gname]
    state.widget(c2.selectbox, "mem_group", "Group", choosable, on_change=lambda: state.set_many(mem_unit=-1))
    grid_col, units_col = st.columns([2, 3])
    scale_idx = int(groups[gid]["scale"])
    h, w = res.token_grids[scale_idx]
    with grid_col:
        _grid(adapter, image_set, mchoice, dchoice, li, block, scale_idx, h, w)
    um_U = res.unitmem[li, gid]
    top = res.top_units(block, gid, 50)
    unit = int(state.get("mem_unit"))
    if unit < 0 or unit >= res.n_units:
        unit = top[0]
        state.set_many(mem_unit=unit)
    options = top if unit in top else [unit] + top
    argmax = res.argmax_images(block, gid)

    def _fmt(u: int) -> str:
        i = int(argmax[u])
        what = res.argmax_label(block, gid, u)
        target = _image_caption(res, i) if what == res.image_ids[i] else what
        return f"unit {u}: UnitMem {um_U[u]:.3f}, fires most for {target}"

    with units_col:
        state.widget(
            st.selectbox, "mem_unit", "Unit (the 50 with the highest UnitMem in this cell)", options, format_func=_fmt
        )
        n_planted = res.planted_among_top(block, gid, 10)
        if n_planted is not None:
            st.markdown(
                f"Of this cell's 10 top units, **{n_planted}** fire most for a planted item "
                f"(planted images are {100 * np.mean(res.planted):.0f}% of the data)."
            )
    unit = int(state.get("mem_unit"))

    # 3. one unit ----------------------------------------------------------------------------------------
    st.subheader(f"Unit {unit} of block {block}")
    info = res.unit(block, gid, unit)
    img_i = info["argmax"]
    tops = [i for i, _ in info["top_images"]]
    imgs = figures.to_uint8(image_set.images(tops))
    caps = [
        ("fires most: " if k == 0 else f"#{k + 1}: ") + _image_caption(res, i, f", mu {m:.3f}")
        for k, (i, m) in enumerate(info["top_images"])
    ]
    ui.images(imgs, caps, columns=5)
    b1, b2, b3 = st.columns(3)
    b1.page_link(
        "app_pages/model.py",
        label="Tokens of this image",
        icon=":material/image:",
        query_params={"image": res.image_ids[img_i]},
    )
    if b2.button(
        "Edit this unit",
        icon=":material/content_cut:",
        key="mem_to_iv",
        on_click=_goto_intervention,
        args=(block, unit),
    ):
        st.switch_page("app_pages/intervention.py")
    b3.metric("UnitMem", f"{info['unitmem']:.3f}", help=f"mu_max {info['mu_max']:.4f}, mu_rest {info['mu_rest']:.4f}")

    p1, p2 = st.columns(2)
    with p1:
        prof_ids = res.heatmap_group_ids()
        pdf = figures.profile_frame(res.unit_profile(block, unit, prof_ids), [groups[i]["name"] for i in prof_ids])
        ptitle = f"Unit {unit} (block {block}): UnitMem per {'scale' if is_var else 'row'}"
        ui.plotly(figures.unit_profile(pdf, ptitle, highlight=gname), pdf, ptitle, key="mem_profile", cli=cli)
    with p2:
        akey = activations.result_key(adapter, image_set, gname, results.user_store())
        got = results.load(akey)
        if got is None:
            st.markdown("**Activation distribution** over all images (one teacher-forced pass, original images):")
            results.job_panel(
                akey,
                "activations",
                lambda: activations.start(adapter, image_set, gname, results.user_store()),
                f"Compute activations for {gname}",
                done=False,
                widget_key="acts",
            )
        else:
            mu_N = got[0]["mu_LNU"][li, :, unit].astype(np.float64)
            adf = figures.activation_frame(mu_N, res.image_ids, res.planted)
            atitle = f"Unit {unit}: mean |activation| per image at {gname}"
            ui.plotly(
                figures.activation_histogram(adf, atitle, mu_rest=float(np.mean(mu_N))), adf, atitle, key="mem_acts"
            )
            st.caption("Original images only (UnitMem averages 10 augmented views), so the values differ slightly.")

    # 4. distributions per block -------------------------------------------------------------------------
    ddf = figures.distribution_frame(res.unitmem[:, gid, :], blocks)
    dtitle = f"UnitMem of every unit per block, {gname}"
    ui.altair(figures.unitmem_distributions(ddf, dtitle), ddf, dtitle, key="mem_dist", cli=cli)


def _distinct_caption(res, col_ids: list[int]) -> str:
    parts = []
    for g in col_ids:
        d = res.distinct_inputs(g)
        if d is not None:
            tag = " (= classes: class selectivity only)" if d <= int(res.meta.get("n_classes", 0)) else ""
            parts.append(f"{res.groups[g]['name']}: {d}{tag}")
    return ("Distinct inputs per group over D' (class + the tokens its rows see): " + ", ".join(parts)) if parts else ""


def _null_control(adapter, mchoice, cfg, res) -> None:
    """Training vs never-trained images in one D': where do the top units point?"""
    got = loaders.get_null_data(adapter)
    if got is None:
        st.info(
            "The null control needs never-trained images beside the training images. For an image folder, "
            "run it from a terminal with --heldout N --heldout-folder PATH (e.g. ImageNet val)."
        )
        return
    nset, nchoice = got
    nkey, nres = results.unitmem_result(adapter, nset, cfg)
    ncli = commands.unitmem_command(mchoice.args(), nchoice.args(), cfg)
    if nres is None:
        st.markdown(
            f"The null control runs UnitMem on D' = {nchoice.n} training + {nchoice.heldout} never-trained "
            f"images ({len(nset)} in all). From a terminal: `{ncli}`"
        )
        results.job_panel(
            nkey,
            "UnitMem null control",
            lambda: results.start_unitmem(adapter, nset, cfg),
            "Compute the null control (job)",
            done=False,
            widget_key="um_null",
            command=ncli,
        )
        return
    col_ids = nres.heatmap_group_ids()
    names = [nres.groups[i]["name"] for i in col_ids]
    share0 = nres.never_trained_share_of_data()
    share = nres.null_share_map(0.1)[:, col_ids]
    per = "scale" if nres.is_next_scale else "position"
    sdf = figures.heatmap_frame(share, nres.blocks, names, value="never_trained_share")
    stitle = f"{mchoice.name}: share of each cell's top 10% units that point at a never-trained image"
    ui.plotly(
        figures.signed_heatmap(sdf, stitle, "never_trained_share", center=share0, x_title=per, span=0.5),
        sdf,
        stitle,
        key="mem_null_share",
        cli=ncli,
    )
    st.caption(
        f"Never-trained images are {100 * share0:.0f}% of this D' (the colour centre). Cells near it: the top "
        f"units point at never-trained images as often as chance, so the pattern is atypicality or "
        f"architecture, not memorization; cells well below it: the top units prefer training images."
    )
    diff = nres.train_minus_null_map()[:, col_ids]
    ddf = figures.heatmap_frame(diff, nres.blocks, names, value="train_minus_never_trained")
    dtitle = (
        f"{mchoice.name}: mean UnitMem of units pointing at training images minus units pointing at "
        f"never-trained images"
    )
    ui.plotly(
        figures.signed_heatmap(ddf, dtitle, "train_minus_never_trained", x_title=per),
        ddf,
        dtitle,
        key="mem_null_diff",
        cli=ncli,
    )
    rows = []
    for g, name in zip(col_ids, names):
        rows.append(
            {
                "group": name,
                "never-trained share of D'": share0,
                "among the top 1% units": nres.never_trained_share_among_top(g, 0.01),
                "among the top 10% units": nres.never_trained_share_among_top(g, 0.10),
                "distinct inputs": nres.distinct_inputs(g),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption(f"Result {nkey}, {results.source_label(nkey)}. {_distinct_caption(nres, col_ids)}")


def _class_controlled(adapter, image_set, mchoice, dchoice, cfg) -> None:
    """UnitMem with the rest over the other images of the argmax image's class."""
    ccfg = replace(cfg, rest="class")
    ckey, cres = results.unitmem_result(adapter, image_set, ccfg)
    ccli = commands.unitmem_command(mchoice.args(), dchoice.args(), ccfg)
    if cres is None:
        st.markdown(f"Class-controlled UnitMem is a pass with rest = class. From a terminal: `{ccli}`")
        results.job_panel(
            ckey,
            "class-controlled UnitMem",
            lambda: results.start_unitmem(adapter, image_set, ccfg),
            "Compute class-controlled UnitMem (job)",
            done=False,
            widget_key="um_class",
            command=ccli,
        )
        return
    col_ids = cres.heatmap_group_ids()
    names = [cres.groups[i]["name"] for i in col_ids]
    z = cres.summary(state.get("summary"))[:, col_ids]
    df = figures.heatmap_frame(z, cres.blocks, names)
    title = f"{mchoice.name}: class-controlled UnitMem ({SUMMARIES[state.get('summary')]})"
    ui.plotly(
        figures.unitmem_heatmap(
            df, title, x_title="scale (coarse -> fine)" if cres.is_next_scale else "token positions: all, then each row"
        ),
        df,
        title,
        key="mem_class",
        cli=ccli,
    )
    st.caption(
        f"mu_rest = mean over the other images of the argmax image's class: class selectivity scores 0. "
        f"Result {ckey}, {results.source_label(ckey)}. {_distinct_caption(cres, col_ids)}"
    )


with ui.guard("The memorization page"):
    main()
