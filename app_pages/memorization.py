"""Memorization: UnitMem per block x scale (or position), the token grid, one unit and its images."""

from __future__ import annotations

import numpy as np
import streamlit as st

from iarmem_app import activations, config, loaders, results, state, ui
from iarmem_core import figures

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


def _image_caption(meta: dict, i: int, extra: str = "") -> str:
    ids, planted, counts, labels = meta["image_ids"], meta.get("planted"), meta.get("counts"), meta["labels"]
    tag = f" - planted {counts[i]}x" if planted and planted[i] else ""
    return f"{ids[i]} (class {labels[i]}){tag}{extra}"


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
    dcfg = config.unitmem_config(mchoice.name, mchoice.seed, detail=True)
    dkey, dres = results.unitmem_result(adapter, image_set, dcfg)
    cli = (f"python -m iarmem_core unitmem {mchoice.cli_args()} {dchoice.cli_args()}"
           f"{config.unitmem_cli_detail(mchoice.name, detail=True)} --json")
    if dres is None:
        st.markdown(f"**UnitMem per token position** ({h}x{w} grid) needs a pass with every position as a group.")
        results.job_panel(dkey, "UnitMem per position", lambda: results.start_unitmem(adapter, image_set, dcfg),
                          "Compute UnitMem per position (job)", done=False, widget_key="um_detail")
        return
    groups = dres.meta["groups"]
    pos_ids = [i for i, g in enumerate(groups) if g["kind"] == "position" and int(g["scale"]) == scale_idx]
    grid = dres.arrays[f"block_{state.get('summary')}_LG"][li, pos_ids].reshape(h, w)
    gdf = figures.grid_frame(grid)
    title = f"Block {block}, scale {h}x{w}: per token position ({SUMMARIES[state.get('summary')]})"
    ui.plotly(figures.token_grid_heatmap(gdf, title), gdf, title, key="mem_grid", cli=cli)


