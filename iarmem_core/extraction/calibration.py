"""Threshold calibration of the offline measures on held-out images."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from iarmem_core import data, metrics
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.extraction.attack import run_extraction
from iarmem_core.extraction.config import CALIBRATION_KIND, DEFAULT_MAX_FALSE_RATE, VERSION, ExtractionConfig


# ---------------------------------------------------------------------------------------------------
# 6. Threshold calibration on held-out images
def calibrate(
    adapter: IARAdapter,
    calibration_set: data.ImageSet,
    cfg: ExtractionConfig | None = None,
    *,
    store=None,
    max_false_rate: float = DEFAULT_MAX_FALSE_RATE,
    planted_set: data.ImageSet | None = None,
    sscd_path=None,
    on_progress=None,
    force: bool = False,
) -> dict:
    """Calibrate every offline measure's threshold per prefix on held-out images; stored for this model.

    The attack runs on every image of `calibration_set` (held-out: never trained on) with `cfg`'s prefixes;
    the threshold of each (measure, prefix) is the lowest one that at most `max_false_rate` of those
    generations exceed. With `planted_set` (known training copies, e.g. the demo's planted images) the true
    rate at that threshold is reported too, and the measure with the highest true rate at the default prefix
    becomes the model's `auto` measure. Returns {"key", "thresholds", "measure", "how", "table"}.
    """
    st = store if store is not None else store_mod.get_store()
    cfg = replace(cfg or ExtractionConfig(), candidate_ids=tuple(calibration_set.ids), heldout=False, threshold=None)
    neg = run_extraction(
        adapter, calibration_set, cfg, store=st, sscd_path=sscd_path, on_progress=on_progress, force=force
    )
    pos = None
    if planted_set is not None:
        pos = run_extraction(
            adapter,
            planted_set,
            replace(cfg, candidate_ids=tuple(planted_set.ids)),
            store=st,
            sscd_path=sscd_path,
            force=force,
        )
    thresholds, table = {}, []
    for m in neg.meta["measures"]:
        if m == "sscd":
            continue  # SSCD keeps its published threshold
        for p in neg.meta["prefix_tokens"]:
            s_neg = neg.arrays[f"sim_{m}"][neg.arrays["prefix_tokens"] == p]
            s_pos = pos.arrays[f"sim_{m}"][pos.arrays["prefix_tokens"] == p] if pos is not None else np.zeros(0)
            c = metrics.calibrate_threshold(
                torch.from_numpy(s_pos.astype(np.float64)), torch.from_numpy(s_neg.astype(np.float64)), max_false_rate
            )
            thresholds.setdefault(m, {})[str(p)] = c.threshold
            table.append({"measure": m, "prefix_tokens": int(p), **c.to_dict()})
    p0 = str(neg.meta["prefix_tokens"][0])

    def rank_key(r: dict) -> tuple:
        tr = r["true_rate"] if not math.isnan(r["true_rate"]) else -1.0
        return (-tr, r["measure"] != "token_match")  # ties go to token_match (model-agnostic)

    ranked = sorted((r for r in table if str(r["prefix_tokens"]) == p0), key=rank_key)
    measure = ranked[0]["measure"] if ranked and pos is not None else "token_match"
    if max_false_rate == 0:
        how = (
            f"the highest score of {len(calibration_set)} held-out images ({calibration_set.name}) attacked "
            f"with the same prefix"
        )
    else:
        how = (
            f"lowest threshold exceeded by at most {max_false_rate:.1%} of {len(calibration_set)} held-out "
            f"images ({calibration_set.name}) attacked with the same prefix"
        )
    spec = {
        "model": adapter.identity,
        "negatives": neg.meta["store_key"],
        "positives": pos.meta["store_key"] if pos is not None else None,
        "max_false_rate": max_false_rate,
    }
    meta = {
        "thresholds": thresholds,
        "measure": measure,
        "how": how,
        "table": table,
        "model_name": adapter.spec.name,
        "weights": adapter.identity.get("transformer"),
    }
    key = st.key(CALIBRATION_KIND, spec, VERSION)
    st.save(
        key,
        {"thresholds_flat": np.array([r["threshold"] for r in table], np.float64)},
        meta,
        kind=CALIBRATION_KIND,
        spec=spec,
        version=VERSION,
    )
    return {"key": key, **meta}
