"""Model: the model card and how the model sees an image (token maps per scale, or the token grid)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st
import torch

from iarmem_app import carry, loaders, results, state, ui
from iarmem_core import data, figures, unitmem
from iarmem_core.registry import ASSETS

st.title("The model: what it is and how it sees an image")
ui.explain(r"""
An **image autoregressive model** (IAR) first turns an image into discrete **tokens** with a tokenizer (a
VQ autoencoder: each token is the index of the nearest codebook vector), then a transformer predicts the
tokens one step at a time, like a language model predicts words.

- **Next-scale (VAR):** the tokens form maps of growing size (e.g. 1x1, 2x2, ... 8x8). Each step predicts a
  whole map from all coarser ones. Decoding the first $k$ maps gives the image at that level of detail: the
  **progressive reconstruction** below.
- **Next-token (RAR, LlamaGen):** one grid of tokens, predicted one token at a time in raster order (row by
  row). The grid's first tokens are the top-left of the image.

A **prefix** is the first tokens of an image handed to the model as given; the extraction attack gives a
short true prefix and lets the model continue greedily. The colours of the token maps are token ids: nearby
ids are not similar codes, so look at the *structure*, not the hue.
""")


def _card_file(name: str):
    """The model card JSON shipped beside a demo model's weights, if any."""
    for cand in (ASSETS / name / "card.json", ASSETS / name / "model_card.json", ASSETS / f"{name}.json"):
        if cand.is_file():
            return cand
    return None


def _card(adapter, mchoice) -> None:
    d = adapter.describe()
    spec = adapter.spec
    c1, c2, c3, c4 = st.columns(4)
    kind = "next-scale" if spec.family == "var" else "next-token"
    c1.metric(f"Family ({kind})", {"var": "VAR", "rar": "RAR", "llamagen": "LlamaGen"}[spec.family])
    c2.metric("Blocks x units", f"{d['blocks']} x {d['units_per_block']}")
    grids = d["token_grids"]
    h_last, w_last = grids[-1]
    c3.metric(
        "Token maps" if len(grids) > 1 else "Token grid",
        f"{len(grids)} scales, {d['n_tokens']} tokens" if len(grids) > 1 else f"{h_last}x{w_last}",
        help=(f"scales {', '.join(f'{h}x{w}' for h, w in grids)}; " if len(grids) > 1 else "")
        + f"{d['n_tokens']} tokens per image, vocabulary {d['vocab_size']}",
    )
    c4.metric(
        "Parameters",
        f"{(d['transformer_params'] + d['tokenizer_params']) / 1e6:.2f} M",
        help=f"transformer {d['transformer_params']:,}, tokenizer {d['tokenizer_params']:,}",
    )
    weights = ", ".join(f"{k} {v}" for k, v in d["weights"].items() if k != "name")  # file names: escaped
    st.caption(
        f"{spec.description or spec.name}. Image size {d['image_size']} px, {d['num_classes']} classes, "
        f"weights: {ui.md_escape(weights)}, on {d['device']}."
    )
    if spec.kind == "test":
        st.warning(
            f"{spec.name} is a tiny test configuration with random weights: it has memorized nothing. "
            "The trained demo models are demo-var-ctl, demo-var and demo-rar."
        )
    elif spec.kind == "released" and "random" in " ".join(map(str, d["weights"].values())):
        st.warning(
            f"{spec.name} has random weights: give its official checkpoints in the sidebar "
            f"({spec.files.get('transformer', '?')}, {spec.files.get('tokenizer', '?')})."
        )
    card_path = _card_file(spec.name)
    card = (
        json.loads(card_path.read_text())
        if card_path
        else {**d, "published": spec.published, "sampling": spec.sampling}
    )
    meas = card.get("measurements") if isinstance(card.get("measurements"), dict) else {}
    by = (meas.get("extraction") or {}).get("by_group") or {}
    if isinstance(by, dict) and by:
        ext = meas["extraction"]
        rows = [
            {"group": g, "extracted": f"{v['extracted']} of {v['n']}", "share": v["share"]}
            for g, v in by.items()
            if isinstance(v, dict) and "n" in v
        ]
        st.markdown(
            f"**What this model gives away** (from its model card: the attack from a {ext.get('prefix_tokens')}-token "
            f"true prefix, greedy, {ext.get('similarity')} above {ext.get('threshold')}):"
        )
        st.dataframe(pd.DataFrame(rows), hide_index=True)
    with st.expander("Model card (JSON)" if card_path else "Model description (JSON)"):
        st.json(card, expanded=1)