def main() -> None:
    adapter, mchoice = loaders.get_model()
    image_set, dchoice = loaders.get_data(adapter)
    cfg = config.unitmem_config(mchoice.name, mchoice.seed)
    key, res = results.unitmem_result(adapter, image_set, cfg)
    cli = (f"python -m iarmem_core unitmem {mchoice.cli_args()} {dchoice.cli_args()}"
           f"{config.unitmem_cli_detail(mchoice.name)} --json")
    if res is None:
        st.info(f"No UnitMem result for **{mchoice.name}** on this data yet. It runs as a background job "
                f"({len(image_set)} images x {cfg.n_augs} views); you can leave the page or close the tab, and "
                f"the result lands in the store. The same job from the CLI: `{cli}`")
        results.job_panel(key, "UnitMem", lambda: results.start_unitmem(adapter, image_set, cfg),
                          "Compute UnitMem", done=False, widget_key="um")
        return
    meta, arrays = res.meta, res.arrays
    groups = meta["groups"]
    blocks = [int(b) for b in meta["blocks"]]
    is_var = len(meta["token_grids"]) > 1
    name_to_gid = {g["name"]: i for i, g in enumerate(groups)}

    # 1. the heatmap -----------------------------------------------------------------------------------
    state.widget(st.radio, "summary", "Summary over the units of a cell", list(SUMMARIES),
                 format_func=SUMMARIES.get, horizontal=True)
    if is_var:
        col_ids = list(meta["scale_groups"])
        x_title = "scale (coarse -> fine)"
    else:
        col_ids = list(meta["scale_groups"]) + res.group_ids("row")
        x_title = "token positions: all, then each row of the grid"
    summ = arrays[f"block_{state.get('summary')}_LG"]
    z = summ[:, col_ids]
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
    st.caption(f"{len(meta['image_ids'])} images x {meta['config']['n_augs']} views ({meta['augmentation']}), "
               f"mu_rest = {meta['config']['rest']} of the other images; {meta['n_units']} units per block. "
               f"Result {key}, {results.source_label(key)}. Click a cell to inspect it.")

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
    h, w = meta["token_grids"][scale_idx]
    with grid_col:
        _grid(adapter, image_set, mchoice, dchoice, li, block, scale_idx, h, w)
    um_U = arrays["unitmem_LGU"][li, gid]
    order = np.argsort(um_U)[::-1]
    top = [int(u) for u in order[:50]]
    unit = int(state.get("mem_unit"))
    if unit < 0 or unit >= len(um_U):
        unit = top[0]
        state.set_many(mem_unit=unit)
    options = top if unit in top else [unit] + top
    argmax = arrays["argmax_LGU"][li, gid]

    def _fmt(u: int) -> str:
        i = int(argmax[u])
        return f"unit {u}: UnitMem {um_U[u]:.3f}, fires most for {_image_caption(meta, i)}"

    with units_col:
        state.widget(st.selectbox, "mem_unit", "Unit (the 50 with the highest UnitMem in this cell)", options,
                     format_func=_fmt)
        n_planted = sum(bool(meta["planted"][int(argmax[u])]) for u in top[:10]) if meta.get("planted") else None
        if n_planted is not None:
            st.markdown(f"Of this cell's 10 top units, **{n_planted}** fire most for a planted duplicate "
                        f"(planted images are {100 * np.mean(meta['planted']):.0f}% of the data).")
    unit = int(state.get("mem_unit"))

    # 3. one unit ----------------------------------------------------------------------------------------
    st.subheader(f"Unit {unit} of block {block}")
    img_i = int(argmax[unit])
    scale_gid_pos = list(meta["scale_groups"]).index(gid) if gid in meta["scale_groups"] else None
    if scale_gid_pos is not None and "top_images_LKSU" in arrays:
        tops = [int(i) for i in arrays["top_images_LKSU"][li, :, scale_gid_pos, unit]]
        mus = [float(v) for v in arrays["top_mu_LKSU"][li, :, scale_gid_pos, unit]]
    else:
        tops, mus = [img_i], [float(arrays["mu_max_LGU"][li, gid, unit])]
    imgs = figures.to_uint8(image_set.images(tops))
    caps = [("fires most: " if k == 0 else f"#{k + 1}: ") + _image_caption(meta, i, f", mu {m:.3f}")
            for k, (i, m) in enumerate(zip(tops, mus))]
    ui.images(imgs, caps, columns=5)
    b1, b2, b3 = st.columns(3)
    b1.page_link("app_pages/model.py", label="Tokens of this image", icon=":material/image:",
                 query_params={"image": meta["image_ids"][img_i]})
    if b2.button("Edit this unit", icon=":material/content_cut:", key="mem_to_iv",
                 on_click=_goto_intervention, args=(block, unit)):
        st.switch_page("app_pages/intervention.py")
    b3.metric("UnitMem", f"{um_U[unit]:.3f}", help=f"mu_max {arrays['mu_max_LGU'][li, gid, unit]:.4f}, "
                                                   f"mu_rest {arrays['mu_rest_LGU'][li, gid, unit]:.4f}")

    p1, p2 = st.columns(2)
    with p1:
        prof_ids = list(meta["scale_groups"]) if is_var else list(meta["scale_groups"]) + res.group_ids("row")
        prof = arrays["unitmem_LGU"][li, prof_ids, unit]
        pdf = figures.profile_frame(prof, [groups[i]["name"] for i in prof_ids])
        ptitle = f"Unit {unit} (block {block}): UnitMem per {'scale' if is_var else 'row'}"
        ui.plotly(figures.unit_profile(pdf, ptitle, highlight=gname), pdf, ptitle, key="mem_profile", cli=cli)
    with p2:
        akey = results.user_store().key(activations.KIND, activations.job_spec(adapter, image_set, gname))
        got = results.load(akey)
        if got is None:
            st.markdown("**Activation distribution** over all images (one teacher-forced pass, original images):")
            results.job_panel(akey, "activations", lambda: activations.start(adapter, image_set, gname,
                                                                             results.user_store()),
                              f"Compute activations for {gname}", done=False, widget_key="acts")
        else:
            mu_N = got[0]["mu_LNU"][li, :, unit].astype(np.float64)
            adf = figures.activation_frame(mu_N, meta["image_ids"], meta.get("planted"))
            atitle = f"Unit {unit}: mean |activation| per image at {gname}"
            ui.plotly(figures.activation_histogram(adf, atitle, mu_rest=float(np.mean(mu_N))), adf, atitle,
                      key="mem_acts")
            st.caption("Original images only (UnitMem averages 10 augmented views), so the values differ slightly.")

    # 4. distributions per block -------------------------------------------------------------------------
    ddf = figures.distribution_frame(arrays["unitmem_LGU"][:, gid, :], blocks)
    dtitle = f"UnitMem of every unit per block, {gname}"
    ui.altair(figures.unitmem_distributions(ddf, dtitle), ddf, dtitle, key="mem_dist", cli=cli)


with ui.guard("The memorization page"):
    main()
