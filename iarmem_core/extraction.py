"""The training-data extraction attack (METHOD.md sections 3 and 4, the protocol of Kowalczuk et al.).

1. Score every image of the data selection: teacher-forced top-1 accuracy (true class, no CFG). VAR ranks
   by the last scale's accuracy, next-token models by the last 99 tokens (all when fewer). A stored UnitMem
   pass of the same model and data already holds the per-token correctness (`correct_NT`) and is reused;
   otherwise a cheap batched teacher-forced pass runs as its own job (kind ``memscore``).
2. Candidates: the top `candidates_per_class` images of each class by that score, or explicit image ids.
3. For each candidate and each prefix length P: the first P true tokens (VAR: whole scales) and the class
   label; the rest is decoded greedily (default), class-conditional, without CFG, with the KV cache, in
   batches of candidates. An optional `hooks.UnitEdit` is applied to the generation only (the candidates
   stay those of the unedited model, so "before" and "after" attack the same images).
4. The generated tokens are decoded and compared with the tokenizer's reconstruction of the candidate.
5. Every available similarity is kept per row; one of them (with its threshold) makes the decision:

   - ``sscd``: cosine of SSCD ``sscd_disc_mixup`` embeddings from the user's TorchScript file, threshold
     0.75 (published).
   - ``token_match``: fraction of generated tokens (after the prefix) equal to the candidate's true tokens.
   - ``ssim``: SSIM of generated vs reconstructed image (only for images of at least 11 px).
   - ``feature_cosine``: cosine in the bundled demo feature space (``demo-fashion-cnn``); computed for demo
     and test models only (a Fashion-MNIST CNN says nothing about ImageNet images).

   ``similarity="auto"`` is SSCD when its file is given, else the model's calibrated offline measure, else
   token_match.

Threshold calibration of the offline measures (`calibrate`): the attack is run on *held-out* images the
model never saw, at the same prefixes; the threshold of each (measure, prefix) is the lowest value that at
most ``max_false_rate`` of those held-out generations exceed (`metrics.calibrate_threshold`). The default,
``max_false_rate=0``, is the highest similarity any calibration image reached: for a new held-out image the
chance to exceed the maximum of n exchangeable ones is 1/(n+1) (0.12% for the demo's 800). A 1% quantile
proved too permissive on demo-rar: it let in unique training images reproduced only half-way (token match
0.46-0.52, SSIM 0.72-0.90; copies score >= 0.58 and > 0.95). On the demo the calibration images are the
held-out images *not* in the evaluation held-out sample (the two are disjoint, `demo_heldout_sets`), so the
reported held-out false rate is measured on other images than the threshold was set on. Thresholds depend
on the model and the prefix; every result records, per measure and prefix, the threshold and where it came
from (user, published, calibrated with the store key of the calibration, built-in demo calibration, or an
uncalibrated default).

The decision is never baked into the stored result: the table keeps the scores, and
`ExtractionResult.count(threshold, similarity)` recounts instantly (the app's threshold slider).

Example:
    >>> from iarmem_core import data, extraction
    >>> from iarmem_core.adapters import load_adapter
    >>> m = load_adapter("demo-var")
    >>> res = extraction.run_extraction(m, data.select_demo(500), extraction.ExtractionConfig())
    >>> res.count()["extracted"], res.count(threshold=0.99)["extracted"]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iarmem_core import data, hooks, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.hooks import UnitEdit

KIND = "extraction"
SCORE_KIND = "memscore"
CALIBRATION_KIND = "extraction-calibration"
VERSION = "2"  # bump when the algorithm's output changes (it goes into the store key)
CHECKPOINT_EVERY_S = 5.0  # partial results are saved this often, so the app's gallery fills while it runs
TAIL_TOKENS = 99  # next-token models rank by the last 99 image tokens (METHOD.md section 3)
PAPER_PREFIX = 30  # 30 tokens: 4 scales of VAR-256, 30 of RAR's 256 tokens (Kowalczuk et al.)
PAPER_PREFIX_SCALES = 4
PAPER_NEXT_TOKEN_N = 256
MEASURES = ("sscd", "token_match", "ssim", "feature_cosine")
SSCD_THRESHOLD = 0.75
MIN_SSIM_SIZE = 11  # SSIM's Gaussian window is 11x11
DEFAULT_MAX_FALSE_RATE = 0.0  # the highest score of any calibration held-out image (see the docstring)

# Built-in thresholds of the shipped demo models, from `calibrate` (see the module docstring):
# model name -> {"weights": identity["transformer"] they were calibrated for, "measure": the auto measure,
# "thresholds": {measure: {str(prefix): threshold}}, "how": ...}. Filled from
# `python -m iarmem_core extract --model demo-var --calibrate --json`.
_DEMO_CALIBRATION_HOW = ("the highest score of 800 held-out images (the demo held-out split minus the 200 evaluation "
                         "images, seed 0) attacked with the same prefix, rounded up to 4 decimals")
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


def canonical_measure(name: str) -> str:
    """'feature-cosine' / 'feature_cosine' -> 'feature_cosine'; 'auto' stays; unknown names raise."""
    n = str(name).strip().lower().replace("-", "_")
    if n != "auto" and n not in MEASURES:
        raise ValueError(f"unknown similarity {name!r}: expected auto or one of {', '.join(MEASURES)}")
    return n


# ---------------------------------------------------------------------------------------------------
# Out-of-memory handling
def is_oom(e: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class OutOfMemory(RuntimeError):
    """Even a batch of one does not fit; the message says what to do."""


def adaptive_batches(n: int, batch_size: int, work: Callable[[int, int], None], *, start: int = 0,
                     events: list | None = None, what: str = "batch") -> int:
    """Run ``work(i, j)`` over [start, n) in batches; on out-of-memory halve the batch and retry the same items.

    Every halving is appended to `events` ({"at", "from", "to", "error"}). Returns the final batch size. A
    batch of one that still does not fit raises `OutOfMemory` with the original error.
    """
    bs, i = max(1, int(batch_size)), start
    while i < n:
        j = min(n, i + bs)
        try:
            work(i, j)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if bs == 1:
                raise OutOfMemory(
                    f"out of memory on a {what} of 1 item (item {i}): the model does not fit on this device. "
                    f"Use a smaller model, dtype bf16, or another device (--device cpu). Original error: "
                    f"{str(e).splitlines()[0][:200]}") from e
            new = max(1, bs // 2)
            if events is not None:
                events.append({"at": int(i), "from": int(bs), "to": int(new), "error": str(e).splitlines()[0][:200]})
            bs = new
            continue
        i = j
    return bs


# ---------------------------------------------------------------------------------------------------
# 1. Per-image memorization scores (METHOD.md section 3)
def score_groups(adapter: IARAdapter) -> list[tuple[str, np.ndarray]]:
    """(name, flat token indices) of the stored per-image accuracies: each scale, each grid row, the tail."""
    groups = [(g.name, g.index.numpy()) for g in adapter.position_groups(kinds=("scale", "row"))]
    n = adapter.n_tokens
    groups.append((f"last{min(TAIL_TOKENS, n)}", np.arange(max(0, n - TAIL_TOKENS), n)))
    return groups


def score_definition(adapter: IARAdapter) -> str:
    """Which accuracy ranks the candidates (VAR: the last scale; next-token: the last 99 tokens)."""
    if len(adapter.token_grids) > 1:
        h, w = adapter.token_grids[-1]
        return f"{h}x{w}"
    return f"last{min(TAIL_TOKENS, adapter.n_tokens)}"


def accuracies_from_correct(correct_NT: np.ndarray, adapter: IARAdapter) -> np.ndarray:
    """[N, G] mean top-1 correctness over each score group (`score_groups`)."""
    c = np.asarray(correct_NT, dtype=np.float32)
    return np.stack([c[:, idx].mean(axis=1) for _, idx in score_groups(adapter)], axis=1)


def _score_spec(adapter: IARAdapter, image_set: data.ImageSet) -> dict:
    return {"model": adapter.identity, "data": data.data_fingerprint(image_set), "dtype": str(adapter.dtype)}


def find_unitmem(store: store_mod.ResultStore, adapter: IARAdapter, image_set: data.ImageSet) -> str | None:
    """Key of a stored UnitMem result of this model and data selection in fp32 (its correct_NT is reusable)."""
    want = _score_spec(adapter, image_set)
    want = store_mod.to_jsonable(want)
    for row in store.list(kind="unitmem"):
        spec = row.get("spec") or {}
        if (spec.get("model") == want["model"] and spec.get("data") == want["data"]
                and spec.get("dtype") == want["dtype"] and (spec.get("config") or {}).get("dtype") == "fp32"
                and "correct_NT" in (row.get("arrays") or {})):
            return row["key"]
    return None


def _score_job(adapter: IARAdapter, image_set: data.ImageSet, batch_size: int):
    def fn(ctx) -> tuple[dict, dict]:
        n, G = len(image_set), len(score_groups(adapter))
        acc_NG = np.zeros((n, G), np.float32)
        start, events = 0, []
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            acc_NG[:] = arrays["acc_NG"]
            start = int(meta["n_done"])
        ckpt = _Checkpointer(ctx)

        def work(i: int, j: int) -> None:
            ctx.check()
            idx = np.arange(i, j)
            tokens = adapter.tokenize(image_set.images(idx, size=adapter.image_size))
            logits_BNV = adapter.teacher_forced_logits(tokens, image_set.labels_tensor(idx))
            correct_BN = (logits_BNV.argmax(-1) == adapter.flatten(tokens)).cpu().numpy()
            acc_NG[i:j] = accuracies_from_correct(correct_BN, adapter)
            ctx.progress(j / n, f"scoring {j}/{n} images (teacher-forced)")
            if j < n:
                ckpt.maybe(lambda: ({"acc_NG": acc_NG}, {"n_done": j}))

        adaptive_batches(n, batch_size, work, start=start, events=events, what="teacher-forced batch")
        gi = [g for g, _ in score_groups(adapter)].index(score_definition(adapter))
        meta = {"groups": [g for g, _ in score_groups(adapter)], "score_group": score_definition(adapter),
                "oom_events": events, "source": "teacher-forced pass (memscore job)",
                "image_ids": list(image_set.ids)}
        return {"acc_NG": acc_NG, "score_N": acc_NG[:, gi].copy()}, meta

    return fn


def memorization_scores(adapter: IARAdapter, image_set: data.ImageSet, *, store=None, batch_size: int = 32,
                        on_progress=None, force: bool = False) -> tuple[np.ndarray, dict]:
    """(acc_NG [N, G] per score group, meta with `groups`, `score_group` and `source`).

    Reuses the correct_NT of a stored UnitMem pass of the same model and data when there is one; otherwise
    runs (or loads) the ``memscore`` job.
    """
    st = store if store is not None else store_mod.get_store()
    names = [g for g, _ in score_groups(adapter)]
    key = None if force else find_unitmem(st, adapter, image_set)
    if key is not None:
        arrays, _ = st.load(key, mmap=True)
        acc = accuracies_from_correct(np.asarray(arrays["correct_NT"]), adapter)
        return acc, {"groups": names, "score_group": score_definition(adapter),
                     "source": f"correct_NT of UnitMem result {key}"}
    spec = _score_spec(adapter, image_set)
    arrays, meta = jobs.run_job(SCORE_KIND, spec, _score_job(adapter, image_set, batch_size), store=st,
                                version=VERSION, force=force, on_progress=on_progress)
    meta = dict(meta)
    meta["store_key"] = st.key(SCORE_KIND, spec, VERSION)
    return np.asarray(arrays["acc_NG"]), meta


def per_image_scores(adapter: IARAdapter, image_set: data.ImageSet, *, store=None, batch_size: int = 32,
                     on_progress=None, force: bool = False, group: str | None = None) -> np.ndarray:
    """[N] per-image memorization score (VAR: last scale's accuracy; next-token: last 99 tokens).

    `group` picks another stored accuracy instead (a scale "4x4", a row "8x8/row3", or "last99").
    """
    acc, meta = memorization_scores(adapter, image_set, store=store, batch_size=batch_size,
                                    on_progress=on_progress, force=force)
    g = group or meta["score_group"]
    if g not in meta["groups"]:
        raise ValueError(f"no per-image score group {g!r}; stored groups: {', '.join(meta['groups'])}")
    return acc[:, meta["groups"].index(g)]


def class_ranks(scores_N: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
    """[N] rank of each image within its class by score (0 = highest; ties: lower index first)."""
    scores_N, labels_N = np.asarray(scores_N, np.float64), np.asarray(labels_N)
    idx = np.arange(len(scores_N))
    order = np.lexsort((idx, -scores_N, labels_N))  # by class, then descending score, then index
    lab = labels_N[order]
    start = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])  # first position of each class in `order`
    first = np.repeat(start, np.diff(np.r_[start, len(order)]))
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order)) - first
    return ranks


def select_candidates(scores_N: np.ndarray, labels_N: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the top `per_class` images of each class by score (ties: lower index first), by class."""
    scores_N, labels_N = np.asarray(scores_N, np.float64), np.asarray(labels_N)
    ranks = class_ranks(scores_N, labels_N)
    chosen = np.flatnonzero(ranks < per_class)
    return chosen[np.lexsort((ranks[chosen], labels_N[chosen]))].astype(np.int64)


class _Checkpointer:
    """Saves at most every CHECKPOINT_EVERY_S seconds, and never more than 10% of the time (large states)."""

    def __init__(self, ctx):
        self.ctx, self.last, self.cost = ctx, time.monotonic(), 0.0

    def maybe(self, make: Callable[[], tuple[dict, dict]]) -> None:
        if time.monotonic() - self.last < max(CHECKPOINT_EVERY_S, 10 * self.cost):
            return
        t = time.monotonic()
        self.ctx.checkpoint(*make())
        self.last = time.monotonic()
        self.cost = self.last - t


# ---------------------------------------------------------------------------------------------------
# 2. Configuration
@dataclass(frozen=True)
class ExtractionConfig:
    """Options of an extraction attack. `similarity` and `threshold` only pick the decision (a recount)."""

    candidates_per_class: int = 5  # top-k per class by the per-image memorization score
    candidate_ids: tuple[str, ...] | None = None  # or an explicit list of image ids
    prefix_tokens: tuple[int, ...] | None = None  # None -> family default (VAR: whole scales); several = sweep
    similarity: str = "auto"  # sscd (needs sscd_path), ssim, feature_cosine, token_match, auto
    threshold: float | None = None  # None -> the measure's calibrated / published threshold
    cfg: float = 0.0  # greedy, class-conditional, no CFG: the paper's attack
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    batch_size: int = 16
    heldout: bool = True  # also attack held-out images (the false rate)
    seed: int = 0
    heldout_n: int = 200  # demo: class-stratified held-out images attacked (disjoint from calibration)
    gallery_size: int = 128  # stored images are downsampled to at most this many pixels a side
    measures: tuple[str, ...] | None = None  # None -> every measure available for this model

    def __post_init__(self) -> None:
        object.__setattr__(self, "similarity", canonical_measure(self.similarity))
        if self.candidate_ids is not None:
            object.__setattr__(self, "candidate_ids", tuple(str(i) for i in self.candidate_ids))
        if self.prefix_tokens is not None:
            p = self.prefix_tokens
            p = (p,) if isinstance(p, int) else tuple(int(v) for v in p)
            if not p:
                raise ValueError("prefix_tokens is empty: give at least one prefix length, or None")
            object.__setattr__(self, "prefix_tokens", p)
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(canonical_measure(m) for m in self.measures))
        if self.candidates_per_class < 1 and self.candidate_ids is None:
            raise ValueError(f"candidates_per_class must be >= 1, got {self.candidates_per_class}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("candidate_ids", "prefix_tokens", "measures"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    def job_dict(self) -> dict:
        """The fields that determine the stored table (the decision fields are left out)."""
        d = self.to_dict()
        d.pop("similarity")
        d.pop("threshold")
        return d


def default_prefix(adapter: IARAdapter) -> int:
    """The paper's prefix, carried over by its meaning: VAR 4 whole scales (30 tokens of VAR-256; fewer when
    the model has at most 4 scales), next-token models the same fraction of the image as 30 of RAR's 256
    tokens (30 for 16x16 grids, 8 for 8x8)."""
    if len(adapter.token_grids) > 1:
        n_scales = min(PAPER_PREFIX_SCALES, len(adapter.token_grids) - 1)
        return adapter.scale_slices[n_scales - 1].stop
    return max(1, round(PAPER_PREFIX * adapter.n_tokens / PAPER_NEXT_TOKEN_N))


def resolve_prefixes(adapter: IARAdapter, cfg: ExtractionConfig) -> list[int]:
    prefixes = list(cfg.prefix_tokens) if cfg.prefix_tokens is not None else [default_prefix(adapter)]
    for p in prefixes:
        adapter.check_prefix(p)
        if p >= adapter.n_tokens:
            raise ValueError(f"a prefix of {p} tokens leaves nothing to generate ({adapter.n_tokens} tokens)")
    return list(dict.fromkeys(prefixes))


def demo_heldout_sets(n_eval: int = 200, seed: int = 0) -> tuple[data.ImageSet, data.ImageSet]:
    """(evaluation, calibration): a class-stratified sample of the demo's held-out split and the rest."""
    base = data.load_demo("heldout")
    ev = data.select_demo(n=n_eval, seed=seed, split="heldout")
    rest = np.setdiff1d(np.arange(len(base)), [base.ids.index(i) for i in ev.ids])
    return ev, base.subset(rest, name=f"demo/heldout[calibration, not in n={n_eval},seed={seed}]")


def _is_demo_set(image_set: data.ImageSet) -> bool:
    return image_set.describe().get("source") == "demo"


# ---------------------------------------------------------------------------------------------------
# 3. Similarity measures and thresholds
def available_measures(adapter: IARAdapter, cfg: ExtractionConfig, sscd_path) -> tuple[list[str], dict]:
    """(measures to compute, {measure: why it is skipped})."""
    want = list(cfg.measures) if cfg.measures is not None else list(MEASURES)
    skipped = {}
    out = []
    for m in want:
        if m == "sscd" and sscd_path is None:
            skipped[m] = "no SSCD file (sscd_disc_mixup.torchscript.pt) given"
        elif m == "ssim" and adapter.image_size < MIN_SSIM_SIZE:
            skipped[m] = f"images of {adapter.image_size} px are smaller than SSIM's 11x11 window"
        elif m == "feature_cosine" and cfg.measures is None and adapter.spec.kind == "released":
            skipped[m] = "the bundled feature space is a Fashion-MNIST CNN; not meaningful for this model"
        elif m == "feature_cosine" and _demo_feature_space() is None:
            skipped[m] = "the bundled feature network (assets/demo-fashion-cnn.safetensors) is missing"
        else:
            out.append(m)
    sim = cfg.similarity
    if sim != "auto" and sim not in out:
        raise ValueError(f"similarity {sim!r} cannot be computed here: {skipped.get(sim, 'not requested')}")
    return out, skipped


_FEATURE_SPACE: dict = {}


def _demo_feature_space():
    """The bundled demo feature space, or None when its file is absent (built once per process)."""
    if "demo" not in _FEATURE_SPACE:
        try:
            from iarmem_core.metrics import DemoFeatureSpace

            _FEATURE_SPACE["demo"] = DemoFeatureSpace()
        except Exception:  # noqa: BLE001 - a missing or broken asset only removes this measure
            _FEATURE_SPACE["demo"] = None
    return _FEATURE_SPACE["demo"]


def _sscd_space(path):
    from iarmem_core.metrics import SSCDFeatureSpace

    key = ("sscd", str(Path(path).expanduser().resolve()))
    if key not in _FEATURE_SPACE:
        _FEATURE_SPACE[key] = SSCDFeatureSpace(path)
    return _FEATURE_SPACE[key]


def compute_similarities(measures: Sequence[str], gen_B3HW: torch.Tensor, recon_B3HW: torch.Tensor,
                         gen_BN: torch.Tensor, true_BN: torch.Tensor, prefix: int, sscd_path=None
                         ) -> dict[str, np.ndarray]:
    """{measure: [B] float32} for generated vs reconstructed images (tokens for token_match)."""
    from iarmem_core import metrics

    g, r = gen_B3HW.float().cpu().clamp(0, 1), recon_B3HW.float().cpu().clamp(0, 1)
    out = {}
    for m in measures:
        if m == "token_match":
            s = metrics.token_match_rate(gen_BN.cpu(), true_BN.cpu(), start=prefix)
        elif m == "ssim":
            s = metrics.ssim(g, r)
        elif m == "feature_cosine":
            s = metrics.feature_cosine(_demo_feature_space(), g, r)
        elif m == "sscd":
            s = metrics.sscd_cosine(_sscd_space(sscd_path), g, r)
        else:
            raise ValueError(f"unknown measure {m!r}")
        out[m] = s.float().numpy().astype(np.float32)
    return out


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


def resolve_thresholds(model_name: str, identity: dict, measures: Sequence[str], prefixes: Sequence[int],
                       store: store_mod.ResultStore | None) -> tuple[list[dict], str | None]:
    """Per (measure, prefix): {"measure", "prefix_tokens", "threshold", "source"}; and the calibrated auto measure.

    Order: built-in demo calibration of these weights, the newest stored calibration of these weights, the
    published SSCD 0.75, the uncalibrated default of `iarmem_core.metrics` (flagged as such).
    """
    from iarmem_core.metrics import SIMILARITY_MEASURES

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
                info = SIMILARITY_MEASURES[m.replace("_", "-")]
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


# ---------------------------------------------------------------------------------------------------
# 4. Results
def _to_uint8(x_B3HW: torch.Tensor, size: int) -> np.ndarray:
    x = x_B3HW.float().clamp(0, 1)
    if x.shape[-1] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class ExtractionResult:
    """One row per (candidate, prefix): the table, gallery images and meta; `count` recounts instantly."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        import pandas as pd

        a = self.arrays
        cols = {
            "image_id": a["image_id"].astype(str), "label": a["label"], "score": a["score"],
            "prefix_tokens": a["prefix_tokens"], "split": a["split"].astype(str), "rank": a["rank"],
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
        m = canonical_measure(similarity or self.similarity)
        return {r["prefix_tokens"]: r["threshold"] for r in self.meta["thresholds"] if r["measure"] == m}

    def decision(self, threshold: float | None = None, similarity: str | None = None) -> np.ndarray:
        """Bool [R]: similarity strictly above the threshold (per prefix when threshold is None)."""
        m = canonical_measure(similarity or self.similarity)
        if m not in self.meta.get("measures", []):
            raise ValueError(f"{m!r} was not computed in this result; it has {', '.join(self.meta['measures'])}")
        s = self.arrays[f"sim_{m}"]
        if threshold is None:
            thr = self.thresholds(m)
            t = np.array([thr[int(p)] for p in self.arrays["prefix_tokens"]], dtype=np.float64)
        else:
            t = float(threshold)
        return np.asarray(s > t)

    def with_decision(self, similarity: str | None = None, threshold: float | None = None) -> ExtractionResult:
        """The same result with another default measure and/or one threshold for every prefix (no recompute)."""
        meta = dict(self.meta)
        if similarity is not None:
            m = canonical_measure(similarity)
            if m == "auto":
                m = resolve_similarity("auto", meta["measures"], meta.get("calibrated_measure"))
            if m not in meta["measures"]:
                raise ValueError(f"{m!r} was not computed in this result; it has {', '.join(meta['measures'])}")
            meta["similarity"] = m
        if threshold is not None:
            meta["thresholds"] = [
                {**r, "threshold": float(threshold), "source": "user"} if r["measure"] == meta["similarity"] else r
                for r in meta["thresholds"]]
        out = ExtractionResult(self.arrays, meta)
        out.meta["threshold"] = out.thresholds()[meta["prefix_tokens"][0]]
        return out

    def count(self, threshold: float | None = None, similarity: str | None = None,
              prefix: int | None = None) -> dict:
        """Counts at one prefix (default: the first) for a measure and threshold, against planted truth.

        Keys: extracted, candidates, precision_planted (None when nothing is extracted), recall_planted (over
        every planted image of the data selection, candidate or not), recall_planted_by_count,
        recall_planted_max_count, heldout_extracted, heldout_n, heldout_false_rate, similarity, threshold,
        prefix_tokens, by_prefix (the same counts at every prefix).
        """
        m = canonical_measure(similarity or self.similarity)
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
        out = {"similarity": m, "threshold": thr, "prefix_tokens": p, "candidates": int(tr.sum()),
               "extracted": n_ext}
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
            out.update(precision_planted=None, recall_planted=None, recall_planted_by_count={},
                       recall_planted_max_count=None)
        n_ho = int(ho.sum())
        out["heldout_n"] = n_ho
        out["heldout_extracted"] = int((dec & ho).sum())
        out["heldout_false_rate"] = float((dec & ho).sum() / n_ho) if n_ho else None
        return out

    def summary(self) -> dict:
        """The CLI's JSON: store key, candidates, prefixes, decision, counts."""
        c = self.count()
        return {"store_key": self.meta.get("store_key"), "candidates": c["candidates"],
                "prefix_tokens": self.meta["prefix_tokens"], "similarity": c["similarity"],
                "threshold": c["threshold"], "threshold_source": self._source(c["similarity"], c["prefix_tokens"]),
                "extracted": c["extracted"], "precision_planted": c["precision_planted"],
                "recall_planted": c["recall_planted"], "recall_planted_by_count": c["recall_planted_by_count"],
                "recall_planted_max_count": c["recall_planted_max_count"],
                "heldout_false_rate": c["heldout_false_rate"], "heldout_n": c["heldout_n"],
                "heldout_extracted": c["heldout_extracted"], "by_prefix": c["by_prefix"],
                "measures": self.meta["measures"], "skipped_measures": self.meta.get("skipped_measures", {}),
                "score": self.meta.get("score", {}), "edit": self.meta.get("edit"),
                "timings": self.meta.get("timings", {}), "oom_events": self.meta.get("oom_events", [])}

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
    import json

    meta = json.loads(str(arrays["meta_json"][0]))
    rows = {k: v for k, v in arrays.items() if k != "meta_json"}
    return ExtractionResult(rows, meta)


# ---------------------------------------------------------------------------------------------------
# 5. The job
@dataclass
class _Plan:
    """The items to attack, candidates first and then held-out images, with their per-item table columns."""

    sets: list[data.ImageSet]  # [train selection] or [train selection, held-out set]
    set_of: np.ndarray  # [I] which set an item comes from
    idx: np.ndarray  # [I] its index in that set
    columns: dict[str, np.ndarray]  # [I] each: image_id, label, score, split, rank, item, planted, count
    score_meta: dict

    def batch(self, i: int, j: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [j-i, 3, size, size] and labels of items [i, j) (train items come before held-out ones)."""
        xs, ys = [], []
        for si, s_ in enumerate(self.sets):
            k = self.idx[i:j][self.set_of[i:j] == si]
            if len(k):
                xs.append(s_.images(k, size=size))
                ys.append(s_.labels_tensor(k))
        return torch.cat(xs), torch.cat(ys)


def _item_columns(image_set: data.ImageSet, idx: np.ndarray, scores: np.ndarray, ranks: np.ndarray,
                  split: str) -> dict[str, np.ndarray]:
    m = image_set.meta
    return {"image_id": np.array([image_set.ids[i] for i in idx], dtype=str), "label": image_set.labels[idx],
            "score": scores.astype(np.float32), "split": np.full(len(idx), split, dtype="<U7"), "rank": ranks,
            "item": idx.astype(np.int64),
            "planted": m["planted"][idx].astype(np.int8) if "planted" in m else np.full(len(idx), -1, np.int8),
            "count": m["count"][idx].astype(np.int64) if "count" in m else np.full(len(idx), -1, np.int64)}


def _make_plan(adapter: IARAdapter, image_set: data.ImageSet, heldout_set: data.ImageSet | None,
               cfg: ExtractionConfig, store, progress: Callable[[str], Callable[[float, str], None]]) -> _Plan:
    """Score the images (reusing UnitMem / memscore results) and choose the candidates."""
    bs = max(cfg.batch_size, 32)
    acc_tr, smeta = memorization_scores(adapter, image_set, store=store, batch_size=bs, on_progress=progress("train"))
    gi = smeta["groups"].index(smeta["score_group"])
    scores_tr = acc_tr[:, gi]
    if cfg.candidate_ids is not None:
        pos = {k: i for i, k in enumerate(image_set.ids)}
        missing = [c for c in cfg.candidate_ids if c not in pos]
        if missing:
            raise ValueError(f"candidate ids not in the data selection {image_set.name}: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        chosen = np.array([pos[c] for c in cfg.candidate_ids], np.int64)
        ranks = np.full(len(chosen), -1, np.int64)
    else:
        chosen = select_candidates(scores_tr, image_set.labels, cfg.candidates_per_class)
        ranks = class_ranks(scores_tr, image_set.labels)[chosen]
    sets, set_of, idx = [image_set], [np.zeros(len(chosen), np.int64)], [chosen]
    cols = [_item_columns(image_set, chosen, scores_tr[chosen], ranks, "train")]
    if heldout_set is not None and len(heldout_set):
        acc_ho, _ = memorization_scores(adapter, heldout_set, store=store, batch_size=bs,
                                        on_progress=progress("held-out"))
        all_ho = np.arange(len(heldout_set))
        sets.append(heldout_set)
        set_of.append(np.ones(len(all_ho), np.int64))
        idx.append(all_ho)
        cols.append(_item_columns(heldout_set, all_ho, acc_ho[:, gi], class_ranks(acc_ho[:, gi], heldout_set.labels),
                                  "heldout"))
    columns = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
    return _Plan(sets, np.concatenate(set_of), np.concatenate(idx), columns, smeta)


def _gen_kwargs(adapter: IARAdapter, cfg: ExtractionConfig) -> dict:
    return {"cfg": float(cfg.cfg), "top_k": int(cfg.top_k), "top_p": float(cfg.top_p),
            "temperature": float(cfg.temperature)}


@torch.no_grad()
def attack_batch(adapter: IARAdapter, images_B3HW: torch.Tensor, labels_B: torch.Tensor, prefixes: Sequence[int],
                 measures: Sequence[str], gen_kw: dict, *, seed: int = 0, edit: UnitEdit | None = None,
                 sscd_path=None, kv_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Attack one batch of candidates at every prefix: (true tokens [B, N], reconstructions [B, 3, H, W],
    [(generated tokens [B, N], generated images, {measure: [B] scores}) per prefix]).

    The edit (if any) applies to generation only, inside `hooks.edit` (this thread, undone on exit).
    """
    tokens = adapter.tokenize(images_B3HW)
    true_BN = adapter.flatten(tokens)
    recon = adapter.decode(tokens)
    results = []
    for p in prefixes:
        with hooks.edit(adapter.transformer, edit):
            gen = adapter.generate(labels_B, prefix=tokens if p else None, n_prefix=p, seed=seed + p,
                                   kv_cache=kv_cache, **gen_kw)
        gen_BN = adapter.flatten(gen)
        img = adapter.decode(gen)
        results.append((gen_BN, img, compute_similarities(measures, img, recon, gen_BN, true_BN, p, sscd_path)))
    return true_BN, recon, results


def _job_fn(adapter: IARAdapter, image_set: data.ImageSet, heldout_set: data.ImageSet | None,
            cfg: ExtractionConfig, edit: UnitEdit | None, sscd_path):
    prefixes = resolve_prefixes(adapter, cfg)
    measures, skipped = available_measures(adapter, cfg, sscd_path)

    def fn(ctx) -> tuple[dict, dict]:
        import json

        # -- 1. scores and candidates (sub-jobs in the same store, each resumable on its own): 10% of the bar
        t0 = time.perf_counter()
        plan = _make_plan(adapter, image_set, heldout_set, cfg, ctx.store,
                          lambda what: lambda f, msg: ctx.progress(0.1 * f, f"{what}: {msg}"))
        t_score = time.perf_counter() - t0

        # -- 2. the table: row r = item * P + prefix index; per-item columns repeat over the prefixes
        I, P, n_tok = len(plan.idx), len(prefixes), adapter.n_tokens
        tok_dtype = np.int16 if adapter.vocab_size <= np.iinfo(np.int16).max else np.int32
        side = min(adapter.image_size, cfg.gallery_size)
        R = I * P
        rows = {k: np.repeat(v, P) for k, v in plan.columns.items()}
        rows.update({
            "prefix_tokens": np.tile(np.asarray(prefixes, np.int64), I), "item_row": np.repeat(np.arange(I), P),
            "gen_tokens_RN": np.zeros((R, n_tok), tok_dtype), "true_tokens_RN": np.zeros((R, n_tok), tok_dtype),
            "generated_RHW3": np.zeros((R, side, side, 3), np.uint8),
            **{f"sim_{m}": np.full(R, np.nan, np.float32) for m in measures},
        })
        recon_IHW3 = np.zeros((I, side, side, 3), np.uint8)
        results_keys = ["gen_tokens_RN", "true_tokens_RN", "generated_RHW3"] + [f"sim_{m}" for m in measures]
        start, events, bs_now = 0, [], [cfg.batch_size]
        if ctx.resume_state is not None:
            arrays, st_meta = ctx.resume_state
            start = int(st_meta["n_items"])
            for k in results_keys:
                rows[k][: start * P] = arrays[k][: start * P]
            recon_IHW3[:start] = arrays["recon_IHW3"][:start]
            bs_now[0], events = int(st_meta["batch_size"]), list(st_meta.get("oom_events", []))

        planted_counts = {}
        if "planted" in image_set.meta and "count" in image_set.meta:
            c_pl = image_set.meta["count"][image_set.meta["planted"].astype(bool)]
            planted_counts = {str(int(c)): int((c_pl == c).sum()) for c in np.unique(c_pl)}
        thr_rows, cal_auto = resolve_thresholds(adapter.spec.name, adapter.identity, measures, prefixes, ctx.store)
        meta = {
            "measures": measures, "skipped_measures": skipped, "prefix_tokens": prefixes,
            "thresholds": thr_rows, "calibrated_measure": cal_auto,
            "similarity": resolve_similarity(cfg.similarity, measures, cal_auto),
            "planted_counts_in_data": planted_counts, "model": adapter.describe(),
        }

        def partial_state(j: int) -> tuple[dict, dict]:
            """The finished rows (items [0, j)) and what resuming needs; meta_json serves the live gallery."""
            part = {k: v[: j * P] for k, v in rows.items()}
            part["recon_IHW3"] = recon_IHW3[:j]
            part["meta_json"] = np.array([json.dumps(store_mod.to_jsonable({**meta, "partial": True}, "meta",
                                                                           allow_nan=True))])
            return part, {"n_items": j, "n_rows": j * P, "batch_size": bs_now[0], "oom_events": events}

        # -- 3. generation, batched over items, every prefix per batch; rows are written once a batch succeeded
        gen_kw = _gen_kwargs(adapter, cfg)
        ckpt = _Checkpointer(ctx)
        t_gen0 = time.perf_counter()

        def work(i: int, j: int) -> None:
            ctx.check()
            bs_now[0] = j - i
            x, y = plan.batch(i, j, adapter.image_size)
            true_BN, recon, results = attack_batch(adapter, x, y, prefixes, measures, gen_kw,
                                                   seed=cfg.seed + 1_000_003 * i, edit=edit, sscd_path=sscd_path)
            recon_IHW3[i:j] = _to_uint8(recon, side)
            for pi, (gen_BN, img, sims) in enumerate(results):
                r = np.arange(i, j) * P + pi
                rows["gen_tokens_RN"][r] = gen_BN.cpu().numpy()
                rows["true_tokens_RN"][r] = true_BN.cpu().numpy()
                rows["generated_RHW3"][r] = _to_uint8(img, side)
                for m, sc in sims.items():
                    rows[f"sim_{m}"][r] = sc
            ctx.progress(0.1 + 0.9 * j / I, f"attacked {j}/{I} images x {P} prefix(es)")
            if j < I:
                ckpt.maybe(lambda: partial_state(j))

        adaptive_batches(I, bs_now[0], work, start=start, events=events, what="generation batch")
        t_gen = time.perf_counter() - t_gen0
        meta.update({
            "config": cfg.to_dict(), "data": data.data_fingerprint(image_set),
            "heldout_data": data.data_fingerprint(heldout_set) if heldout_set is not None else None,
            "edit": edit.to_dict() if edit is not None else None,
            "edit_applies_to": "generation only (candidates are scored with the unedited model)",
            "sscd_file": str(sscd_path) if sscd_path is not None else None,
            "score": {"definition": "teacher-forced top-1 accuracy, true class, no CFG",
                      "group": plan.score_meta["score_group"], "source": plan.score_meta["source"]},
            "generation": {**gen_kw, "kv_cache": True, "greedy": cfg.top_k == 1,
                           "seed_rule": "seed + 1000003 * first item of the batch + prefix (sampling only)"},
            "compared_with": "the tokenizer's reconstruction decode(tokenize(x)) of the candidate",
            "decision": "similarity strictly above the threshold",
            "oom_events": events, "n_items": I,
            "timings": {"scoring_s": round(t_score, 3), "generation_s": round(t_gen, 3),
                        "items_per_s": round((I - start) / t_gen, 3) if t_gen > 0 and I > start else None,
                        "resumed_at_item": int(start)},
        })
        return {**rows, "recon_IHW3": recon_IHW3}, meta

    return fn


def job_spec(adapter: IARAdapter, image_set: data.ImageSet, cfg: ExtractionConfig, edit: UnitEdit | None,
             heldout_set: data.ImageSet | None, sscd_path) -> dict:
    """Everything that determines the stored table (the decision measure and threshold are left out)."""
    from iarmem_core import checkpoints

    sscd = None
    if sscd_path is not None:
        p = Path(sscd_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"SSCD file {p} not found: give the path of sscd_disc_mixup.torchscript.pt")
        sscd = f"{p.name}:{checkpoints.file_fingerprint(p)}"
    return {"model": adapter.identity, "dtype": str(adapter.dtype), "data": data.data_fingerprint(image_set),
            "heldout": data.data_fingerprint(heldout_set) if heldout_set is not None else None,
            "config": cfg.job_dict(), "edit": edit.to_dict() if edit is not None and edit.n_units else None,
            "sscd": sscd}


def _prepare(adapter, image_set, cfg, edit, heldout_set, store):
    st = store if store is not None else store_mod.get_store()
    cfg = cfg or ExtractionConfig()
    if heldout_set is None and cfg.heldout and _is_demo_set(image_set):
        heldout_set, _ = demo_heldout_sets(cfg.heldout_n, cfg.seed)
    if not cfg.heldout:
        heldout_set = None
    if edit is not None and edit.n_units == 0:
        edit = None
    return st, cfg, edit, heldout_set


def run_extraction(adapter: IARAdapter, image_set: data.ImageSet, cfg: ExtractionConfig | None = None, *,
                   store=None, edit: UnitEdit | None = None, heldout_set: data.ImageSet | None = None,
                   sscd_path=None, on_progress=None, force: bool = False) -> ExtractionResult:
    """Run (or load from the store) the attack; the result's decision follows `cfg.similarity`/`threshold`.

    On the demo data the held-out images default to `demo_heldout_sets(cfg.heldout_n, cfg.seed)[0]`; for
    other data pass `heldout_set` (e.g. ImageNet validation images) to get a false rate.
    """
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    spec = job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path)
    fn = _job_fn(adapter, image_set, heldout_set, cfg, edit, sscd_path)
    arrays, meta = jobs.run_job(KIND, spec, fn, store=st, version=VERSION, force=force, on_progress=on_progress)
    meta = dict(meta)
    meta["store_key"] = st.key(KIND, spec, VERSION)
    return finalize(ExtractionResult(arrays, meta), st, cfg.similarity, cfg.threshold)


def start_extraction(adapter: IARAdapter, image_set: data.ImageSet, cfg: ExtractionConfig | None = None, *,
                     store=None, edit: UnitEdit | None = None, heldout_set: data.ImageSet | None = None,
                     sscd_path=None, on_progress=None, force: bool = False) -> jobs.JobHandle:
    """Start the attack as a background job; `load_extraction(store, handle.key)` once done,
    `load_partial_extraction(store, handle.key)` while it runs."""
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    spec = job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path)
    fn = _job_fn(adapter, image_set, heldout_set, cfg, edit, sscd_path)
    return jobs.start_job(KIND, spec, fn, store=st, version=VERSION, force=force, on_progress=on_progress)


