"""Interventions (METHOD.md sections 5 and 6): edit the most memorizing units, measure privacy vs quality.

- Unit selection (`select_units`): the top k% of units by UnitMem. A unit has one UnitMem per group; its
  score is its max over the groups the attack generates (``combine="generated"``, the default: VAR the
  scales after the prefix, next-token models the grid rows after it), its max over every scale
  (``combine="max"``, the paper's choice), or its score at one scale. Ranking
  ``global`` (the k% best units of the whole model, the default), ``per_block`` (k% of every block) or
  ``per_group`` (k% in total, taken in turn from each group's own ranking: VAR scales; next-token
  models the grid rows of a pass that has them). `random_control` draws the same number of units in
  every block, uniformly and seeded: the control a careful researcher always runs. One draw is one
  sample of a random distribution (on the demo, single draws of the same size left 16 to 18 of 18 images
  extracted), so the control is drawn several times (`random_draws`; 10 on demo and test models) and the
  ranked edit is compared with all draws (`random_draw_stats`: mean, range, one-sided p-value).
- Edits (`make_edit`): a `hooks.UnitEdit` value, fc1 weight rows times a factor (paper: 0.5, biases
  unchanged), zeroing, or scaling the unit's output; optionally only one half of a CFG batch. Edits are
  applied with `hooks.edit(model, spec)`, a scoped context of this thread only: a shared model object is
  never modified (not even briefly), also with other sessions running or an exception inside.
- Quality (`quality`): Frechet distance between samples and real reference images in a named feature
  space (the bundled ``demo-fashion-cnn`` offline, or Inception from the user's TorchScript file
  ``inception-2015-12-05.pt``: real FID), and the class accuracy of the samples by the bundled classifier
  (demo and test models). Samples use the model's published sampling settings (registry ``sampling``).
- `run_intervention`: extraction and quality before the edit, after it, and for the random control;
  `run_sweep`: the trade-off curve over k (default 0, 1, 5, 10, 20%) for UnitMem-ranked and random units,
  a table and a job in the store. Every extraction and quality number is its own stored job, so a sweep
  that is interrupted resumes where it stopped and shares the unedited numbers with every other run.

Example:
    >>> units = select_units(unitmem_result, top_percent=10)            # {block: (unit, ...)}
    >>> edit = make_edit(units, factor=0.5)
    >>> before, after = sample_pair(adapter, [0, 1, 2, 3], edit, seed=0)
    >>> out = run_intervention(adapter, unitmem_result, data.select_demo(500), top_percent=10)
    >>> out.extracted_before, out.extracted_after, out.random_control.extracted_after_mean
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from iarmem_core import data, extraction, hooks, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.hooks import UnitEdit

QUALITY_KIND = "quality"
SWEEP_KIND = "intervention-sweep"
QUALITY_VERSION = "1"  # the quality job's code version (part of its store key)
SWEEP_VERSION = "2"  # 2: random-control draws in every row
RANKINGS = ("global", "per_block", "per_group")
DEFAULT_TOP_PERCENTS = (0, 1, 5, 10, 20)
# the paper's edit, and what the CLI and the app start from
DEFAULT_TOP_PERCENT = 10.0
DEFAULT_FACTOR = 0.5
DEFAULT_OP = "fc1_scale"
DEFAULT_RANKING = "global"
DEFAULT_COMBINE = "generated"  # each unit's max over the groups the attack generates; "max": over all scales
DEFAULT_N_SAMPLES = 1000  # samples for FD and class accuracy
SAMPLING_KEYS = ("cfg", "top_k", "top_p", "temperature")
FAMILY_SAMPLING_KEYS = {"rar": ("cfg_power",), "llamagen": ("cfg_interval",), "var": ()}
N_KEEP_SAMPLES = 16  # samples kept with a quality result (a glimpse; sample_pair makes more in-process)


# ---------------------------------------------------------------------------------------------------
# 1. Unit selection
def _rank_groups(unitmem_result) -> list[int]:
    """Groups `per_group` ranks within: the groups the attack generates (VAR: the scales after the prefix;
    next-token: the grid rows after the prefix, when the pass has them)."""
    return unitmem_result.generated_group_ids()


def n_selected(top_percent: float, n_total: int) -> int:
    """round(top_percent% of n_total), at least 1 unit for any positive percentage."""
    if not 0 <= top_percent <= 100:
        raise ValueError(f"top_percent must lie in [0, 100], got {top_percent}")
    if top_percent == 0:
        return 0
    return max(1, int(round(top_percent / 100.0 * n_total)))


def _exclude_mask(exclude, blocks: Sequence[int], n_units: int) -> np.ndarray:
    mask = np.zeros((len(blocks), n_units), bool)
    if exclude is None:
        return mask
    pos = {b: i for i, b in enumerate(blocks)}
    pairs = ((b, u) for b, us in exclude.items() for u in us) if isinstance(exclude, Mapping) else exclude
    for b, u in pairs:
        mask[pos[int(b)], int(u)] = True
    return mask


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by the lower index (deterministic)."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:k]


def select_units(
    unitmem_result, top_percent: float, ranking: str = "global", combine: str | int = DEFAULT_COMBINE, exclude=None
) -> dict[int, tuple[int, ...]]:
    """{block: units} of the top `top_percent`% units by UnitMem (see the module docstring for the options).

    `exclude`: (block, unit) pairs or a {block: units} dict that are never selected.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    blocks = [int(b) for b in unitmem_result.meta["blocks"]]
    um_LGU = np.asarray(unitmem_result.unitmem, dtype=np.float64)
    L, _, U = um_LGU.shape
    excl = _exclude_mask(exclude, blocks, U)
    chosen = np.zeros((L, U), bool)
    if ranking == "global":
        s = np.where(excl, -np.inf, unitmem_result.unit_scores(combine)).reshape(-1)
        chosen.reshape(-1)[_top(s, n_selected(top_percent, L * U))] = True
    elif ranking == "per_block":
        s = np.where(excl, -np.inf, unitmem_result.unit_scores(combine))
        k = n_selected(top_percent, U)
        for li in range(L):
            chosen[li, _top(s[li], k)] = True
    else:  # per_group: round-robin over the groups' own rankings until k% of all units are chosen
        n = min(n_selected(top_percent, L * U), int((~excl).sum()))
        blocked = excl.reshape(-1)
        orders = [
            _top(np.where(excl, -np.inf, um_LGU[:, g, :]).reshape(-1), L * U) for g in _rank_groups(unitmem_result)
        ]
        ptr, flat = [0] * len(orders), chosen.reshape(-1)
        while flat.sum() < n:
            for gi, order in enumerate(orders):
                while ptr[gi] < order.size and (flat[order[ptr[gi]]] or blocked[order[ptr[gi]]]):
                    ptr[gi] += 1
                if ptr[gi] < order.size and flat.sum() < n:
                    flat[order[ptr[gi]]] = True
    chosen &= ~excl
    return {blocks[li]: tuple(int(u) for u in np.flatnonzero(chosen[li])) for li in range(L) if chosen[li].any()}


