"""Thresholds of the similarity measures, per model and prefix: built-in, stored calibrations, published, defaults."""

from __future__ import annotations

from collections.abc import Sequence

from iarmem_core import metrics
from iarmem_core import store as store_mod
from iarmem_core.extraction.config import CALIBRATION_KIND, SSCD_THRESHOLD

# Built-in thresholds of the shipped demo models, from `calibrate` (see the module docstring):
# model name -> {"weights": identity["transformer"] they were calibrated for, "measure": the auto measure,
# "thresholds": {measure: {str(prefix): threshold}}, "how": ...}. Filled from
# `python -m iarmem_core extract --model demo-var --calibrate --json`.
_DEMO_CALIBRATION_HOW = (
    "the highest score of 800 held-out images (the demo held-out split minus the 200 evaluation "
    "images, seed 0) attacked with the same prefix, rounded up to 4 decimals"
)
DEMO_CALIBRATION: dict[str, dict] = {
    "demo-var": {
        "weights": "transformer.safetensors:c19bee693785ae1a",
        "measure": "token_match",
        "thresholds": {
            "token_match": {"1": 0.4807, "5": 0.5681, "14": 0.5604, "30": 0.6601, "66": 0.7188},
            "ssim": {"1": 0.9514, "5": 0.9514, "14": 0.9655, "30": 0.9835, "66": 0.9796},
            "feature_cosine": {"1": 0.997, "5": 0.9985, "14": 0.9984, "30": 0.9992, "66": 0.9997},
        },
        "how": _DEMO_CALIBRATION_HOW,
    },
    "demo-rar": {
        "weights": "transformer.safetensors:35e0d6f79905e4d2",
        "measure": "token_match",
        "thresholds": {
            "token_match": {"4": 0.5334, "8": 0.5715, "16": 0.5625, "24": 0.65, "32": 0.8438},
            "ssim": {"4": 0.9354, "8": 0.9486, "16": 0.9658, "24": 0.9863, "32": 0.9938},
            "feature_cosine": {"4": 0.9986, "8": 0.9987, "16": 0.9982, "24": 0.9995, "32": 0.9999},
        },
        "how": _DEMO_CALIBRATION_HOW,
    },
}


def _builtin_calibration(model_name: str, identity: dict) -> dict | None:
    cal = DEMO_CALIBRATION.get(model_name)
    if cal is None or cal.get("weights") != identity.get("transformer"):
        return None
    return cal


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

    Order: built-in demo calibration of these weights, the newest stored calibration of these weights, the
    published SSCD 0.75, the uncalibrated default of `iarmem_core.metrics` (flagged as such).
    """
    cals = []
    b = _builtin_calibration(model_name, identity)
    if b is not None:
        cals.append((b, f"built-in calibration of {model_name}: {b.get('how', '')}"))
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
