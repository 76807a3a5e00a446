"""'Which units carry this image?': the per-image causal localization panel, shared by the Extraction and Model
pages (iarmem_core.localize does the work; this draws it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from iarmem_app import results, state, ui
from iarmem_core import figures, localize
from iarmem_core.cli import commands

EXPLAIN = r"""
**The question.** UnitMem says which units fire selectively; it does not say which units the model *needs* to
reproduce a training image. This panel answers that causally, for one extracted image:

1. **Attribution**: for every unit, $g_u = \sum_t a_u(t)\,\partial \log p(\text{generated tokens}\mid
   \text{prefix}, c)/\partial a_u(t)$ (teacher forced, one backward pass): how much the unit supports the
   copy. The map sums the positive part per block and scale/row.
2. **Minimal set**: the image's top-$n$ units by $g$ are zeroed during the attack, $n = 1, 2, 4, \dots$, then
   bisected, until the image is no longer extracted at the calibrated threshold.
3. **Controls**: 20 random sets of the same size, with as many units in every block, are zeroed the same way;
   if they also remove the copy, the set is not specific. **Collateral**: the other extracted images that the
   same edit removes. **Quality**: the Frechet distance and class accuracy of samples with the edit.

**What it can and cannot show.** A small set that random sets never reproduce is causal evidence that *these*
units carry *this* copy. It does not make the set the only one: other units may carry it redundantly, and a
different image usually has its own, different set (which is why one global top-k edit removes few copies).
"""


def panel(adapter, image_set, image_id: str, extracted: list[str], model_args, data_args, key: str) -> None:
    """The localization of `image_id` (a stored job, or a button that starts it)."""
    cfg = localize.LocalizeConfig(seed=int(state.get("seed")))
    store = results.user_store()
    lkey = localize.localization_key(adapter, image_set, image_id, cfg, extracted, store)
    got = results.load(lkey)
    cli = commands.localize_command(model_args, data_args, image_id, cfg)
    if got is None:
        st.caption(
            f"Finds the smallest set of units whose removal stops the attack from reproducing {image_id}, "
            f"with 20 random sets of the same size as the control (a job of a few seconds to a minute). "
            f"From a terminal: `{cli}`"
        )
        results.job_panel(
            lkey,
            "localization",
            lambda: localize.start_localization(adapter, image_set, image_id, cfg, others=extracted, store=store),
            f"Which units carry {image_id}? (job)",
            done=False,
            widget_key=f"{key}_loc",
        )
        return
    r = got[1]
    if r.get("n_min") is None:
        st.warning(r.get("note", "no minimal set found"))
        return
    n, total = int(r["n_min"]), int(r["n_units_total"])
    c = st.columns(4)
    c[0].metric(
        "Units that carry it",
        f"{n}",
        help=f"{100 * n / total:.1f}% of {total} units; zeroing them "
        f"removes the copy ({r['similarity']} {r['score_before']:.3f} -> at or below {r['threshold']:.4f})",
    )
    c[1].metric(
        "Random sets that remove it",
        f"{r['random_flips']} of {r['random_draws']}",
        help=f"the same number of random units in every block; p = {r['random_p_value']:.3g} "
        f"(smallest possible {1 / (r['random_draws'] + 1):.3g})",
    )
    c[2].metric(
        "Collateral",
        f"{len(r['collateral'])} of {r['collateral_of']}",
        help="other extracted images that the same edit removes: " + (", ".join(r["collateral"]) or "none"),
    )
    q = r.get("quality") or {}
    if q:
        c[3].metric(
            "Frechet distance",
            f"{q['fd_after']:.3g}",
            delta=f"{q['fd_after'] - q['fd_before']:+.3g}",
            delta_color="inverse",
            help=f"{q['fd_metric']}, {q['n_samples']} samples; class accuracy "
            f"{q['class_acc_before']:.3f} -> {q['class_acc_after']:.3f}",
        )
    a = r["attribution"]
    groups, blocks = a["groups"], a["blocks"]
    keep = [i for i, g in enumerate(groups) if "/" in g or len(groups) <= 12] or list(range(len(groups)))
    z = np.asarray(a["map_LG"])[:, keep]
    df = figures.heatmap_frame(z, blocks, [groups[i] for i in keep], value="positive_attribution")
    title = f"{image_id}: where the units that support the copy sit (positive attribution per block and group)"
    ui.plotly(
        figures.unitmem_heatmap(df, title, value="positive_attribution", x_title="scale / row"),
        df,
        title,
        key=f"{key}_attr",
        cli=cli,
    )
    per = pd.DataFrame([{"block": int(b), "units in the set": v} for b, v in r["where"]["units_per_block"].items()])
    st.dataframe(per, hide_index=True)
    nemo = r.get("nemo") or {}
    if nemo:
        st.caption(
            f"NeMo-style units (mean |activation| z > {nemo['z']:g} against {nemo['null_images']} never-trained "
            f"images): {nemo['n_units']}; zeroing them "
            f"{'removes' if nemo.get('removes_image') else 'does not remove'} the copy; "
            f"{nemo.get('overlap_with_minimal_set', 0)} are in the minimal set."
        )
    units = [f"{b}:{u}" for b, u in r["units"]]
    if st.button(
        "Edit exactly these units on the Intervention page", key=f"{key}_to_iv", icon=":material/content_cut:"
    ):
        state.set_many(iv_units=units, iv_mode="picked units", iv_op="zero", iv_factor=0.0)
        st.switch_page("app_pages/intervention.py")
    st.caption(f"Result {lkey}, {results.source_label(lkey)}.")
    ui.explain(EXPLAIN, title="What does this show, and what not?")
