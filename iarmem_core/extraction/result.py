"""An attack's stored table as a result: `ExtractionResult.count(threshold, similarity)` recounts at once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from iarmem_core import metrics
from iarmem_core import store as store_mod
from iarmem_core.extraction.thresholds import resolve_similarity, resolve_thresholds


# ---------------------------------------------------------------------------------------------------
# 4. Results
def is_extracted(scores, threshold) -> np.ndarray:
    """The one extraction decision, used by every count and every label: similarity strictly above the threshold.

    Both sides are compared in float32, the precision the scores are stored in: the threshold is rounded to
    float32 first. A score that equals the threshold as typed (token match moves in steps of 1/N, so 0.91 is
    a score) is therefore *not* extracted, wherever it is compared; comparing the float32 score with a float64
    threshold instead would call float32(0.91) = 0.91000000238 "above 0.91". `threshold` is a number or an
    array broadcastable to `scores` (per-row thresholds).
    """
    s = np.asarray(scores, dtype=np.float32)
    t = np.asarray(threshold, dtype=np.float64).astype(np.float32)
    return np.asarray(s > t)


@dataclass
class ExtractionResult:
    """One row per (candidate, prefix): the table, gallery images and meta; `count` recounts instantly."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import pandas as pd

        a = self.arrays
        cols = {
            "image_id": a["image_id"].astype(str),
            "label": a["label"],
            "score": a["score"],
            "prefix_tokens": a["prefix_tokens"],
            "split": a["split"].astype(str),
            "rank": a["rank"],
            "item": a["item"],
        }
        for m in self.meta.get("measures", []):
            cols[m] = a[f"sim_{m}"]
        cols["planted"] = pd.array([None if v < 0 else bool(v) for v in a["planted"]], dtype="boolean")
        cols["count"] = pd.array([None if v < 0 else int(v) for v in a["count"]], dtype="Int64")
        self.table = pd.DataFrame(cols)
        self.table["extracted"] = self.decision()

    # -- images -----------------------------------------------------------------------------------------
    @property
    def generated_images(self) -> np.ndarray:
        """uint8 [R, H, W, 3], indexed like the table."""
        return self.arrays["generated_RHW3"]

    @property
    def recon_images(self) -> np.ndarray:
        """uint8 [R, H, W, 3]: the tokenizer's reconstruction of each row's candidate, indexed like the table."""
        return self.arrays["recon_IHW3"][self.arrays["item_row"]]

    # -- decision ---------------------------------------------------------------------------------------
    @property
    def similarity(self) -> str:
        return self.meta["similarity"]

    def thresholds(self, similarity: str | None = None) -> dict[int, float]:
        """{prefix: threshold} of a measure (the default one when None)."""
        m = metrics.canonical_measure(similarity or self.similarity)
        return {r["prefix_tokens"]: r["threshold"] for r in self.meta["thresholds"] if r["measure"] == m}

    def decision(self, threshold: float | None = None, similarity: str | None = None) -> np.ndarray:
        """Bool [R]: `is_extracted` (similarity strictly above the threshold; per prefix when threshold is None)."""
        m = metrics.canonical_measure(similarity or self.similarity)
        if m not in self.meta.get("measures", []):
            raise ValueError(f"{m!r} was not computed in this result; it has {', '.join(self.meta['measures'])}")
        s = self.arrays[f"sim_{m}"]
        if threshold is None:
            thr = self.thresholds(m)
            t = np.array([thr[int(p)] for p in self.arrays["prefix_tokens"]], dtype=np.float64)
        else:
            t = float(threshold)
        return is_extracted(s, t)

    def with_decision(self, similarity: str | None = None, threshold: float | None = None) -> ExtractionResult:
        """The same result with another default measure and/or one threshold for every prefix (no recompute)."""
        meta = dict(self.meta)
        if similarity is not None:
            m = metrics.canonical_measure(similarity)
            if m == "auto":
                m = resolve_similarity("auto", meta["measures"], meta.get("calibrated_measure"))
            if m not in meta["measures"]:
                raise ValueError(f"{m!r} was not computed in this result; it has {', '.join(meta['measures'])}")
            meta["similarity"] = m
        if threshold is not None:
            meta["thresholds"] = [
                {**r, "threshold": float(threshold), "source": "user"} if r["measure"] == meta["similarity"] else r
                for r in meta["thresholds"]
            ]
        out = ExtractionResult(self.arrays, meta)
        out.meta["threshold"] = out.thresholds()[meta["prefix_tokens"][0]]
        return out

    def count(self, threshold: float | None = None, similarity: str | None = None, prefix: int | None = None) -> dict:
        """Counts at one prefix (default: the first) for a measure and threshold, against planted truth.

        Keys: extracted, candidates, precision_planted (None when nothing is extracted), recall_planted (over
        every planted image of the data selection, candidate or not), recall_planted_by_count,
        recall_planted_max_count, heldout_extracted, heldout_n, heldout_false_rate, similarity, threshold,
        prefix_tokens, by_prefix (the same counts at every prefix).
        """
        m = metrics.canonical_measure(similarity or self.similarity)
        prefixes = self.meta["prefix_tokens"]
        p = int(prefix if prefix is not None else prefixes[0])
        if p not in prefixes:
            raise ValueError(f"prefix {p} not in this result's prefixes {prefixes}")
        out = self._count_at(m, threshold, p)
        out["by_prefix"] = {str(q): self._count_at(m, threshold, q) for q in prefixes} if len(prefixes) > 1 else {}
        return out

    def _count_at(self, m: str, threshold: float | None, p: int) -> dict:
        a = self.arrays
        dec = self.decision(threshold, m)
        at = a["prefix_tokens"] == p
        tr, ho = at & (a["split"] == "train"), at & (a["split"] == "heldout")
        ext = dec & tr
        n_ext = int(ext.sum())
        thr = self.thresholds(m)[p] if threshold is None else float(threshold)
        out = {"similarity": m, "threshold": thr, "prefix_tokens": p, "candidates": int(tr.sum()), "extracted": n_ext}
        planted_in_data = self.meta.get("planted_counts_in_data")
        if planted_in_data:
            planted = a["planted"] == 1
            hit = ext & planted
            out["extracted_planted"] = int(hit.sum())
            out["candidates_planted"] = int((tr & planted).sum())
            out["precision_planted"] = float(hit.sum() / n_ext) if n_ext else None
            total = sum(planted_in_data.values())
            out["recall_planted"] = float(hit.sum() / total) if total else None
            by = {}
            for c, n_c in sorted(planted_in_data.items(), key=lambda kv: int(kv[0])):
                by[str(c)] = float((hit & (a["count"] == int(c))).sum() / n_c) if n_c else None
            out["recall_planted_by_count"] = by
            top = max(planted_in_data, key=int)
            out["recall_planted_max_count"] = by[str(top)]
            out["max_count"] = int(top)
        else:
            out.update(
                precision_planted=None, recall_planted=None, recall_planted_by_count={}, recall_planted_max_count=None
            )
        n_ho = int(ho.sum())
        out["heldout_n"] = n_ho
        out["heldout_extracted"] = int((dec & ho).sum())
        out["heldout_false_rate"] = float((dec & ho).sum() / n_ho) if n_ho else None
        return out

    def extracted_ids(
        self, threshold: float | None = None, similarity: str | None = None, prefix: int | None = None
    ) -> list[str]:
        """Ids of the training candidates extracted at one prefix (default: the first), in table order."""
        m = metrics.canonical_measure(similarity or self.similarity)
        p = int(prefix if prefix is not None else self.meta["prefix_tokens"][0])
        a = self.arrays
        hit = self.decision(threshold, m) & (a["prefix_tokens"] == p) & (a["split"] == "train")
        return [str(v) for v in a["image_id"][hit]]

    def summary(self) -> dict:
        """The CLI's JSON: store key, candidates, prefixes, decision, counts."""
        c = self.count()
        return {
            "store_key": self.meta.get("store_key"),
            "candidates": c["candidates"],
            "prefix_tokens": self.meta["prefix_tokens"],
            "similarity": c["similarity"],
            "threshold": c["threshold"],
            "threshold_source": self._source(c["similarity"], c["prefix_tokens"]),
            "extracted": c["extracted"],
            "extracted_ids": self.extracted_ids(),
            "precision_planted": c["precision_planted"],
            "recall_planted": c["recall_planted"],
            "recall_planted_by_count": c["recall_planted_by_count"],
            "recall_planted_max_count": c["recall_planted_max_count"],
            "heldout_false_rate": c["heldout_false_rate"],
            "heldout_n": c["heldout_n"],
            "heldout_extracted": c["heldout_extracted"],
            "by_prefix": c["by_prefix"],
            "measures": self.meta["measures"],
            "skipped_measures": self.meta.get("skipped_measures", {}),
            "score": self.meta.get("score", {}),
            "edit": self.meta.get("edit"),
            "timings": self.meta.get("timings", {}),
            "oom_events": self.meta.get("oom_events", []),
        }

    def _source(self, m: str, p: int) -> str:
        for r in self.meta["thresholds"]:
            if r["measure"] == m and r["prefix_tokens"] == p:
                return r["source"]
        return ""