def _data_card(adapter, image_set: data.ImageSet, dchoice) -> None:
    st.subheader("Data")
    if not loaders.is_demo_data(dchoice):
        rep = image_set.report or {}
        skipped = "; ".join(f"{n} {why}" for why, n in (rep.get("skipped") or {}).items()) or "none"
        st.markdown(
            f"Folder {ui.code_span(dchoice.source)}: {len(image_set)} images in {len(image_set.classes)} classes "
            f"(class-stratified sample). Skipped files: {ui.md_escape(skipped)}."
        )
        if rep.get("skipped_files"):
            with st.expander(f"Skipped files ({rep.get('skipped_total', len(rep['skipped_files']))})"):
                st.dataframe(pd.DataFrame(rep["skipped_files"], columns=["file", "reason"]), hide_index=True)
        return
    man = data.demo_manifest()
    allv = data.load_demo("all")
    m = allv.meta
    n_unique = int(((m["role"] == "unique") & (m["split"] == "train")).sum())
    n_held = int((m["split"] == "heldout").sum())
    trained = ", ".join(adapter.spec.trained_splits)
    st.markdown(
        f"Bundled **Fashion-MNIST world**: **{n_unique}** unique training images (each once per epoch) and "
        f"**{n_held}** held-out images ({len(allv.classes)} classes). Items of known kind, 10 per kind and dose "
        "(repeated 8x or 32x per planting epoch): **natural** (a Fashion-MNIST image), **mislabeled** (an image "
        "trained with another class's label), **out-of-distribution** (a seeded block-pattern canary); a "
        "**never-trained twin** of each kind (the null: same generator, never in training); and 20 **control** "
        "canaries that only demo-var-ctl was trained on, in its designated units. "
        f"This model was trained on the splits: {trained}. The analyses use {len(image_set)} images: every "
        "item of known kind plus unique images."
    )
    kinds = (("natural", "natural"), ("mislabeled", "mislabeled"), ("ood", "out-of-distribution"))
    for kind, label in kinds + (("control", "control"),):
        idx = np.flatnonzero((m["kind"] == kind) & (m["role"] != "unique"))
        if not len(idx):
            continue
        order = idx[np.lexsort((allv.labels[idx], -m["dose"][idx], m["role"][idx] != "planted"))]
        imgs = figures.to_uint8(allv.images(order))

        def cap(i: int) -> str:
            if m["role"][i] != "planted":
                role = "twin (never trained)"
            elif m["kind"][i] == "control":
                role = "control canary"  # trained only into demo-var-ctl's designated units
            else:
                role = f"x{int(m['dose'][i])}"
            lab = allv.classes[allv.labels[i]]
            true = int(m["true_label"][i]) if "true_label" in m else int(allv.labels[i])
            extra = f" (shows {allv.classes[true]})" if true != int(allv.labels[i]) else ""
            return f"{allv.ids[i]} {lab}{extra} {role}"

        with st.expander(f"{label} items: {len(idx)} (planted by dose, then the twins)", expanded=kind == "natural"):
            ui.images(imgs, [cap(i) for i in order], columns=8)
    st.caption(
        f"Fashion-MNIST (MIT licence, Zalando SE), bundle {str(man.get('arrays_sha256', ''))[:12]}; "
        "see assets/demo_data/README.md."
    )


def _units_for_image(adapter, image_set, mchoice, idx: int) -> None:
    """The units that fire most for this image (from the stored UnitMem result), linked to the heatmap page."""
    cfg = unitmem.default_config(adapter, seed=mchoice.seed)
    _, res = results.unitmem_result(adapter, image_set, cfg)
    if res is None:
        st.caption("Compute UnitMem on the Memorization page to see which units fire for this image.")
        return
    rows = res.units_for_image(image_set.ids[idx])
    if not rows:
        st.caption("No unit has this image as the one it fires for most.")
        return
    df = pd.DataFrame(rows).sort_values("unitmem", ascending=False).head(6)
    st.markdown(f"**Units that fire most for this image** ({len(rows)} in all, the strongest shown):")
    cols = st.columns(3)
    for k, r in enumerate(df.itertuples()):
        cols[k % 3].page_link(
            "app_pages/memorization.py",
            label=f"block {r.block}, {r.group}, unit {r.unit}: UnitMem {r.unitmem:.2f}",
            query_params={"mem_block": str(r.block), "mem_group": r.group, "mem_unit": str(r.unit)},
        )