def extraction_key(adapter: IARAdapter, image_set: data.ImageSet, cfg: ExtractionConfig | None = None, *,
                   store=None, edit: UnitEdit | None = None, heldout_set=None, sscd_path=None) -> str:
    """The store key `run_extraction` would use (to look a result up without running anything)."""
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    return st.key(KIND, job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path), VERSION)


def finalize(res: ExtractionResult, store, similarity: str | None = None,
             threshold: float | None = None) -> ExtractionResult:
    """Re-resolve the thresholds (a calibration saved after the run applies too) and set the decision.

    `similarity` None keeps the result's measure ("auto" re-resolves it); `threshold` None keeps the
    calibrated / published thresholds per prefix, a number replaces them for the decision measure.
    """
    meta = dict(res.meta)
    model = meta.get("model") or {}
    rows, auto = resolve_thresholds(model.get("name", ""), model.get("weights", {}), meta["measures"],
                                    meta["prefix_tokens"], store)
    meta["thresholds"], meta["calibrated_measure"] = rows, auto
    sim = similarity if similarity is not None else meta.get("similarity", "auto")
    meta["similarity"] = resolve_similarity(canonical_measure(sim), meta["measures"], auto)
    out = ExtractionResult(res.arrays, meta)
    if threshold is not None:
        out = out.with_decision(threshold=threshold)
    out.meta["threshold"] = out.thresholds()[meta["prefix_tokens"][0]]  # the decision's, at the first prefix
    return out