def units_from_pairs(pairs: Iterable[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """An explicit list of (block, unit) -> {block: units}."""
    out: dict[int, set[int]] = {}
    for b, u in pairs:
        out.setdefault(int(b), set()).add(int(u))
    return {b: tuple(sorted(us)) for b, us in sorted(out.items())}


def random_control(
    units: Mapping[int, Sequence[int]], n_units_per_block: int, seed: int = 0, disjoint: bool = False
) -> dict[int, tuple[int, ...]]:
    """The same number of units in every block, drawn uniformly (seeded per block); `disjoint` avoids `units`."""
    out = {}
    for b, us in sorted(units.items()):
        k = len(set(us))
        pool = np.setdiff1d(np.arange(n_units_per_block), list(us)) if disjoint else np.arange(n_units_per_block)
        if k > pool.size:
            raise ValueError(f"block {b}: {k} random units asked for, only {pool.size} available")
        rng = np.random.default_rng([int(seed), int(b)])
        if k:
            out[int(b)] = tuple(sorted(int(u) for u in rng.choice(pool, size=k, replace=False)))
    return out


def default_random_draws(adapter: IARAdapter, requested: int | None = None) -> int:
    """Random-control draws: `requested`, or when None 10 on demo and test models (one extraction run takes
    seconds there) and 1 on released models (every draw is one more full extraction run)."""
    if requested is not None:
        return int(requested)
    return 10 if adapter.spec.kind in ("demo", "test") else 1


def random_draw_stats(ranked_after: int, draws_after: Sequence[int]) -> dict:
    """How the ranked edit's extraction count compares with `draws_after`, the counts after random draws.

    p_value = (1 + #draws that left at most as many images extracted) / (draws + 1): the chance, if the ranking
    were no better than random units, that a random draw removes at least as much (one-sided, exact for
    exchangeable draws; its smallest value is 1 / (draws + 1), so 10 draws can show p = 0.09 at best).
    """
    d = np.asarray(list(draws_after), dtype=np.int64)
    if d.size == 0:
        raise ValueError("random_draw_stats needs at least one random draw")
    return {
        "draws": int(d.size),
        "extracted_after_draws": [int(v) for v in d],
        "extracted_after_mean": float(d.mean()),
        "extracted_after_min": int(d.min()),
        "extracted_after_max": int(d.max()),
        "p_value": float((1 + (d <= ranked_after).sum()) / (d.size + 1)),
    }


@torch.no_grad()
def target_selectivity(
    adapter: IARAdapter, image_set: data.ImageSet, target_N: Sequence[bool], batch_size: int = 32
) -> np.ndarray:
    """[L, U] how much more each unit fires for the target images than for the rest: (m_t - m_r) / (m_t + m_r).

    m = the mean over images of the unit's mean |activation| over all token positions, teacher-forced, one
    view per image. This is a diagnostic that needs ground truth (the demo's planted images): the units an
    oracle would edit. If editing even these barely changes extraction, the memorization is spread over many
    units in this model, and no ranking of single units can remove it with a small edit.
    """
    target = np.asarray(target_N, dtype=bool)
    if target.shape != (len(image_set),) or not target.any() or target.all():
        raise ValueError(f"target_N must mark some but not all of the {len(image_set)} images")
    blocks = [s.block for s in adapter.unit_sites()]
    pos = {b: i for i, b in enumerate(blocks)}
    sum_t = torch.zeros(len(blocks), adapter.unit_sites()[0].n_units, dtype=torch.float64)
    sum_r = torch.zeros_like(sum_t)
    for s in range(0, len(image_set), batch_size):
        idx = list(range(s, min(len(image_set), s + batch_size)))
        t_B = torch.as_tensor(target[idx])
        tokens = adapter.tokenize(image_set.images(idx, adapter.image_size).to(adapter.device))

        def on_units(block: int, acts_BTU: torch.Tensor, info, t_B=t_B) -> None:
            m_BU = acts_BTU.abs().mean(1).double().cpu()
            sum_t[pos[block]] += m_BU[t_B].sum(0)
            sum_r[pos[block]] += m_BU[~t_B].sum(0)

        with hooks.capture(adapter.transformer, on_units):
            adapter.teacher_forced_logits(tokens, image_set.labels_tensor(idx).to(adapter.device))
    m_t, m_r = sum_t / target.sum(), sum_r / (~target).sum()
    den = m_t + m_r
    return torch.where(den > 0, (m_t - m_r) / torch.where(den > 0, den, 1.0), 0.0).float().numpy()


def top_units(scores_LU: np.ndarray, top_percent: float, blocks: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """{block: units} of the top `top_percent`% of all units by an [L, U] score (global ranking)."""
    L, U = scores_LU.shape
    flat = _top(np.asarray(scores_LU, dtype=np.float64).reshape(-1), n_selected(top_percent, L * U))
    return units_from_pairs((int(blocks[i // U]), int(i % U)) for i in flat)


def make_edit(
    units: Mapping[int, Sequence[int]], op: str = "fc1_scale", factor: float = 0.5, cfg_half: str = "both"
) -> UnitEdit:
    """The edit value for `hooks.edit`: fc1 rows x factor (paper), "zero", or "out_scale"."""
    return UnitEdit(units={int(b): tuple(u) for b, u in units.items()}, op=op, factor=float(factor), cfg_half=cfg_half)


# ---------------------------------------------------------------------------------------------------
# 2. Samples
def sampling_kwargs(adapter: IARAdapter, overrides: Mapping | None = None) -> dict:
    """generate() keywords for quality samples: the registry's published settings, then `overrides`.

    Unset fields mean plain sampling (top_k 0, top_p 0, temperature 1, no CFG), never greedy.
    """
    kw = {"cfg": 0.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0}
    allowed = SAMPLING_KEYS + FAMILY_SAMPLING_KEYS.get(adapter.family, ())
    for src in (adapter.spec.sampling or {}, overrides or {}):
        for k, v in src.items():
            if k in allowed:
                kw[k] = v
            elif src is overrides:
                raise ValueError(f"unknown sampling option {k!r} for {adapter.family}: expected {allowed}")
    return kw


@torch.no_grad()
def generate_images(
    adapter: IARAdapter,
    labels: Sequence[int] | torch.Tensor,
    edit: UnitEdit | None = None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    sampling: Mapping | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    oom_events: list | None = None,
) -> torch.Tensor:
    """Class-conditional samples [B, 3, H, W] in [0, 1] (CPU), batched; batch b is seeded seed + its start.

    The edit (None: the unedited model) applies inside `hooks.edit`, in this thread only.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    kw = sampling_kwargs(adapter, sampling)
    out = torch.zeros(labels.shape[0], 3, adapter.image_size, adapter.image_size)

    def work(i: int, j: int) -> None:
        with hooks.edit(adapter.transformer, edit):
            toks = adapter.generate(labels[i:j], seed=seed + i, kv_cache=True, **kw)
        out[i:j] = adapter.decode(toks).float().cpu()
        if on_batch is not None:
            on_batch(i, j)

    jobs.run_batches(None, labels.shape[0], batch_size, work, events=oom_events, what="sampling batch")
    return out


def sample_pair(
    adapter: IARAdapter, labels: Sequence[int] | torch.Tensor, edit: UnitEdit | None, *, seed: int = 0, **sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """(before_B3HW, after_B3HW): the same labels and seed without and with the edit (quick, in-process)."""
    before = generate_images(adapter, labels, None, seed=seed, sampling=sampling)
    after = generate_images(adapter, labels, edit, seed=seed, sampling=sampling)
    return before, after


# ---------------------------------------------------------------------------------------------------
# 3. Quality
_REF_CACHE: dict[tuple, torch.Tensor] = {}


def _space(feature_space, adapter: IARAdapter):
    """A FeatureSpace from an instance, a name, a path of inception-2015-12-05.pt, or None (the default)."""
    from iarmem_core import metrics

    if isinstance(feature_space, metrics.FeatureSpace):
        return feature_space
    if feature_space is None or feature_space == metrics.FEATURE_SPACE_NAME:
        if feature_space is None and adapter.spec.kind == "released":
            raise ValueError(
                f"{adapter.spec.name}: quality needs Inception for FID; give feature_space = the "
                f"path of {metrics.spaces.INCEPTION_FILE} (the demo feature space is a "
                f"Fashion-MNIST CNN and would say nothing about ImageNet samples)"
            )
        return metrics.resolve_space(None)
    if isinstance(feature_space, str) and feature_space in metrics.FEATURE_SPACES:
        raise ValueError(f"feature space {feature_space!r} needs its weights file: pass the file's path")
    return metrics.resolve_space("inception", feature_space)


def _classifier(adapter: IARAdapter, space):
    """The bundled classifier (demo / test models only), or None."""
    if adapter.spec.kind == "released":
        return None
    from iarmem_core import metrics

    s = space if isinstance(space, metrics.DemoFeatureSpace) else extraction.measures.demo_space()
    return None if s is None else s.net


def default_reference_set(adapter: IARAdapter) -> data.ImageSet:
    """The demo's held-out images (1000, never trained on) for demo and test models."""
    if adapter.spec.kind == "released":
        raise ValueError(
            f"{adapter.spec.name}: give reference_set, real images of the model's data (e.g. an "
            f"ImageFolder of ImageNet validation images)"
        )
    return data.load_demo("heldout")


def reference_features(space, reference_set: data.ImageSet, size: int) -> torch.Tensor:
    """Features [M, D] of the reference images at the model's resolution (cached per process)."""
    key = (
        space.name,
        getattr(space, "path", None) and str(space.path),
        reference_set.ids_sha256(),
        str(data.data_fingerprint(reference_set)),
        size,
    )
    if key not in _REF_CACHE:
        feats = [space.features(x) for _, x, _ in reference_set.iter_batches(256, size=size)]
        _REF_CACHE[key] = torch.cat(feats)
    return _REF_CACHE[key]


def _quality_fn(adapter, edit, n_samples, feature_space, reference_set, seed, sampling, batch_size):
    def fn(ctx) -> tuple[dict, dict]:
        from iarmem_core import metrics

        t0 = time.perf_counter()
        space = _space(feature_space, adapter)
        labels = torch.arange(n_samples) % adapter.num_classes  # class-balanced
        events: list = []

        def on_batch(i: int, j: int) -> None:
            ctx.check()
            ctx.progress(0.9 * j / n_samples, f"sampling {j}/{n_samples}")

        samples = generate_images(
            adapter,
            labels,
            edit,
            seed=seed,
            batch_size=batch_size,
            sampling=sampling,
            on_batch=on_batch,
            oom_events=events,
        )
        t_gen = time.perf_counter() - t0
        ctx.progress(0.9, "features")
        ref = reference_features(space, reference_set, adapter.image_size)
        feats = space.features(samples)
        fd = metrics.frechet_result(space, feats, ref)
        clf = _classifier(adapter, space)
        acc = metrics.class_accuracy(clf, samples, labels) if clf is not None else None
        meta = {
            "fd": fd.value,
            "fd_metric": fd.metric,
            "feature_space": fd.feature_space,
            "comparable_to_published_fid": fd.comparable_to_published_fid,
            "class_acc": acc,
            "classifier": "bundled demo-fashion-cnn head" if acc is not None else None,
            "n_samples": int(n_samples),
            "n_reference": int(ref.shape[0]),
            "reference": reference_set.name,
            "sampling": sampling_kwargs(adapter, sampling),
            "seed": int(seed),
            "edit": edit.to_dict() if edit is not None else None,
            "oom_events": events,
            "timings": {"sampling_s": round(t_gen, 3), "total_s": round(time.perf_counter() - t0, 3)},
        }
        keep = samples[:N_KEEP_SAMPLES]
        arrays = {
            "samples_BHW3": (keep.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
            "sample_labels": labels[:N_KEEP_SAMPLES].numpy(),
        }
        return arrays, meta

    return fn


def _space_id(feature_space) -> str | None:
    from iarmem_core import checkpoints, metrics

    if feature_space is None or isinstance(feature_space, str) and feature_space == metrics.FEATURE_SPACE_NAME:
        return metrics.FEATURE_SPACE_NAME
    if isinstance(feature_space, metrics.FeatureSpace):
        p = getattr(feature_space, "path", None)
        return f"{feature_space.name}:{checkpoints.file_fingerprint(p)}" if p else feature_space.name
    return f"inception:{checkpoints.file_fingerprint(feature_space)}"


def quality(
    adapter: IARAdapter,
    edit: UnitEdit | None = None,
    *,
    n_samples: int = 1000,
    feature_space=None,
    reference_set: data.ImageSet | None = None,
    seed: int = 0,
    sampling: Mapping | None = None,
    batch_size: int = 64,
    store=None,
    on_progress=None,
    force: bool = False,
) -> dict:
    """{"fd", "fd_metric", "class_acc", "feature_space", "n_samples", ...} of class-balanced samples.

    `feature_space`: None / "demo-fashion-cnn" (bundled), a FeatureSpace, or the path of NVIDIA's
    TorchScript ``inception-2015-12-05.pt`` (real FID; no other format is accepted). `reference_set`:
    real images (default: the demo's held-out split). With a `store` the result is a job in it (kind
    ``quality``), cached by everything that determines it.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a covariance, got {n_samples}")
    ref = reference_set if reference_set is not None else default_reference_set(adapter)
    edit = edit if edit is not None and edit.n_units else None
    fn = _quality_fn(adapter, edit, n_samples, feature_space, ref, seed, sampling, batch_size)
    if store is None:

        class _Ctx:  # in-process run without a store: no checkpoints, no cancel
            resume_state = None

            def check(self):
                return None

            def progress(self, f, m=""):
                if on_progress is not None:
                    on_progress(f, m)

        arrays, meta = fn(_Ctx())
        return dict(meta)
    spec = {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "edit": edit.to_dict() if edit else None,
        "n_samples": int(n_samples),
        "feature_space": _space_id(feature_space),
        "reference": data.data_fingerprint(ref),
        "seed": int(seed),
        "sampling": sampling_kwargs(adapter, sampling),
    }
    _, meta = jobs.run_job(
        QUALITY_KIND, spec, fn, store=store, version=QUALITY_VERSION, force=force, on_progress=on_progress
    )
    return {**meta, "store_key": store.key(QUALITY_KIND, spec, QUALITY_VERSION)}


# ---------------------------------------------------------------------------------------------------
# 4. One intervention, and the sweep
@dataclass
class RandomControl:
    """The random-units control of one edit: the same number of units in every block, edited the same way,
    drawn `draws` times (seeds seed, seed + 1, ...). Quality is measured for the first draw only."""

    extracted_after: int  # of the first draw
    fd_after: float | None
    class_acc_after: float | None
    extracted_planted_after: int | None
    recall_planted_max_count_after: float | None
    n_units: int
    seed: int
    edit: dict
    draws: int
    extracted_after_draws: list[int]
    extracted_after_mean: float
    extracted_after_min: int
    extracted_after_max: int
    p_value: float  # one-sided, see random_draw_stats
    draw_seeds: list[int]
    store_keys: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InterventionResult:
    """Extraction and quality before and after one edit, with its random control and how each number was
    computed (similarity and threshold, feature space, sample count, store keys). `to_dict()` is the CLI's JSON."""

    extracted_before: int
    extracted_after: int
    fd_before: float | None
    fd_after: float | None
    class_acc_before: float | None
    class_acc_after: float | None
    recall_planted_max_count_before: float | None
    recall_planted_max_count_after: float | None
    extracted_planted_before: int | None
    extracted_planted_after: int | None
    heldout_false_rate_before: float | None
    candidates: int
    similarity: str
    threshold: float
    fd_metric: str
    feature_space: str
    n_samples: int
    n_units: int
    units_per_block: dict[str, int]
    top_percent: float | None
    factor: float
    op: str
    ranking: str
    combine: str | int
    cfg_half: str
    edit: dict
    store_keys: dict
    random_control: RandomControl | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["random_control"] = self.random_control.to_dict() if self.random_control is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InterventionResult:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rc = d.get("random_control")
        rnames = {f.name for f in fields(RandomControl)}
        kw["random_control"] = RandomControl(**{k: v for k, v in rc.items() if k in rnames}) if rc else None
        return cls(**kw)


def _counts(res: extraction.ExtractionResult, similarity: str, threshold: float | None) -> dict:
    c = res.count(threshold=threshold, similarity=similarity)
    return {
        "extracted": c["extracted"],
        "extracted_planted": c.get("extracted_planted"),
        "recall_planted": c["recall_planted"],
        "recall_planted_max_count": c["recall_planted_max_count"],
        "precision_planted": c["precision_planted"],
        "candidates": c["candidates"],
        "threshold": c["threshold"],
    }


def run_intervention(
    adapter: IARAdapter,
    unitmem_result,
    image_set: data.ImageSet,
    *,
    top_percent: float,
    factor: float = 0.5,
    op: str = "fc1_scale",
    ranking: str = "global",
    extraction_cfg: extraction.ExtractionConfig | None = None,
    store=None,
    on_progress=None,
    combine: str | int = DEFAULT_COMBINE,
    cfg_half: str = "both",
    units: Mapping | None = None,
    n_samples: int = 1000,
    feature_space=None,
    reference_set=None,
    sampling=None,
    seed: int = 0,
    heldout_set=None,
    sscd_path=None,
    with_random: bool = True,
    random_draws: int | None = None,
) -> InterventionResult:
    """Extraction and quality before the edit, after it, and with random units of the same size and blocks.

    The random control (`RandomControl`) is drawn `random_draws` times (seeds seed, seed + 1, ...; default
    `default_random_draws`): extraction after each draw, its mean / min / max and the ranked edit's p_value
    (`random_draw_stats`); its FD and class accuracy are those of the first draw. `units` replaces the
    UnitMem selection with an explicit {block: units}. After the edit the same candidates are attacked
    (those of the unedited model); held-out images are attacked before the edit only.
    """
    st = store if store is not None else store_mod.get_store()
    ecfg = extraction_cfg or extraction.ExtractionConfig()
    draws = default_random_draws(adapter, random_draws)
    if with_random and draws < 1:
        raise ValueError(f"random_draws must be at least 1, got {draws}")
    sel = dict(units) if units is not None else select_units(unitmem_result, top_percent, ranking, combine)
    edit = make_edit(sel, op, factor, cfg_half)
    rnd = random_control(sel, adapter.n_units, seed=seed)
    redit = make_edit(rnd, op, factor, cfg_half)
    steps = 5 + draws if with_random else 4
    done = [0]

    def sub(what: str):
        def f(frac: float, msg: str) -> None:
            if on_progress is not None:
                on_progress((done[0] + frac) / steps, f"{what}: {msg}")

        return f

    def step(fn, what):
        out = fn(sub(what))
        done[0] += 1
        return out

    before = step(
        lambda p: extraction.run_extraction(
            adapter, image_set, ecfg, store=st, heldout_set=heldout_set, sscd_path=sscd_path, on_progress=p
        ),
        "extraction before",
    )
    after_cfg = replace(ecfg, heldout=False)
    sim, thr = before.similarity, ecfg.threshold
    qkw = dict(
        n_samples=n_samples,
        feature_space=feature_space,
        reference_set=reference_set,
        seed=seed,
        sampling=sampling,
        store=st,
    )
    after = step(
        lambda p: extraction.run_extraction(
            adapter, image_set, after_cfg, store=st, edit=edit, sscd_path=sscd_path, on_progress=p
        ),
        "extraction after",
    )
    q0 = step(lambda p: quality(adapter, None, on_progress=p, **qkw), "quality before")
    q1 = step(lambda p: quality(adapter, edit, on_progress=p, **qkw), "quality after")
    c0, c1 = _counts(before, sim, thr), _counts(after, sim, thr)
    out = InterventionResult(
        extracted_before=c0["extracted"],
        extracted_after=c1["extracted"],
        fd_before=q0["fd"],
        fd_after=q1["fd"],
        class_acc_before=q0["class_acc"],
        class_acc_after=q1["class_acc"],
        recall_planted_max_count_before=c0["recall_planted_max_count"],
        recall_planted_max_count_after=c1["recall_planted_max_count"],
        extracted_planted_before=c0["extracted_planted"],
        extracted_planted_after=c1["extracted_planted"],
        heldout_false_rate_before=before.count(similarity=sim, threshold=thr)["heldout_false_rate"],
        candidates=c0["candidates"],
        similarity=sim,
        threshold=c0["threshold"],
        fd_metric=q0["fd_metric"],
        feature_space=q0["feature_space"],
        n_samples=q0["n_samples"],
        n_units=edit.n_units,
        units_per_block={str(b): len(u) for b, u in sorted(sel.items())},
        top_percent=top_percent,
        factor=factor,
        op=op,
        ranking=ranking,
        combine=combine,
        cfg_half=cfg_half,
        edit=edit.to_dict(),
        store_keys={
            "extraction_before": before.meta["store_key"],
            "extraction_after": after.meta["store_key"],
            "quality_before": q0["store_key"],
            "quality_after": q1["store_key"],
            "unitmem": getattr(unitmem_result, "meta", {}).get("store_key") if unitmem_result else None,
        },
    )
    if with_random:
        runs = []  # draw i: random units of seed + i; draw 0 is `redit`, the only one whose quality is measured
        for i in range(draws):
            e_i = (
                redit
                if i == 0
                else make_edit(random_control(sel, adapter.n_units, seed=seed + i), op, factor, cfg_half)
            )
            runs.append(
                step(
                    lambda p, e_i=e_i: extraction.run_extraction(
                        adapter, image_set, after_cfg, store=st, edit=e_i, sscd_path=sscd_path, on_progress=p
                    ),
                    f"extraction random draw {i + 1}/{draws}",
                )
            )
        q2 = step(lambda p: quality(adapter, redit, on_progress=p, **qkw), "quality random")
        ra = runs[0]
        c2 = _counts(ra, sim, thr)
        counts = [c2["extracted"]] + [_counts(r, sim, thr)["extracted"] for r in runs[1:]]
        keys = [r.meta["store_key"] for r in runs]
        out.random_control = RandomControl(
            extracted_after=c2["extracted"],
            fd_after=q2["fd"],
            class_acc_after=q2["class_acc"],
            extracted_planted_after=c2["extracted_planted"],
            recall_planted_max_count_after=c2["recall_planted_max_count"],
            n_units=redit.n_units,
            seed=seed,
            edit=redit.to_dict(),
            **random_draw_stats(c1["extracted"], counts),
            draw_seeds=[seed + i for i in range(draws)],
            store_keys={"extraction": ra.meta["store_key"], "quality": q2["store_key"], "extraction_draws": keys},
        )
    return out


MEASURE_KIND = "intervention-app"  # one edit's numbers as a job (the app's "measure this edit")


def measurement_spec(
    adapter: IARAdapter,
    unitmem_result,
    image_set: data.ImageSet,
    *,
    top_percent: float | None,
    units: Mapping | None,
    factor: float,
    op: str,
    ranking: str,
    seed: int,
) -> dict:
    """Everything that determines `run_intervention` with the default extraction and quality settings."""
    return {
        "model": adapter.identity,
        "data": data.data_fingerprint(image_set),
        "unitmem": unitmem_result.meta.get("store_key"),
        "top_percent": top_percent,
        "units": None if units is None else {str(b): list(u) for b, u in sorted(units.items())},
        "factor": float(factor),
        "op": op,
        "ranking": ranking,
        "seed": int(seed),
        "random_draws": default_random_draws(adapter),
    }


def measurement_key(adapter: IARAdapter, unitmem_result, image_set: data.ImageSet, store=None, **edit) -> str:
    st = store if store is not None else store_mod.get_store()
    return st.key(MEASURE_KIND, measurement_spec(adapter, unitmem_result, image_set, **edit))


def start_measurement(
    adapter: IARAdapter,
    unitmem_result,
    image_set: data.ImageSet,
    store=None,
    *,
    top_percent: float | None,
    units: Mapping | None,
    factor: float,
    op: str,
    ranking: str,
    seed: int,
) -> jobs.JobHandle:
    """`run_intervention` for one edit (top-k% or explicit units) as a background job; the result's meta is
    `InterventionResult.to_dict()` (read it back with `load_measurement`)."""
    st = store if store is not None else store_mod.get_store()
    edit = dict(top_percent=top_percent, units=units, factor=factor, op=op, ranking=ranking, seed=seed)
    spec = measurement_spec(adapter, unitmem_result, image_set, **edit)

    def fn(ctx):
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        out = run_intervention(
            adapter,
            unitmem_result,
            image_set,
            top_percent=top_percent or 0.0,
            units=units,
            factor=factor,
            op=op,
            ranking=ranking,
            seed=seed,
            store=ctx.store,
            on_progress=progress,
        )
        return {}, out.to_dict()

    return jobs.start_job(MEASURE_KIND, spec, fn, store=st)


def measurement_from_meta(meta: Mapping) -> InterventionResult:
    """The InterventionResult stored by `start_measurement`."""
    return InterventionResult.from_dict(dict(meta))


def _sweep_rows(
    adapter,
    unitmem_result,
    image_set,
    top_percents,
    factor,
    op,
    ranking,
    combine,
    cfg_half,
    extraction_cfg,
    n_samples,
    feature_space,
    reference_set,
    sampling,
    seed,
    store,
    heldout_set,
    sscd_path,
    progress,
    random_draws=None,
) -> list[dict]:
    rows = []
    ks = list(top_percents)
    for i, k in enumerate(ks):

        def p(frac: float, msg: str, i=i, k=k) -> None:
            progress((i + frac) / len(ks), f"k={k}%: {msg}")

        r = run_intervention(
            adapter,
            unitmem_result,
            image_set,
            top_percent=k,
            factor=factor,
            op=op,
            ranking=ranking,
            combine=combine,
            cfg_half=cfg_half,
            extraction_cfg=extraction_cfg,
            n_samples=n_samples,
            feature_space=feature_space,
            reference_set=reference_set,
            sampling=sampling,
            seed=seed,
            store=store,
            heldout_set=heldout_set,
            sscd_path=sscd_path,
            with_random=k > 0,
            on_progress=p,
            random_draws=random_draws,
        )
        r = r.to_dict()
        rs = r.get("random_control") or {}
        common = {
            "top_percent": float(k),
            "n_units": r["n_units"],
            "similarity": r["similarity"],
            "threshold": r["threshold"],
            "fd_metric": r["fd_metric"],
            "n_samples": r["n_samples"],
            "extracted_before": r["extracted_before"],
            "fd_before": r["fd_before"],
            "random_draws": rs.get("draws", 0),
            "random_extracted_mean": rs.get("extracted_after_mean", r["extracted_after"]),
            "random_extracted_min": rs.get("extracted_after_min", r["extracted_after"]),
            "random_extracted_max": rs.get("extracted_after_max", r["extracted_after"]),
            "p_value": rs.get("p_value"),
        }
        rows.append(
            {
                **common,
                "selection": "unitmem",
                "extracted": r["extracted_after"],
                "extracted_planted": r["extracted_planted_after"],
                "recall_planted_max_count": r["recall_planted_max_count_after"],
                "fd": r["fd_after"],
                "class_acc": r["class_acc_after"],
            }
        )
        rc = r.get("random_control") or {
            "extracted_after": r["extracted_after"],
            "fd_after": r["fd_after"],
            "class_acc_after": r["class_acc_after"],
            "extracted_planted_after": r["extracted_planted_after"],
            "recall_planted_max_count_after": r["recall_planted_max_count_after"],
        }
        rows.append(
            {
                **common,
                "selection": "random",
                "extracted": rc["extracted_after"],
                "extracted_planted": rc["extracted_planted_after"],
                "recall_planted_max_count": rc["recall_planted_max_count_after"],
                "fd": rc["fd_after"],
                "class_acc": rc["class_acc_after"],
            }
        )
    return rows


def sweep_spec(
    adapter,
    unitmem_result,
    image_set,
    top_percents,
    factor,
    op,
    ranking,
    combine,
    cfg_half,
    extraction_cfg,
    n_samples,
    feature_space,
    reference_set,
    sampling,
    seed,
    heldout_set,
    sscd_path,
    random_draws=None,
) -> dict:
    ecfg = extraction_cfg or extraction.ExtractionConfig(seed=int(seed))
    ref = reference_set if reference_set is not None else default_reference_set(adapter)
    return {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "data": data.data_fingerprint(image_set),
        "unitmem": unitmem_result.meta.get("store_key"),
        "top_percents": [float(k) for k in top_percents],
        "factor": float(factor),
        "op": op,
        "ranking": ranking,
        "combine": combine,
        "cfg_half": cfg_half,
        "extraction": ecfg.to_dict(),
        "n_samples": int(n_samples),
        "feature_space": _space_id(feature_space),
        "reference": data.data_fingerprint(ref),
        "sampling": sampling_kwargs(adapter, sampling),
        "seed": int(seed),
        "heldout": data.data_fingerprint(heldout_set) if heldout_set is not None else None,
        "sscd": str(sscd_path) if sscd_path else None,
        "random_draws": default_random_draws(adapter, random_draws),
    }


def _sweep_job(args: dict):
    def fn(ctx) -> tuple[dict, dict]:
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        rows = _sweep_rows(**args, store=ctx.store, progress=progress)
        arrays = {}
        for k in rows[0]:
            vals = [r[k] for r in rows]
            if any(isinstance(v, str) for v in vals):
                arrays[k] = np.array([str(v) for v in vals])
            else:
                arrays[k] = np.array([np.nan if v is None else float(v) for v in vals], np.float64)
        meta = {
            "rows": rows,
            "columns": list(rows[0]),
            "how": "extraction count at the unedited result's measure and threshold; FD and class accuracy "
            "of class-balanced samples with the model's published sampling settings",
        }
        return arrays, meta

    return fn


def _sweep_args(
    adapter,
    unitmem_result,
    image_set,
    top_percents,
    factor,
    op,
    ranking,
    combine,
    cfg_half,
    extraction_cfg,
    n_samples,
    feature_space,
    reference_set,
    sampling,
    seed,
    heldout_set,
    sscd_path,
    random_draws=None,
):
    return dict(
        adapter=adapter,
        unitmem_result=unitmem_result,
        image_set=image_set,
        top_percents=top_percents,
        factor=factor,
        op=op,
        ranking=ranking,
        combine=combine,
        cfg_half=cfg_half,
        extraction_cfg=extraction_cfg,
        n_samples=n_samples,
        feature_space=feature_space,
        reference_set=reference_set,
        sampling=sampling,
        seed=seed,
        heldout_set=heldout_set,
        sscd_path=sscd_path,
        random_draws=default_random_draws(adapter, random_draws),
    )


def run_sweep(
    adapter: IARAdapter,
    unitmem_result,
    image_set: data.ImageSet,
    *,
    top_percents: Sequence[float] = DEFAULT_TOP_PERCENTS,
    factor: float = 0.5,
    op: str = "fc1_scale",
    ranking: str = "global",
    combine: str | int = DEFAULT_COMBINE,
    cfg_half: str = "both",
    extraction_cfg: extraction.ExtractionConfig | None = None,
    n_samples: int = 1000,
    feature_space=None,
    reference_set=None,
    sampling=None,
    seed: int = 0,
    heldout_set=None,
    sscd_path=None,
    random_draws: int | None = None,
    store=None,
    on_progress=None,
    force: bool = False,
):
    """The privacy / quality trade-off: one row per (k, selection in {unitmem, random}); a job in the store.

    Columns: top_percent, selection, n_units, extracted, extracted_planted, recall_planted_max_count, fd,
    class_acc, extracted_before, fd_before, similarity, threshold, fd_metric, n_samples, and per k the random
    control over `random_draws` draws: random_draws, random_extracted_mean / _min / _max and p_value (see
    `random_draw_stats`; the random row's own numbers are the first draw's). k = 0 is the unedited model
    (both selections).
    """
    st = store if store is not None else store_mod.get_store()
    a = _sweep_args(
        adapter,
        unitmem_result,
        image_set,
        top_percents,
        factor,
        op,
        ranking,
        combine,
        cfg_half,
        extraction_cfg,
        n_samples,
        feature_space,
        reference_set,
        sampling,
        seed,
        heldout_set,
        sscd_path,
        random_draws,
    )
    spec = sweep_spec(**a)
    _, meta = jobs.run_job(
        SWEEP_KIND, spec, _sweep_job(a), store=st, version=SWEEP_VERSION, force=force, on_progress=on_progress
    )
    return _frame(meta, st.key(SWEEP_KIND, spec, SWEEP_VERSION))


def _frame(meta: dict, key: str):
    import pandas as pd

    df = pd.DataFrame(meta["rows"], columns=meta["columns"])
    df.attrs["store_key"] = key
    df.attrs["how"] = meta.get("how", "")
    return df


def sweep_key(adapter: IARAdapter, unitmem_result, image_set: data.ImageSet, store=None, **kw) -> str:
    """The store key of `run_sweep` / `start_sweep` with these keywords (defaults as theirs)."""
    st = store if store is not None else store_mod.get_store()
    a = {**sweep_defaults(), **kw}
    return st.key(SWEEP_KIND, sweep_spec(adapter, unitmem_result, image_set, **a), SWEEP_VERSION)


def sweep_defaults() -> dict:
    """The keywords of run_sweep / start_sweep at their defaults (the CLI's `intervene --sweep`)."""
    return dict(
        top_percents=DEFAULT_TOP_PERCENTS,
        factor=DEFAULT_FACTOR,
        op=DEFAULT_OP,
        ranking=DEFAULT_RANKING,
        combine=DEFAULT_COMBINE,
        cfg_half="both",
        extraction_cfg=None,
        n_samples=DEFAULT_N_SAMPLES,
        feature_space=None,
        reference_set=None,
        sampling=None,
        seed=0,
        heldout_set=None,
        sscd_path=None,
    )


def start_sweep(
    adapter: IARAdapter,
    unitmem_result,
    image_set: data.ImageSet,
    *,
    top_percents: Sequence[float] = DEFAULT_TOP_PERCENTS,
    factor: float = 0.5,
    op: str = "fc1_scale",
    ranking: str = "global",
    combine: str | int = DEFAULT_COMBINE,
    cfg_half: str = "both",
    extraction_cfg: extraction.ExtractionConfig | None = None,
    n_samples: int = 1000,
    feature_space=None,
    reference_set=None,
    sampling=None,
    seed: int = 0,
    heldout_set=None,
    sscd_path=None,
    random_draws: int | None = None,
    store=None,
    force: bool = False,
) -> jobs.JobHandle:
    """Start the sweep as a background job; `load_sweep(store, handle.key)` once done."""
    st = store if store is not None else store_mod.get_store()
    a = _sweep_args(
        adapter,
        unitmem_result,
        image_set,
        top_percents,
        factor,
        op,
        ranking,
        combine,
        cfg_half,
        extraction_cfg,
        n_samples,
        feature_space,
        reference_set,
        sampling,
        seed,
        heldout_set,
        sscd_path,
        random_draws,
    )
    return jobs.start_job(SWEEP_KIND, sweep_spec(**a), _sweep_job(a), store=st, version=SWEEP_VERSION, force=force)


def load_sweep(store, key: str):
    """A stored sweep as a DataFrame (attrs: store_key, how)."""
    st = store if store is not None else store_mod.get_store()
    _, meta = st.load(key)
    return _frame(meta, key)