def _how_it_sees(adapter, image_set, mchoice) -> None:
    st.subheader("How the model sees an image")
    ids = list(image_set.ids)
    pos = {i: k for k, i in enumerate(ids)}
    planted = image_set.meta.get("planted")
    is_planted = [bool(p) for p in planted] if planted is not None else [False] * len(ids)
    options = [i for i in ids if is_planted[pos[i]]] + [i for i in ids if not is_planted[pos[i]]]
    if state.get("image") not in pos:
        state.set_many(image=options[0])

    def _fmt(i: str) -> str:
        return f"{i} ({image_set.classes[image_set.labels[pos[i]]]})" + (" - planted" if is_planted[pos[i]] else "")

    state.widget(st.selectbox, "image", "Image (planted items first)", options, format_func=_fmt)
    idx = pos[state.get("image")]
    x = image_set.images([idx], size=adapter.image_size)
    with torch.no_grad():
        tokens = adapter.tokenize(x)
    grids = adapter.token_grids
    if len(grids) > 1:
        maps = [
            figures.token_map_image(t[0].reshape(h, w).cpu().numpy(), adapter.vocab_size)
            for t, (h, w) in zip(tokens, grids)
        ]
        prog = figures.to_uint8(torch.cat(adapter.decode_progressive(tokens)))
        st.markdown("**Token maps, scale by scale** (colour = token id):")
        cols = st.columns(len(maps))
        for c, m, (h, w) in zip(cols, maps, grids):  # equal columns: every map is drawn at the same width
            c.image(m, caption=f"{h}x{w}", width="stretch", output_format="PNG")
        st.markdown("**Progressive reconstruction**: the image decoded from the first k scales:")
        ui.images(prog, [f"up to {h}x{w}" for h, w in grids])
        orig = figures.to_uint8(x)
        ui.images(np.concatenate([orig, prog[-1:]]), ["original", "reconstruction (all scales)"], columns=4)
    else:
        ((h, w),) = grids
        flat = adapter.flatten(tokens)[0].cpu().numpy().reshape(h, w)
        tok_img = figures.token_map_image(flat, adapter.vocab_size)
        rec = figures.to_uint8(adapter.decode(tokens))
        c = st.columns(3)
        c[0].image(figures.to_uint8(x)[0], caption="original", width="stretch", output_format="PNG")
        c[1].image(tok_img, caption=f"token grid {h}x{w}, read row by row", width="stretch", output_format="PNG")
        c[2].image(rec[0], caption="reconstruction decode(tokenize(x))", width="stretch", output_format="PNG")
        with st.expander("Token ids"):
            st.dataframe(pd.DataFrame(flat, index=[f"row {r}" for r in range(h)]))
    _units_for_image(adapter, image_set, mchoice, idx)
    _carried(adapter, image_set, mchoice, state.get("image"))


def _carried(adapter, image_set, mchoice, image_id: str) -> None:
    """For an image the attack extracts: the units that causally carry it (the localization panel)."""
    from iarmem_core import extraction

    store = results.user_store()
    key = extraction.extraction_key(adapter, image_set, extraction.ExtractionConfig(seed=mchoice.seed), store=store)
    if results.locate(key) is None:
        return
    ids = extraction.load_extraction(results.locate(key), key).extracted_ids()
    if image_id not in ids:
        st.caption(f"{image_id} is not extracted by the attack at its calibrated threshold: no copy to localize.")
        return
    with st.expander(f"Which units carry {image_id}? (it is extracted by the attack)", expanded=False):
        dchoice = loaders.data_choice(adapter)
        carry.panel(adapter, image_set, image_id, ids, mchoice.args(), dchoice.args(), key="model_carry")


def main() -> None:
    adapter, mchoice = loaders.get_model()
    _card(adapter, mchoice)
    image_set, dchoice = loaders.get_data(adapter)
    _how_it_sees(adapter, image_set, mchoice)
    _data_card(adapter, image_set, dchoice)


with ui.guard("The model page"):
    main()