# ---------------------------------------------------------------------------------------------------
# 6. Threshold calibration on held-out images
def calibrate(adapter: IARAdapter, calibration_set: data.ImageSet, cfg: ExtractionConfig | None = None, *,
              store=None, max_false_rate: float = DEFAULT_MAX_FALSE_RATE, planted_set: data.ImageSet | None = None,
              sscd_path=None, on_progress=None, force: bool = False) -> dict:
    """Calibrate every offline measure's threshold per prefix on held-out images; stored for this model.

    The attack runs on every image of `calibration_set` (held-out: never trained on) with `cfg`'s prefixes;
    the threshold of each (measure, prefix) is the lowest one that at most `max_false_rate` of those
    generations exceed. With `planted_set` (known training copies, e.g. the demo's planted images) the true
    rate at that threshold is reported too, and the measure with the highest true rate at the default prefix
    becomes the model's `auto` measure. Returns {"key", "thresholds", "measure", "how", "table"}.
    """
    from iarmem_core.metrics import calibrate_threshold

    st = store if store is not None else store_mod.get_store()
    cfg = replace(cfg or ExtractionConfig(), candidate_ids=tuple(calibration_set.ids), heldout=False, threshold=None)
    neg = run_extraction(adapter, calibration_set, cfg, store=st, sscd_path=sscd_path, on_progress=on_progress,
                         force=force)
    pos = None
    if planted_set is not None:
        pos = run_extraction(adapter, planted_set, replace(cfg, candidate_ids=tuple(planted_set.ids)), store=st,
                             sscd_path=sscd_path, force=force)
    thresholds, table = {}, []
    for m in neg.meta["measures"]:
        if m == "sscd":
            continue  # SSCD keeps its published threshold
        for p in neg.meta["prefix_tokens"]:
            s_neg = neg.arrays[f"sim_{m}"][neg.arrays["prefix_tokens"] == p]
            s_pos = pos.arrays[f"sim_{m}"][pos.arrays["prefix_tokens"] == p] if pos is not None else np.zeros(0)
            c = calibrate_threshold(torch.from_numpy(s_pos.astype(np.float64)),
                                    torch.from_numpy(s_neg.astype(np.float64)), max_false_rate)
            thresholds.setdefault(m, {})[str(p)] = c.threshold
            table.append({"measure": m, "prefix_tokens": int(p), **c.to_dict()})
    p0 = str(neg.meta["prefix_tokens"][0])
    def rank_key(r: dict) -> tuple:
        tr = r["true_rate"] if not math.isnan(r["true_rate"]) else -1.0
        return (-tr, r["measure"] != "token_match")  # ties go to token_match (model-agnostic)

    ranked = sorted((r for r in table if str(r["prefix_tokens"]) == p0), key=rank_key)
    measure = ranked[0]["measure"] if ranked and pos is not None else "token_match"
    if max_false_rate == 0:
        how = (f"the highest score of {len(calibration_set)} held-out images ({calibration_set.name}) attacked "
               f"with the same prefix")
    else:
        how = (f"lowest threshold exceeded by at most {max_false_rate:.1%} of {len(calibration_set)} held-out "
               f"images ({calibration_set.name}) attacked with the same prefix")
    spec = {"model": adapter.identity, "negatives": neg.meta["store_key"],
            "positives": pos.meta["store_key"] if pos is not None else None, "max_false_rate": max_false_rate}
    meta = {"thresholds": thresholds, "measure": measure, "how": how, "table": table,
            "model_name": adapter.spec.name, "weights": adapter.identity.get("transformer")}
    key = st.key(CALIBRATION_KIND, spec, VERSION)
    st.save(key, {"thresholds_flat": np.array([r["threshold"] for r in table], np.float64)}, meta,
            kind=CALIBRATION_KIND, spec=spec, version=VERSION)
    return {"key": key, **meta}


