"""The five-minute talk on the demo world (UX.md 1), in the sidebar of every page: four steps with links that
open each view."""

from __future__ import annotations

import streamlit as st

STEPS = """
1. **Positive control** ([demo-var-ctl](/memorization?model=demo-var-ctl)): memorization put into 96 known units.
   Click the hottest cell and its top unit: it fires for a block-pattern canary, but often for a never-trained
   twin (`Ct/..`) rather than a trained one (`C/..`): UnitMem's argmax says "atypical", even here. Switch the
   view to the *null control* to see how much of the heatmap never-trained images light up as well.
2. **The edit** ([zero the top 1% of demo-var-ctl](/intervention?model=demo-var-ctl&iv_top=1&iv_op=zero&iv_factor=0)):
   the samples at the same seed barely change, the canaries stop being extracted (measured: 19 of 19 gone),
   the 20 random draws of as many units leave 16-19; the dose-response curve at the bottom of that page
   makes the point.
3. **Natural memorization** ([demo-var](/memorization?model=demo-var&mem_view=null)): the heatmap looks as hot,
   but the null control shows much of the pattern for never-trained images too: there UnitMem finds atypical
   images. On the [Extraction page](/extraction?model=demo-var) pick an extracted copy and ask *Which units
   carry this image?*: about 1% of the units (a median of 37 of 3072 for the 32x natural items), specific to
   that image (random sets of that size almost never remove it), different for every image.
4. **The attack** ([Extraction](/extraction?model=demo-var)): the gallery of generations beside the training
   images; drag the threshold and the count and the labels change together.
"""


def sidebar() -> None:
    with st.expander("The five-minute talk", icon=":material/slideshow:"):
        st.markdown(STEPS)
