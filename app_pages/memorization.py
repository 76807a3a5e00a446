"""Memorization: UnitMem per block x scale (or position), the token grid, one unit and its images."""

from __future__ import annotations

import numpy as np
import streamlit as st

from iarmem_app import loaders, results, state, ui
from iarmem_core import activations, figures, unitmem
from iarmem_core.cli import commands

SUMMARIES = {"mean": "mean over units", "max": "max over units", "top1pct_mean": "mean of the top 1% units"}

st.title("Memorization: which units fire for single training images?")
ui.explain(r"""
A **unit** is one hidden neuron of a transformer block's MLP (after its nonlinearity). For each unit $u$ and
group of token positions $G$ (VAR: one **scale**; next-token models: all positions, a row, or one position),
$\mu_u(x)$ is its mean $|$activation$|$ on training image $x$ (over 10 augmented views and the positions of $G$).

$$\text{UnitMem}(u, G) = \frac{\mu_{\max} - \mu_{\text{rest}}}{\mu_{\max} + \mu_{\text{rest}}}$$

$\mu_{\max}$ is the largest $\mu_u(x)$ over the images, $\mu_{\text{rest}}$ the mean over all the others.
UnitMem is near **1** when a unit fires for one image and hardly for the rest (it memorizes that image),
near **0** when it responds to many images alike.

**How to read it:** each heatmap cell summarizes the units of one block at one scale (bright = memorizing).
Click a cell to list its units; pick a unit to see the training image it fires for most. In VAR, memorization
sits in early blocks at coarse scales and moves deeper as scales get finer; in RAR it sits in middle and late
blocks.

**Note for teaching VAR:** the 1x1 scale's row sees only the class label (attention is block-causal across
scales), so units at that scale measure class selectivity, not memorization of one image.
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
    tag = f" - planted {counts[i]}x" if planted and planted[i] else ""
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
        )
        return
    meta = res.meta
    groups = res.groups
    blocks = res.blocks
    is_var = res.is_next_scale
    name_to_gid = {g["name"]: i for i, g in enumerate(groups)}

    # 1. the heatmap -----------------------------------------------------------------------------------
    state.widget(
        st.radio,
        "summary",
        "Summary over the units of a cell",
        list(SUMMARIES),
        format_func=SUMMARIES.get,
        horizontal=True,
    )
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
    st.caption(
        f"{len(meta['image_ids'])} images x {meta['config']['n_augs']} views ({meta['augmentation']}), "
        f"mu_rest = {meta['config']['rest']} of the other images; {meta['n_units']} units per block. "
        f"Result {key}, {results.source_label(key)}. Click a cell to inspect it."
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
        return f"unit {u}: UnitMem {um_U[u]:.3f}, fires most for {_image_caption(res, i)}"

    with units_col:
        state.widget(
            st.selectbox, "mem_unit", "Unit (the 50 with the highest UnitMem in this cell)", options, format_func=_fmt
        )
        n_planted = res.planted_among_top(block, gid, 10)
        if n_planted is not None:
            st.markdown(
                f"Of this cell's 10 top units, **{n_planted}** fire most for a planted duplicate "
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


with ui.guard("The memorization page"):
    main()