# ---------------------------------------------------------------------------------------------------
# 7. CLI: python -m iarmem_core extract ...
def add_arguments(p) -> None:
    """Options of `python -m iarmem_core extract`."""
    from iarmem_core import cli

    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_output_args(p)
    p.add_argument("--candidates-per-class", type=int, default=5, help="top-k images per class by score")
    p.add_argument("--ids", help="explicit candidate image ids, comma separated (instead of top-k per class)")
    p.add_argument("--prefix", help="prefix lengths in tokens, comma separated (VAR: whole scales); "
                                    "default: the paper's (VAR 4 scales; next-token 30/256 of the tokens)")
    p.add_argument("--similarity", default="auto", help="auto, sscd, token_match, ssim, feature_cosine")
    p.add_argument("--threshold", type=float, help="decision threshold (default: calibrated / published)")
    p.add_argument("--sscd", help="path of sscd_disc_mixup.torchscript.pt (SSCD similarity, threshold 0.75)")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance (default 0: none)")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy (the attack's default)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="candidates per batch (halved on out-of-memory)")
    p.add_argument("--no-heldout", action="store_true", help="do not attack held-out images")
    p.add_argument("--heldout-n", type=int, default=200, help="demo: held-out images attacked (false rate)")
    p.add_argument("--heldout-data", help="folder data: an ImageFolder of held-out images (e.g. ImageNet val)")
    p.add_argument("--gallery-size", type=int, default=128, help="stored images are at most this many px")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the offline thresholds on held-out images (demo: those not in the "
                        "evaluation sample) and store them for this model")
    p.add_argument("--max-false-rate", type=float, default=DEFAULT_MAX_FALSE_RATE)


