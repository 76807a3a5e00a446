"""Thresholds of the similarity measures, per model and prefix: the model card's, stored calibrations, published,
defaults."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from iarmem_core import metrics
from iarmem_core import store as store_mod
from iarmem_core.extraction.config import CALIBRATION_KIND, SSCD_THRESHOLD
from iarmem_core.registry import get_spec


def card_calibration(model_name: str, identity: dict) -> dict | None:
    """The calibration stored in a bundled model's card (``extraction_calibration``: the weights it belongs to,
    the auto measure, {measure: {prefix: threshold}}, how), when it belongs to these weights; else None."""
    try:
        path = get_spec(model_name).card_path
    except KeyError:
        return None
    if path is None or not path.is_file():
        return None
    cal = _read_card(str(path), path.stat().st_mtime_ns).get("extraction_calibration")
    if cal is None or cal.get("weights") != identity.get("transformer"):
        return None
    return cal


@lru_cache(maxsize=16)
def _read_card(path: str, mtime_ns: int) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def find_calibration(store: store_mod.ResultStore, identity: dict) -> dict | None:
    """The newest stored calibration of these weights: {"key", "thresholds", "measure", "how"}."""
    want = store_mod.to_jsonable(identity)
    for row in store.list(kind=CALIBRATION_KIND):  # newest first
        if (row.get("spec") or {}).get("model") == want:
            try:
                _, meta = store.load(row["key"], verify=False)
            except store_mod.StoreError:
                continue
            return {"key": row["key"], **{k: meta[k] for k in ("thresholds", "measure", "how")}}
    return None


def resolve_thresholds(
    model_name: str,
    identity: dict,
    measures: Sequence[str],
    prefixes: Sequence[int],
    store: store_mod.ResultStore | None,
) -> tuple[list[dict], str | None]:
    """Per (measure, prefix): {"measure", "prefix_tokens", "threshold", "source"}; and the calibrated auto measure.

    Order: the calibration in the model card of these weights (the demo models), the newest stored calibration of
    these weights, the published SSCD 0.75, the uncalibrated default of `iarmem_core.metrics` (flagged as such).
    """
    cals = []
    b = card_calibration(model_name, identity)
    if b is not None:
        cals.append((b, f"calibration in the model card of {model_name}: {b.get('how', '')}"))
    if store is not None:
        s = find_calibration(store, identity)
        if s is not None:
            cals.append((s, f"calibrated (store key {s['key']}): {s.get('how', '')}"))
    rows, auto = [], None
    for cal, _ in cals:
        auto = auto or cal.get("measure")
    for m in measures:
        for p in prefixes:
            thr, src = None, None
            for cal, how in cals:
                t = (cal.get("thresholds") or {}).get(m, {}).get(str(p))
                if t is not None:
                    thr, src = float(t), how
                    break
            if thr is None:
                info = metrics.SIMILARITY_MEASURES[m]
                thr = SSCD_THRESHOLD if m == "sscd" else float(info.default_threshold)
                src = info.threshold_source if m == "sscd" else f"uncalibrated default of iarmem_core.metrics ({thr})"
            rows.append({"measure": m, "prefix_tokens": int(p), "threshold": thr, "source": src})
    return rows, auto


def resolve_similarity(requested: str, measures: Sequence[str], calibrated_auto: str | None) -> str:
    """The decision measure: the requested one, or for auto SSCD > the calibrated measure > token_match."""
    if requested != "auto":
        return requested
    if "sscd" in measures:
        return "sscd"
    if calibrated_auto in measures:
        return calibrated_auto
    return "token_match" if "token_match" in measures else measures[0]