def load_extraction(store, key: str) -> ExtractionResult:
    """A stored extraction result by key."""
    st = store if store is not None else store_mod.get_store()
    arrays, meta = st.load(key)
    meta = dict(meta)
    meta.setdefault("store_key", key)
    return finalize(ExtractionResult(arrays, meta), st)


def load_partial_extraction(store, key: str) -> ExtractionResult | None:
    """The rows finished so far of a running (or interrupted) extraction job, or None (for a live gallery)."""
    st = store if store is not None else store_mod.get_store()
    part = st.load_partial(key)
    if part is None or "meta_json" not in part[0]:
        return None
    arrays, _ = part
    meta = json.loads(str(arrays["meta_json"][0]))
    rows = {k: v for k, v in arrays.items() if k != "meta_json"}
    return ExtractionResult(rows, meta)


def finalize(
    res: ExtractionResult, store, similarity: str | None = None, threshold: float | None = None
) -> ExtractionResult:
    """Re-resolve the thresholds (a calibration saved after the run applies too) and set the decision.

    `similarity` None keeps the result's measure ("auto" re-resolves it); `threshold` None keeps the
    calibrated / published thresholds per prefix, a number replaces them for the decision measure.
    """
    meta = dict(res.meta)
    model = meta.get("model") or {}
    rows, auto = resolve_thresholds(
        model.get("name", ""), model.get("weights", {}), meta["measures"], meta["prefix_tokens"], store
    )
    meta["thresholds"], meta["calibrated_measure"] = rows, auto
    sim = similarity if similarity is not None else meta.get("similarity", "auto")
    meta["similarity"] = resolve_similarity(metrics.canonical_measure(sim), meta["measures"], auto)
    out = ExtractionResult(res.arrays, meta)
    if threshold is not None:
        out = out.with_decision(threshold=threshold)
    out.meta["threshold"] = out.thresholds()[meta["prefix_tokens"][0]]  # the decision's, at the first prefix
    return out