def run_cli(args) -> int:
    """`python -m iarmem_core extract`: prints the counts (one JSON object with --json)."""
    from iarmem_core import cli

    model = cli.load_model(args)
    image_set = cli.load_data(args, model.image_size)
    st = cli.get_store(args)
    cfg = ExtractionConfig(
        candidates_per_class=args.candidates_per_class,
        candidate_ids=tuple(i.strip() for i in args.ids.split(",") if i.strip()) if args.ids else None,
        prefix_tokens=tuple(int(v) for v in args.prefix.split(",")) if args.prefix else None,
        similarity=args.similarity, threshold=args.threshold, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, batch_size=args.batch_size, heldout=not args.no_heldout, seed=args.seed,
        heldout_n=args.heldout_n, gallery_size=args.gallery_size)
    heldout = None
    if args.heldout_data:
        from iarmem_core import data as data_mod

        heldout = data_mod.load_image_folder(args.heldout_data, model.image_size, count=args.heldout_n,
                                             seed=args.seed)
    if args.calibrate:
        if args.data == "demo":
            _, calib = demo_heldout_sets(cfg.heldout_n, cfg.seed)
            planted = data.load_demo("planted")
        elif heldout is not None:
            calib, planted = heldout, None
        else:
            raise ValueError("--calibrate on folder data needs --heldout-data (images the model never saw)")
        out = calibrate(model, calib, cfg, store=st, max_false_rate=args.max_false_rate, planted_set=planted,
                        sscd_path=args.sscd, on_progress=cli.progress_printer("calibrate"), force=args.force)
        out["calibration_images"] = len(calib)
        cli.emit(out, args.json)
        return 0
    res = run_extraction(model, image_set, cfg, store=st, heldout_set=heldout, sscd_path=args.sscd,
                         on_progress=cli.progress_printer("extract"), force=args.force)
    cli.emit(res.summary(), args.json)
    return 0
