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
  extracted), so the control is drawn many times (`random_draws`; 20 on demo and test models, 1 on released
  ones unless raised) and the ranked edit is compared with all draws (`random_draw_stats`: mean, range, 5-95%
  band, the ranked edit's rank among them, one-sided p-value).
- Edits (`make_edit`): a `hooks.UnitEdit` value, fc1 weight rows times a factor (paper: 0.5, biases
  unchanged), zeroing, or scaling the unit's output; optionally only one half of a CFG batch. Edits are
  applied with `hooks.edit(model, spec)`, a scoped context of this thread only: a shared model object is
  never modified (not even briefly), also with other sessions running or an exception inside.
- Many edits at once (`measure_edits`): one batched attack in which every batch row carries its own edit
  (`hooks.BatchedEdit`), on the unedited run's candidates, thresholds and decision measure: the ranked edit
  and its 20 random draws, every k of a sweep, or any list of edits (dose-response curves, minimal-set
  searches). It returns `EditScores` (scores [E, I, P], counts, decisions via `extraction.is_extracted`,
  margins = similarity minus threshold, `margin_table` for the margin view); `bootstrap_counts` gives
  intervals over the candidates.
- Quality (`quality`): Frechet distance between samples and real reference images in a named feature
  space (the bundled ``demo-fashion-cnn`` offline, or Inception from the user's TorchScript file
  ``inception-2015-12-05.pt``: real FID), and the class accuracy of the samples by the bundled classifier
  (demo and test models), each with a bootstrap interval (`quality_estimate`). Samples use the model's
  published sampling settings (registry ``sampling``) and are drawn in blocks of `QUALITY_BLOCK` seeded by
  their first index, so the first n samples of a run are those of any smaller run: a first estimate on 200
  samples is refined to 1000, never redrawn. `quality_many` samples several edits in one batched pass.
- `run_intervention`: extraction and quality before the edit, after it, and for the random control, in
  stages (extraction, first estimate, full; `on_stage`); `start_measurement` runs it as the app's job, whose
  checkpoint holds the latest stage. `run_sweep`: the trade-off curve over k (default 0, 1, 5, 10, 20%) for
  UnitMem-ranked and random units, every k and its draws in one batched attack, a table and a job in the
  store. The unedited attack and the unedited model's quality samples are stored once per model and
  shared by every measurement (`read_stores` adds read-only stores such as the app's shipped results).

Example:
    >>> units = select_units(unitmem_result, top_percent=10)            # {block: (unit, ...)}
    >>> edit = make_edit(units, factor=0.5)
    >>> before, after = sample_pair(adapter, [0, 1, 2, 3], edit, seed=0)
    >>> out = run_intervention(adapter, unitmem_result, data.select_demo(500), top_percent=10)
    >>> out.extracted_before, out.extracted_after, out.random_control.extracted_after_mean
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from iarmem_core import data, extraction, hooks, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.hooks import UnitEdit

QUALITY_KIND = "quality"
SWEEP_KIND = "intervention-sweep"
QUALITY_VERSION = "2"  # 2: blocks of QUALITY_BLOCK, features and predictions stored, bootstrap intervals
SWEEP_VERSION = "3"  # 3: every k and its random draws in one batched attack; 20 draws
DEFAULT_RANDOM_DRAWS = 20  # random-control draws on demo and test models
RANKINGS = ("global", "per_block", "per_group")
DEFAULT_TOP_PERCENTS = (0, 1, 5, 10, 20)
# the paper's edit, and what the CLI and the app start from
DEFAULT_TOP_PERCENT = 10.0
DEFAULT_FACTOR = 0.5
DEFAULT_OP = "fc1_scale"
DEFAULT_RANKING = "global"
DEFAULT_COMBINE = "generated"  # each unit's max over the groups the attack generates; "max": over all scales
DEFAULT_N_SAMPLES = 1000  # samples for FD and class accuracy
DEFAULT_N_FIRST = 200  # samples of a first quality estimate (refined to DEFAULT_N_SAMPLES in the background)
QUALITY_BLOCK = 200  # quality samples are drawn in blocks of 200, block [a, b) seeded seed + a (sample_features):
# a first estimate is one generate call (on 2 CPU cores a call of 200 samples costs per sample a third of one of 50)
MAX_ROWS_PER_BATCH = 1024  # (edit, candidate) rows per generation batch of measure_edits on demo and test models
CI_LEVEL = 0.95  # bootstrap intervals
N_BOOT_FD = 200  # bootstrap resamples of an FD (an eigen-decomposition each)
N_BOOT_COUNTS = 2000  # bootstrap resamples of the candidates for counts (cheap)
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
    """Random-control draws: `requested`, or when None `DEFAULT_RANDOM_DRAWS` (20) on demo and test models (the
    draws run in one batched attack, `measure_edits`) and 1 on released models (each draw is one more full
    attack on a large model; raise it with `random_draws` / `--random-draws`)."""
    if requested is not None:
        return int(requested)
    return DEFAULT_RANDOM_DRAWS if adapter.spec.kind in ("demo", "test") else 1


def random_draw_stats(ranked_after: int, draws_after: Sequence[int]) -> dict:
    """How the ranked edit's extraction count compares with `draws_after`, the counts after random draws.

    - p_value = (1 + #draws that left at most as many images extracted) / (draws + 1): the chance, if the
      ranking were no better than random units, that a random draw removes at least as much (one-sided,
      exact for exchangeable draws; its smallest value is 1 / (draws + 1): 20 draws can show p = 0.048).
    - rank: the ranked edit's place among itself and the draws, ordered by images left extracted (1 = it
      left the fewest); a tie takes the best place, and `ties` says how many draws tie with it.
    - extracted_after_q05 / _q95: the 5% and 95% quantiles of the draws (linear interpolation): the band.
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
        "extracted_after_q05": float(np.quantile(d, 0.05)),
        "extracted_after_q95": float(np.quantile(d, 0.95)),
        "p_value": float((1 + (d <= ranked_after).sum()) / (d.size + 1)),
        "rank": int(1 + (d < ranked_after).sum()),
        "ties": int((d == ranked_after).sum()),
    }


@torch.no_grad()
def target_selectivity(
    adapter: IARAdapter, image_set: data.ImageSet, target_N: Sequence[bool], batch_size: int = 32
) -> np.ndarray:
    """[L, U] how much more each unit fires for the target images than for the rest: (m_t - m_r) / (m_t + m_r).

    m = the mean over images of the unit's mean |activation| over all token positions, teacher-forced, one
    view per image. This group-selectivity diagnostic needs ground truth (the demo's planted images). It is
    neither an oracle nor an upper bound on what an edit of k% can do: it ranks units by how they fire for the
    planted group as a whole, while each copy is carried by its own set of units (`localize`: the per-image
    minimal sets, and `dose` for their union and a greedy cover, remove far more copies with fewer units).
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


def quality_labels(adapter: IARAdapter, n: int) -> torch.Tensor:
    """The classes of quality samples 0..n-1: class-balanced, sample i has class i mod num_classes."""
    return torch.arange(int(n)) % adapter.num_classes


@dataclass
class SampleFeatures:
    """What quality needs of samples 0..n-1 of one edit: features [n, D] (float32) in the feature space, the
    bundled classifier's predicted class [n] (None without a classifier) and the asked-for classes [n]."""

    features_ND: np.ndarray
    predictions_N: np.ndarray | None
    labels_N: np.ndarray

    @property
    def n(self) -> int:
        return int(self.features_ND.shape[0])

    def head(self, n: int) -> SampleFeatures:
        """Samples 0..n-1 (the first estimate of a larger run: the same samples, see `QUALITY_BLOCK`)."""
        if n > self.n:
            raise ValueError(f"asked for the first {n} samples of {self.n}")
        p = None if self.predictions_N is None else self.predictions_N[:n]
        return SampleFeatures(self.features_ND[:n], p, self.labels_N[:n])

    def extend(self, more: SampleFeatures) -> SampleFeatures:
        p = None if self.predictions_N is None else np.concatenate([self.predictions_N, more.predictions_N])
        return SampleFeatures(
            np.concatenate([self.features_ND, more.features_ND]), p, np.concatenate([self.labels_N, more.labels_N])
        )

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {f"{prefix}features_ND": self.features_ND, f"{prefix}labels_N": self.labels_N}
        if self.predictions_N is not None:
            out[f"{prefix}predictions_N"] = self.predictions_N
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> SampleFeatures:
        return cls(
            np.asarray(arrays[f"{prefix}features_ND"], np.float32),
            None if f"{prefix}predictions_N" not in arrays else np.asarray(arrays[f"{prefix}predictions_N"]),
            np.asarray(arrays[f"{prefix}labels_N"]),
        )

    @classmethod
    def empty(cls, dim: int, with_predictions: bool) -> SampleFeatures:
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.int64) if with_predictions else None, np.zeros(0))


@torch.no_grad()
def sample_features(
    adapter: IARAdapter,
    edits: Sequence[UnitEdit | None],
    start: int,
    stop: int,
    *,
    space,
    classifier=None,
    seed: int = 0,
    sampling: Mapping | None = None,
    batched: bool = True,
    on_block: Callable[[int], None] | None = None,
    check: Callable[[], None] | None = None,
    keep: int = 0,
) -> tuple[list[SampleFeatures], list[torch.Tensor]]:
    """Quality samples [start, stop) of every edit in `edits`: (features per edit, the first `keep` images).

    Samples are drawn in blocks of `QUALITY_BLOCK`: block [a, b) is one generate call seeded ``seed + a``
    (classes `quality_labels`), so a result never depends on a batch size and the first n samples of a
    larger run are exactly the n samples of a smaller one (a first estimate is refined, never redrawn).
    `start` must be a multiple of `QUALITY_BLOCK`.

    `batched=True` generates a block for all E edits in one pass (`hooks.BatchedEdit`: E x block rows), which
    is what makes many small estimates cheap; the sampler's noise of a row depends on its place in the batch,
    so an edit's samples are then other draws from the same distribution than those of the one-edit path
    (with greedy decoding they are the same). `batched=False` runs each edit on its own: the one-edit path,
    whose samples share the noise of the unedited model's (same seed, same block): a paired comparison.
    """
    if start % QUALITY_BLOCK:
        raise ValueError(f"start must be a multiple of QUALITY_BLOCK={QUALITY_BLOCK}, got {start}")
    kw = sampling_kwargs(adapter, sampling)
    labels = quality_labels(adapter, stop)
    E = len(edits)
    parts: list[list[tuple[np.ndarray, np.ndarray | None]]] = [[] for _ in range(E)]
    kept: list[list[torch.Tensor]] = [[] for _ in range(E)]

    def embed(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        f = space.features(images).float().cpu().numpy()
        p = None
        if classifier is not None:
            dev = next(classifier.parameters()).device
            p = torch.cat([classifier(x.to(dev)).argmax(1).cpu() for x in images.split(256)]).numpy()
        return f, p

    groups = [list(range(E))] if batched and E > 1 else [[e] for e in range(E)]
    for a in range(start, stop, QUALITY_BLOCK):
        b = min(stop, a + QUALITY_BLOCK)
        for group in groups:
            if check is not None:
                check()
            if len(group) == 1:
                spec, lab = edits[group[0]], labels[a:b]
            else:
                spec = hooks.BatchedEdit.tiled([edits[e] for e in group], b - a)
                lab = labels[a:b].repeat(len(group))
            with hooks.edit(adapter.transformer, spec):
                toks = adapter.generate(lab, seed=seed + a, kv_cache=True, **kw)
            imgs = adapter.decode(toks).float().cpu().clamp(0, 1)
            for gi, e in enumerate(group):
                x = imgs[gi * (b - a) : (gi + 1) * (b - a)]
                parts[e].append(embed(x))
                have = sum(t.shape[0] for t in kept[e])
                if have < keep:
                    kept[e].append(x[: keep - have])
        if on_block is not None:
            on_block(b)
    out = []
    for e in range(E):
        feats = np.concatenate([f for f, _ in parts[e]]).astype(np.float32)
        preds = None if classifier is None else np.concatenate([p for _, p in parts[e]]).astype(np.int64)
        out.append(SampleFeatures(feats, preds, labels[start:stop].numpy()))
    imgs = [torch.cat(k) if k else torch.zeros(0, 3, adapter.image_size, adapter.image_size) for k in kept]
    return out, imgs


_THREADS_MU = threading.Lock()


@contextmanager
def _one_thread():
    """Small dense linear algebra (D x D covariances, D ~ 128) in one thread: on a busy machine a second
    thread's synchronisation costs 100x the work (an eigendecomposition took 1.3 s with 2 threads, 7 ms with 1).
    The thread count is process-wide, so it is restored at once, under a lock."""
    with _THREADS_MU:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


class _FDRef:
    """The reference side of the Frechet distance, precomputed once for bootstrap resamples of the samples."""

    def __init__(self, ref_MD: torch.Tensor):
        r = torch.as_tensor(ref_MD).double().cpu()
        self.mu = r.mean(0)
        self.cov = torch.cov(r.T)
        w, v = torch.linalg.eigh(self.cov)
        self.sqrt = (v * w.clamp(min=0).sqrt()) @ v.T  # cov^(1/2), symmetric

    def distance(self, x_ND) -> float:
        """||mu_x - mu_r||^2 + tr(S_x) + tr(S_r) - 2 tr((S_r^1/2 S_x S_r^1/2)^1/2): the same Gaussian
        Frechet distance as `metrics.frechet_distance` (which is the reported value), in float64."""
        x = torch.as_tensor(x_ND).double()
        cov = torch.cov(x.T)
        m = self.sqrt @ cov @ self.sqrt
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
        d = float(((x.mean(0) - self.mu) ** 2).sum() + cov.trace() + self.cov.trace() - 2 * tr_sqrt)
        return max(d, 0.0)


def _percentile_interval(values, level: float = CI_LEVEL) -> list[float]:
    lo, hi = np.quantile(np.asarray(values, np.float64), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def quality_estimate(
    samples: SampleFeatures,
    reference_MD: torch.Tensor | np.ndarray,
    space,
    *,
    n: int | None = None,
    n_boot: int = N_BOOT_FD,
    seed: int = 0,
) -> dict:
    """FD and class accuracy of the first `n` samples (all when None), each with a bootstrap interval.

    - fd: `metrics.frechet_result` of the samples' features against the reference features.
    - fd_interval: the spread of FD over `n_boot` bootstrap resamples of the samples (the reference fixed),
      its 2.5-97.5% range centred on the estimate: fd + (q - median of the resampled FDs). Resampling with
      replacement repeats samples, which shrinks the covariance and shifts every resampled FD upwards (by
      about as much as FD itself at a few hundred samples), so only the spread of the resamples is used.
      FD depends on the sample size: compare only numbers of the same n.
    - class_acc and class_acc_interval: the fraction of samples the bundled classifier assigns to their class,
      percentile bootstrap interval over the same resamples (None without a classifier).
    """
    from iarmem_core import metrics

    s = samples if n is None else samples.head(n)
    ref = reference_MD if isinstance(reference_MD, torch.Tensor) else torch.as_tensor(reference_MD)
    rng = np.random.default_rng([int(seed), s.n])
    idx_BN = rng.integers(0, s.n, size=(int(n_boot), s.n))
    feats = torch.as_tensor(s.features_ND).double()
    with _one_thread():
        fd = metrics.frechet_result(space, torch.as_tensor(s.features_ND), ref)
        fref = _FDRef(ref)
        boot = np.array([fref.distance(feats[torch.as_tensor(i)]) for i in idx_BN])
    q_lo, q_hi = _percentile_interval(boot)
    med = float(np.median(boot))
    out = {
        "fd": fd.value,
        "fd_metric": fd.metric,
        "feature_space": fd.feature_space,
        "comparable_to_published_fid": fd.comparable_to_published_fid,
        "fd_interval": [max(0.0, fd.value + q_lo - med), fd.value + q_hi - med],
        "n_samples": s.n,
        "n_reference": int(ref.shape[0]),
        "class_acc": None,
        "class_acc_interval": None,
        "interval": f"{int(round(100 * CI_LEVEL))}% bootstrap over the {s.n} samples ({int(n_boot)} resamples; "
        "FD: the resamples' spread centred on the estimate, reference fixed; class accuracy: percentile)",
    }
    if s.predictions_N is not None:
        correct = (s.predictions_N == s.labels_N).astype(np.float64)
        out["class_acc"] = float(correct.mean())
        out["class_acc_interval"] = _percentile_interval(correct[idx_BN].mean(1))
    return out


def _space_id(feature_space) -> str | None:
    from iarmem_core import checkpoints, metrics

    if feature_space is None or isinstance(feature_space, str) and feature_space == metrics.FEATURE_SPACE_NAME:
        return metrics.FEATURE_SPACE_NAME
    if isinstance(feature_space, metrics.FeatureSpace):
        p = getattr(feature_space, "path", None)
        return f"{feature_space.name}:{checkpoints.file_fingerprint(p)}" if p else feature_space.name
    return f"inception:{checkpoints.file_fingerprint(feature_space)}"


def quality_spec(
    adapter: IARAdapter, edit: UnitEdit | None, *, n_samples, feature_space, reference_set, seed, sampling
):
    """Everything that determines a `quality` result (its store key is ``store.key(QUALITY_KIND, spec,
    QUALITY_VERSION)``)."""
    ref = reference_set if reference_set is not None else default_reference_set(adapter)
    edit = edit if edit is not None and edit.n_units else None
    return {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "edit": edit.to_dict() if edit else None,
        "n_samples": int(n_samples),
        "feature_space": _space_id(feature_space),
        "reference": data.data_fingerprint(ref),
        "seed": int(seed),
        "sampling": sampling_kwargs(adapter, sampling),
        "block": QUALITY_BLOCK,
    }


def _quality_result(adapter, edit, samples: SampleFeatures, images, space, reference_set, seed, sampling, extra):
    """(arrays, meta) of a quality result from its samples' features (the stored form)."""
    ref = reference_features(space, reference_set, adapter.image_size)
    est = quality_estimate(samples, ref, space, seed=seed)
    meta = {
        **est,
        "classifier": "bundled demo-fashion-cnn head" if est["class_acc"] is not None else None,
        "reference": reference_set.name,
        "sampling": sampling_kwargs(adapter, sampling),
        "seed": int(seed),
        "edit": edit.to_dict() if edit is not None else None,
        "how": f"class-balanced samples (sample i has class i mod {adapter.num_classes}) in blocks of "
        f"{QUALITY_BLOCK}, block [a, b) seeded seed + a, with the model's published sampling settings",
        **extra,
    }
    keep = images[:N_KEEP_SAMPLES]
    arrays = {
        **samples.to_arrays(),
        "samples_BHW3": (keep.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
        "sample_labels": quality_labels(adapter, keep.shape[0]).numpy(),
    }
    return arrays, meta


def _quality_fn(adapter, edit, n_samples, feature_space, reference_set, seed, sampling, on_first):
    def fn(ctx) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        space = _space(feature_space, adapter)
        clf = _classifier(adapter, space)
        acc = SampleFeatures.empty(space.dim, clf is not None)
        imgs = torch.zeros(0, 3, adapter.image_size, adapter.image_size)
        start = 0
        if ctx.resume_state is not None:
            arrays, st_meta = ctx.resume_state
            acc = SampleFeatures.from_arrays(arrays)
            start = acc.n
            imgs = torch.as_tensor(arrays["keep_B3HW"]) if "keep_B3HW" in arrays else imgs
        events: list = []
        first = [on_first is not None and start < (on_first[0] if on_first else 0)]

        def work(i: int, j: int) -> None:
            nonlocal acc, imgs
            got, kept = sample_features(
                adapter,
                [edit],
                i,
                j,
                space=space,
                classifier=clf,
                seed=seed,
                sampling=sampling,
                keep=max(0, N_KEEP_SAMPLES - imgs.shape[0]),
            )
            acc, imgs = acc.extend(got[0]), torch.cat([imgs, kept[0]])
            if first[0] and acc.n >= on_first[0]:
                first[0] = False
                ref = reference_features(space, reference_set, adapter.image_size)
                on_first[1](quality_estimate(acc, ref, space, n=on_first[0], seed=seed), acc.head(on_first[0]))

        jobs.run_batches(
            ctx,
            n_samples,
            QUALITY_BLOCK,
            work,
            start=start,
            events=events,
            align=QUALITY_BLOCK,
            what="sampling block",
            progress=lambda j: (0.95 * j / n_samples, f"sampling {j}/{n_samples}"),
            save=lambda j: ({**acc.to_arrays(), "keep_B3HW": imgs.numpy()}, {"n": acc.n}),
        )
        ctx.progress(0.95, "features")
        timings = {"total_s": round(time.perf_counter() - t0, 3), "resumed_at": int(start)}
        return _quality_result(
            adapter, edit, acc, imgs, space, reference_set, seed, sampling, {"oom_events": events, "timings": timings}
        )

    return fn


class _InlineCtx:
    """A job context for in-process runs without a store: no checkpoints, progress to a callback."""

    resume_state = None
    store = None

    def __init__(self, on_progress=None, check=None):
        self._on_progress, self._check = on_progress, check

    def check(self) -> None:
        if self._check is not None:
            self._check()

    def progress(self, f: float, m: str = "") -> None:
        if self._on_progress is not None:
            self._on_progress(f, m)

    def checkpoint(self, arrays, meta=None) -> None:
        return None


def _find(key: str, store, read_stores: Sequence = ()):
    """The store holding a complete result under `key`: `store` first, then `read_stores` (e.g. the app's
    shipped results); None if none has it."""
    for s in (store, *read_stores):
        if s is not None and s.exists(key):
            return s
    return None


def quality(
    adapter: IARAdapter,
    edit: UnitEdit | None = None,
    *,
    n_samples: int = DEFAULT_N_SAMPLES,
    feature_space=None,
    reference_set: data.ImageSet | None = None,
    seed: int = 0,
    sampling: Mapping | None = None,
    store=None,
    read_stores: Sequence = (),
    on_progress=None,
    on_first: tuple[int, Callable[[dict, SampleFeatures], None]] | None = None,
    force: bool = False,
    with_samples: bool = False,
) -> dict:
    """{"fd", "fd_interval", "fd_metric", "class_acc", "class_acc_interval", "feature_space", "n_samples",
    ...} of class-balanced samples of the model with `edit` (see `quality_estimate` for the intervals).

    `feature_space`: None / "demo-fashion-cnn" (bundled), a FeatureSpace, or the path of NVIDIA's
    TorchScript ``inception-2015-12-05.pt`` (real FID; no other format is accepted). `reference_set`:
    real images (default: the demo's held-out split). With a `store` the result is a job in it (kind
    ``quality``), cached by everything that determines it (`quality_spec`); `read_stores` are searched too.
    `on_first=(n, fn)` calls ``fn(estimate, samples)`` once the first n samples are measured (a progressive
    first estimate; not called when the result is already stored). `with_samples` adds "samples": the
    `SampleFeatures` (for estimates on the first n of them).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a covariance, got {n_samples}")
    ref = reference_set if reference_set is not None else default_reference_set(adapter)
    edit = edit if edit is not None and edit.n_units else None
    fn = _quality_fn(adapter, edit, n_samples, feature_space, ref, seed, sampling, on_first)
    if store is None:
        arrays, meta = fn(_InlineCtx(on_progress))
        out = dict(meta)
    else:
        spec = quality_spec(
            adapter,
            edit,
            n_samples=n_samples,
            feature_space=feature_space,
            reference_set=ref,
            seed=seed,
            sampling=sampling,
        )
        key = store.key(QUALITY_KIND, spec, QUALITY_VERSION)
        src = None if force else _find(key, store, read_stores)
        if src is not None:
            arrays, meta = src.load(key)
        else:
            arrays, meta = jobs.run_job(
                QUALITY_KIND, spec, fn, store=store, version=QUALITY_VERSION, force=force, on_progress=on_progress
            )
        out = {**meta, "store_key": key}
    if with_samples:
        out["samples"] = SampleFeatures.from_arrays(arrays)
    return out


def quality_many(
    adapter: IARAdapter,
    edits: Sequence[UnitEdit | None],
    *,
    n_samples: int = DEFAULT_N_FIRST,
    feature_space=None,
    reference_set: data.ImageSet | None = None,
    seed: int = 0,
    sampling: Mapping | None = None,
    batched: bool = True,
    n_boot: int = N_BOOT_FD,
    on_progress=None,
    check=None,
) -> list[dict]:
    """`quality` of several edits from one batched sampling pass (in-process, not stored): one dict per edit
    with fd, fd_interval, class_acc, class_acc_interval, n_samples and "samples" (its `SampleFeatures`).

    The rows of a generate call carry all E edits (`sample_features` with ``batched=True``), so E estimates of
    n samples cost about one sampling of E x n images with few calls: the dose-response and random-draw
    quality spreads. The samples are other draws than `quality` makes for the same edit (same distribution);
    `batched=False` gives the one-edit path's samples (E separate passes).
    """
    ref_set = reference_set if reference_set is not None else default_reference_set(adapter)
    space = _space(feature_space, adapter)
    clf = _classifier(adapter, space)
    edits = list(edits)
    # memory: at most MAX_ROWS_PER_BATCH rows per generate call, so the edits go in groups of
    # MAX_ROWS_PER_BATCH // block (105 edits x 200 samples in one call needed > 20 GB); the groups are fixed by
    # the order of `edits`, so a result does not depend on anything but the edits and the seed
    per = max(1, MAX_ROWS_PER_BATCH // max(1, min(int(n_samples), QUALITY_BLOCK))) if batched else len(edits)
    got = []
    for g0 in range(0, len(edits), max(1, per)):
        part, _ = sample_features(
            adapter,
            edits[g0 : g0 + per],
            0,
            int(n_samples),
            space=space,
            classifier=clf,
            seed=seed,
            sampling=sampling,
            batched=batched,
            check=check,
            on_block=None
            if on_progress is None
            else lambda j, g0=g0: on_progress(
                (g0 + len(edits[g0 : g0 + per]) * j / n_samples) / len(edits), f"sampling {j}/{n_samples}"
            ),
        )
        got += part
    ref = reference_features(space, ref_set, adapter.image_size)
    return [{**quality_estimate(g, ref, space, n_boot=n_boot, seed=seed), "samples": g} for g in got]


# ---------------------------------------------------------------------------------------------------
# 4. Many edits in one batched attack
@dataclass
class EditScores:
    """The extraction attack on the same candidates before any edit and after each of E edits.

    `scores[m]` is float32 [E, I, P]: similarity `m` of candidate i at prefix p after edit e; `before[m]` is
    [I, P], the unedited attack (the base result's rows). The decision measure and the thresholds per prefix
    are the unedited result's, so every count here is comparable with it; every decision goes through
    `extraction.is_extracted`. Candidate columns: image_id, label, planted (1/0, -1 unknown), count.
    """

    scores: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    image_id: np.ndarray
    label: np.ndarray
    planted: np.ndarray
    count: np.ndarray
    prefixes: list[int]
    similarity: str
    thresholds: dict[str, dict[int, float]]
    edits: list[dict | None]
    planted_counts_in_data: dict[str, int]
    meta: dict

    @property
    def n_edits(self) -> int:
        return len(self.edits)

    @property
    def n_candidates(self) -> int:
        return int(self.image_id.shape[0])

    def _pick(self, similarity, threshold, prefix) -> tuple[str, int, float]:
        from iarmem_core import metrics

        m = metrics.canonical_measure(similarity or self.similarity)
        if m not in self.scores:
            raise ValueError(f"{m!r} was not measured here; measures: {', '.join(self.scores)}")
        p = int(prefix if prefix is not None else self.prefixes[0])
        if p not in self.prefixes:
            raise ValueError(f"prefix {p} not in {self.prefixes}")
        t = float(self.thresholds[m][p]) if threshold is None else float(threshold)
        return m, self.prefixes.index(p), t

    def threshold(self, similarity: str | None = None, prefix: int | None = None) -> float:
        return self._pick(similarity, None, prefix)[2]

    def extracted(self, similarity=None, threshold=None, prefix=None) -> np.ndarray:
        """Bool [E, I]: candidate i extracted after edit e (`extraction.is_extracted`)."""
        m, pi, t = self._pick(similarity, threshold, prefix)
        return extraction.is_extracted(self.scores[m][:, :, pi], t)

    def extracted_before(self, similarity=None, threshold=None, prefix=None) -> np.ndarray:
        """Bool [I]: extracted by the unedited attack."""
        m, pi, t = self._pick(similarity, threshold, prefix)
        return extraction.is_extracted(self.before[m][:, pi], t)

    def counts(self, similarity=None, threshold=None, prefix=None) -> np.ndarray:
        """Int [E]: candidates extracted after each edit."""
        return self.extracted(similarity, threshold, prefix).sum(1)

    def margins(self, similarity=None, threshold=None, prefix=None) -> np.ndarray:
        """Float [E, I]: similarity minus threshold after each edit (> 0: extracted)."""
        m, pi, t = self._pick(similarity, threshold, prefix)
        return self.scores[m][:, :, pi].astype(np.float64) - float(np.float32(t))

    def margins_before(self, similarity=None, threshold=None, prefix=None) -> np.ndarray:
        m, pi, t = self._pick(similarity, threshold, prefix)
        return self.before[m][:, pi].astype(np.float64) - float(np.float32(t))

    def planted_summary(self, ext_I: np.ndarray) -> dict:
        """extracted_planted and recall_planted_max_count of one bool [I] decision (None without ground truth)."""
        if not self.planted_counts_in_data:
            return {"extracted_planted": None, "recall_planted_max_count": None}
        hit = ext_I & (self.planted == 1)
        top = max(self.planted_counts_in_data, key=int)
        n_top = self.planted_counts_in_data[top]
        rec = float((hit & (self.count == int(top))).sum() / n_top) if n_top else None
        return {"extracted_planted": int(hit.sum()), "recall_planted_max_count": rec}

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"after_{m}_EIP": v for m, v in self.scores.items()}
        out.update({f"before_{m}_IP": v for m, v in self.before.items()})
        out.update(image_id=self.image_id, label=self.label, planted=self.planted, count=self.count)
        return out

    def to_meta(self) -> dict:
        return {
            "prefixes": self.prefixes,
            "similarity": self.similarity,
            "thresholds": {m: {str(p): t for p, t in d.items()} for m, d in self.thresholds.items()},
            "edits": self.edits,
            "planted_counts_in_data": self.planted_counts_in_data,
            **self.meta,
        }

    @classmethod
    def from_stored(cls, arrays: Mapping[str, np.ndarray], meta: Mapping) -> EditScores:
        ms = [k[len("after_") : -len("_EIP")] for k in arrays if k.startswith("after_") and k.endswith("_EIP")]
        rest = {k: v for k, v in meta.items() if k not in ("prefixes", "similarity", "thresholds", "edits")}
        rest.pop("planted_counts_in_data", None)
        return cls(
            scores={m: np.asarray(arrays[f"after_{m}_EIP"]) for m in ms},
            before={m: np.asarray(arrays[f"before_{m}_IP"]) for m in ms},
            image_id=np.asarray(arrays["image_id"]).astype(str),
            label=np.asarray(arrays["label"]),
            planted=np.asarray(arrays["planted"]),
            count=np.asarray(arrays["count"]),
            prefixes=[int(p) for p in meta["prefixes"]],
            similarity=meta["similarity"],
            thresholds={m: {int(p): float(t) for p, t in d.items()} for m, d in meta["thresholds"].items()},
            edits=list(meta["edits"]),
            planted_counts_in_data=dict(meta.get("planted_counts_in_data") or {}),
            meta=rest,
        )


def base_extraction(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    extraction_cfg: extraction.ExtractionConfig | None = None,
    *,
    store=None,
    read_stores: Sequence = (),
    heldout_set=None,
    sscd_path=None,
    on_progress=None,
) -> extraction.ExtractionResult:
    """The unedited attack (`extraction.run_extraction`), taken from `store` or `read_stores` when stored."""
    st = store if store is not None else store_mod.get_store()
    cfg = extraction_cfg or extraction.ExtractionConfig()
    key = extraction.extraction_key(adapter, image_set, cfg, store=st, heldout_set=heldout_set, sscd_path=sscd_path)
    src = _find(key, st, read_stores)
    if src is not None and src is not st:
        res = extraction.load_extraction(src, key)
        return extraction.finalize(res, st, cfg.similarity, cfg.threshold)
    return extraction.run_extraction(
        adapter, image_set, cfg, store=st, heldout_set=heldout_set, sscd_path=sscd_path, on_progress=on_progress
    )


def default_rows_per_batch(adapter: IARAdapter, cfg: extraction.ExtractionConfig, n_rows: int) -> int:
    """Rows per batch of `measure_edits`: on demo and test models the fewest batches of at most
    `MAX_ROWS_PER_BATCH` rows, of even size (1050 rows: 2 x 528); on released models 4 x cfg.batch_size
    (GPU memory; out-of-memory halves it anyway). Always a multiple of 8."""
    if adapter.spec.kind in ("demo", "test"):
        n_batches = -(-int(n_rows) // MAX_ROWS_PER_BATCH)
        rows = -(-int(n_rows) // max(1, n_batches))
    else:
        rows = 4 * int(cfg.batch_size)
    return max(8, -(-rows // 8) * 8)


@torch.no_grad()
def measure_edits(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    edits: Sequence[UnitEdit | None],
    extraction_cfg: extraction.ExtractionConfig | None = None,
    *,
    base: extraction.ExtractionResult | None = None,
    store=None,
    read_stores: Sequence = (),
    measures: Sequence[str] | str | None = None,
    heldout_set=None,
    sscd_path=None,
    rows_per_batch: int | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    check: Callable[[], None] | None = None,
) -> EditScores:
    """The extraction attack after each of `edits`, on the unedited run's candidates, as one batched attack.

    - `base`: the unedited `ExtractionResult` (default: `base_extraction` with `extraction_cfg`, from the
      store when there). Its candidates (the train rows), prefixes, decision measure and thresholds are used,
      so the counts are comparable with its count; the edits apply to generation only, as in
      `run_extraction(..., edit=...)`.
    - The rows (edit e, candidate i), edit-major, are attacked `rows_per_batch` at a time (a multiple of 8;
      default `default_rows_per_batch`: the rows in as few even batches of at most `MAX_ROWS_PER_BATCH` as
      they fit, on demo and test models; 4 x the config's batch size on released models)
      through `extraction.attack_batch` with a `hooks.BatchedEdit` that gives every row its own edit: E edits
      of I candidates cost one attack of E x I rows, not E attacks. When only token match is measured, the
      candidates' true tokens are the unedited run's and nothing is decoded (the same generate call and
      score as attack_batch, without tokenizing and decoding every row).
    - `measures`: None measures only the decision measure, "all" the base result's measures, or a list.
    - Equality with the one-edit path (`run_extraction(..., edit=e)`): the same greedy attack row by row; the
      scores are equal where the batch shapes give the same transformer rows (tests: bit-exact at batches of
      8 and 16 rows on CPU) and may differ in a rare argmax flip otherwise. With a sampling attack config
      (top_k != 1) the noise depends on the batch layout.

    Returns `EditScores` (counts, margins and decisions for every edit and candidate). `None` or empty
    edits are the unedited model (a check: its scores equal the base result's up to that batch effect).
    """
    t0 = time.perf_counter()
    cfg = extraction_cfg or extraction.ExtractionConfig()
    if base is None:
        base = base_extraction(
            adapter, image_set, cfg, store=store, read_stores=read_stores, heldout_set=heldout_set, sscd_path=sscd_path
        )
    prefixes = [int(p) for p in base.meta["prefix_tokens"]]
    if measures is None:
        ms = [base.similarity]
    elif measures == "all":
        ms = list(base.meta["measures"])
    else:
        from iarmem_core import metrics

        ms = [metrics.canonical_measure(m) for m in measures]
        missing = [m for m in ms if m not in base.meta["measures"]]
        if missing:
            raise ValueError(f"measures {missing} are not in the unedited result ({base.meta['measures']})")
    a = base.arrays
    P = len(prefixes)
    train = np.flatnonzero((a["split"].astype(str) == "train") & (a["prefix_tokens"] == prefixes[0]))
    items = a["item"][train].astype(np.int64)
    I, E = len(items), len(edits)
    if I == 0:
        raise ValueError("the unedited extraction result has no train candidates to attack")
    if E == 0:
        raise ValueError("measure_edits needs at least one edit (None for the unedited model)")
    rows_of = {p: np.flatnonzero((a["split"].astype(str) == "train") & (a["prefix_tokens"] == p)) for p in prefixes}
    before = {m: np.stack([a[f"sim_{m}"][rows_of[p]] for p in prefixes], 1).astype(np.float32) for m in ms}
    y_I = image_set.labels_tensor(items)
    gen_kw = {
        "cfg": float(cfg.cfg),
        "top_k": int(cfg.top_k),
        "top_p": float(cfg.top_p),
        "temperature": float(cfg.temperature),
    }
    batched = hooks.BatchedEdit.tiled(list(edits), I)
    scores = {m: np.full((E, I, P), np.nan, np.float32) for m in ms}
    n_rows = E * I
    if rows_per_batch is None:
        rows_per_batch = default_rows_per_batch(adapter, cfg, n_rows)
    events: list = []

    images_needed = any(m != "token_match" for m in ms)
    true_IN = np.asarray(a["true_tokens_RN"][train], np.int64) if "true_tokens_RN" in a else None

    def work(r0: int, r1: int) -> None:
        rows = np.arange(r0, r1)
        e_R, i_R = rows // I, rows % I
        seed_b = cfg.seed + 1_000_003 * int(i_R[0])
        if images_needed or true_IN is None:
            uniq, inv = np.unique(i_R, return_inverse=True)
            x_R = image_set.images(items[uniq], size=adapter.image_size)[torch.as_tensor(inv)]
            _, _, results = extraction.attack_batch(
                adapter,
                x_R.to(adapter.device),
                y_I[i_R].to(adapter.device),
                prefixes,
                ms,
                gen_kw,
                seed=seed_b,
                edit=batched.rows(r0, r1),
                sscd_path=sscd_path,
            )
            sims_P = [sims for _, _, sims in results]
        else:
            # token match only: the candidates' true tokens come from the unedited run (the same tokens its
            # attack_batch made), nothing is decoded; the same generate call and score as attack_batch's
            from iarmem_core import metrics

            true_R = torch.as_tensor(true_IN[i_R])
            prefix = adapter.unflatten(true_R.to(adapter.device))
            sims_P = []
            for p in prefixes:
                with hooks.edit(adapter.transformer, batched.rows(r0, r1)):
                    gen = adapter.generate(
                        y_I[i_R].to(adapter.device),
                        prefix=prefix if p else None,
                        n_prefix=p,
                        seed=seed_b + p,
                        kv_cache=True,
                        **gen_kw,
                    )
                s_R = metrics.score("token_match", tokens_a=adapter.flatten(gen).cpu(), tokens_b=true_R, token_start=p)
                sims_P.append({"token_match": s_R.float().numpy().astype(np.float32)})
        for pi, sims in enumerate(sims_P):
            for m in ms:
                scores[m][e_R, i_R, pi] = sims[m]

    ctx = _InlineCtx(on_progress, check)
    jobs.run_batches(
        ctx,
        n_rows,
        max(8, int(rows_per_batch)),
        work,
        events=events,
        align=8,
        what="batched attack",
        progress=lambda j: (j / n_rows, f"attacked {j}/{n_rows} (edit, candidate) rows"),
    )
    thr = {m: {p: float(v) for p, v in base.thresholds(m).items()} for m in ms}

    def col(k: str, fill) -> np.ndarray:
        return a[k][train] if k in a else np.full(I, fill)

    return EditScores(
        scores=scores,
        before=before,
        image_id=np.asarray(a["image_id"][train]).astype(str),
        label=np.asarray(a["label"][train]),
        planted=np.asarray(col("planted", -1)).astype(np.int8),
        count=np.asarray(col("count", -1)).astype(np.int64),
        prefixes=prefixes,
        similarity=base.similarity,
        thresholds=thr,
        edits=[e.to_dict() if e is not None and e.n_units else None for e in edits],
        planted_counts_in_data=dict(base.meta.get("planted_counts_in_data") or {}),
        meta={
            "base_key": base.meta.get("store_key"),
            "rows": int(n_rows),
            "rows_per_batch": int(rows_per_batch),
            "oom_events": events,
            "generation": {**gen_kw, "kv_cache": True, "prefix_tokens": prefixes},
            "decision": "similarity strictly above the threshold, compared in float32 (extraction.is_extracted)",
            "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        },
    )


def bootstrap_counts(
    extracted_EI: np.ndarray,
    before_I: np.ndarray | None = None,
    *,
    n_boot: int = N_BOOT_COUNTS,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict:
    """Bootstrap intervals over the candidates (items) for extraction counts.

    `extracted_EI` bool [E, I] (after each edit), `before_I` bool [I] (unedited). The candidates are
    resampled with replacement `n_boot` times, the same resamples for every row (paired). Returns
    {"after": [E, 2], "before": [2] or None, "change": [E, 2] (after - before) or None}: percentile intervals
    at `level` of the counts (scaled to the I candidates).
    """
    ext = np.asarray(extracted_EI, bool)
    if ext.ndim == 1:
        ext = ext[None]
    E, I = ext.shape
    rng = np.random.default_rng([int(seed), I])
    w_BI = np.stack([np.bincount(rng.integers(0, I, I), minlength=I) for _ in range(int(n_boot))])
    after_BE = w_BI @ ext.T.astype(np.int64)
    q = [(1 - level) / 2, (1 + level) / 2]
    out = {"after": np.quantile(after_BE, q, axis=0).T.tolist(), "before": None, "change": None}
    if before_I is not None:
        b_B = w_BI @ np.asarray(before_I, bool).astype(np.int64)
        out["before"] = np.quantile(b_B, q).tolist()
        out["change"] = np.quantile(after_BE - b_B[:, None], q, axis=0).T.tolist()
    return out


def margin_table(scores: EditScores, edit_index: int = 0, random_indices: Sequence[int] | None = None):
    """The margin view: per candidate, similarity minus threshold before and after edit `edit_index`
    (> 0 means extracted), and over the edits `random_indices` (the random draws) their median and 5-95% band.

    Columns: image_id, label, planted, count, margin_before, margin_after, extracted_before, extracted_after,
    and with random draws margin_random_median, margin_random_q05, margin_random_q95. Sorted by margin_before
    (highest first). The threshold is the unedited result's (decision measure, first prefix).
    """
    import pandas as pd

    after = scores.margins()
    before = scores.margins_before()
    ext = scores.extracted()
    df = pd.DataFrame(
        {
            "image_id": scores.image_id,
            "label": scores.label,
            "planted": scores.planted,
            "count": scores.count,
            "margin_before": before,
            "margin_after": after[edit_index],
            "extracted_before": scores.extracted_before(),
            "extracted_after": ext[edit_index],
        }
    )
    if random_indices is not None and len(random_indices):
        r = after[list(random_indices)]
        df["margin_random_median"] = np.median(r, 0)
        df["margin_random_q05"] = np.quantile(r, 0.05, axis=0)
        df["margin_random_q95"] = np.quantile(r, 0.95, axis=0)
    df = df.sort_values("margin_before", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs["similarity"] = scores.similarity
    df.attrs["threshold"] = scores.threshold()
    return df


# ---------------------------------------------------------------------------------------------------
# 5. One intervention, measured progressively, and the sweep
@dataclass
class RandomControl:
    """The random-units control of one edit: the same number of units in every block, edited the same way,
    drawn `draws` times (seeds seed, seed + 1, ...), all draws in the same batched attack as the ranked edit.
    Quality is measured for the first draw."""

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
    rank: int | None = None  # the ranked edit's place among itself and the draws (1 = fewest left extracted)
    ties: int | None = None
    extracted_after_q05: float | None = None
    extracted_after_q95: float | None = None
    fd_after_interval: list | None = None
    class_acc_after_interval: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InterventionResult:
    """Extraction and quality before and after one edit, with its random control and how each number was
    computed (similarity and threshold, feature space, sample count, intervals, store keys). `to_dict()` is
    the CLI's JSON. `stage`: "extraction" (quality still to come), "first estimate" (quality from the first
    `n_samples` of `n_samples_target`) or "full"."""

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
    stage: str = "full"
    n_samples_target: int | None = None
    extracted_before_interval: list | None = None
    extracted_after_interval: list | None = None
    extracted_change_interval: list | None = None
    fd_before_interval: list | None = None
    fd_after_interval: list | None = None
    class_acc_before_interval: list | None = None
    class_acc_after_interval: list | None = None
    how: dict | None = None

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


STAGES = ("extraction", "first estimate", "full")


def _quality_numbers(q: dict | None) -> dict:
    keys = ("fd", "fd_interval", "class_acc", "class_acc_interval")
    return {k: None for k in keys} if q is None else {k: q.get(k) for k in keys}


class _EditQuality:
    """Progressive quality of one edit: samples in blocks, a first estimate on the first n, refined to all.
    A result already stored under the edit's `quality` key is used as it is (and saved there once done)."""

    def __init__(self, adapter, edit, n_samples, feature_space, ref_set, seed, sampling, store, read_stores):
        self.adapter, self.edit, self.n = adapter, edit, int(n_samples)
        self.feature_space, self.ref_set, self.seed, self.sampling = feature_space, ref_set, seed, sampling
        self.store = store
        self.spec = quality_spec(
            adapter,
            edit,
            n_samples=n_samples,
            feature_space=feature_space,
            reference_set=ref_set,
            seed=seed,
            sampling=sampling,
        )
        self.key = store.key(QUALITY_KIND, self.spec, QUALITY_VERSION) if store is not None else None
        src = _find(self.key, store, read_stores) if store is not None else None
        self.stored = src.load(self.key) if src is not None else None
        self.samples: SampleFeatures | None = None
        self.images = torch.zeros(0, 3, adapter.image_size, adapter.image_size)
        if self.stored is not None:
            self.samples = SampleFeatures.from_arrays(self.stored[0])

    @property
    def have(self) -> int:
        return 0 if self.samples is None else self.samples.n

    def sample_to(self, n: int, space, clf, check, on_block=None) -> None:
        n = min(int(n), self.n)
        if self.have >= n:
            return
        got, kept = sample_features(
            self.adapter,
            [self.edit],
            self.have,
            n,
            space=space,
            classifier=clf,
            seed=self.seed,
            sampling=self.sampling,
            check=check,
            keep=max(0, N_KEEP_SAMPLES - self.images.shape[0]),
            on_block=on_block,
        )
        self.samples = got[0] if self.samples is None else self.samples.extend(got[0])
        self.images = torch.cat([self.images, kept[0]])

    def estimate(self, n: int, space, ref) -> dict:
        if self.stored is not None and n >= self.n:
            return {**self.stored[1], "store_key": self.key}
        return {**quality_estimate(self.samples, ref, space, n=min(n, self.have), seed=self.seed), "store_key": None}

    def save(self, space) -> dict:
        """The full result, saved under the quality key (as `quality` would have stored it)."""
        if self.stored is None:
            arrays, meta = _quality_result(
                self.adapter,
                self.edit,
                self.samples,
                self.images,
                space,
                self.ref_set,
                self.seed,
                self.sampling,
                {"oom_events": [], "timings": {}, "computed_by": "run_intervention (progressive)"},
            )
            if self.store is not None and not self.store.read_only:
                self.store.save(self.key, arrays, meta, kind=QUALITY_KIND, spec=self.spec, version=QUALITY_VERSION)
            self.stored = (arrays, meta)
        return {**self.stored[1], "store_key": self.key}


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
    n_samples: int = DEFAULT_N_SAMPLES,
    feature_space=None,
    reference_set=None,
    sampling=None,
    seed: int = 0,
    heldout_set=None,
    sscd_path=None,
    with_random: bool = True,
    random_draws: int | None = None,
    n_first: int | None = None,
    on_stage: Callable[[InterventionResult, EditScores], None] | None = None,
    read_stores: Sequence = (),
    check: Callable[[], None] | None = None,
) -> InterventionResult:
    """Extraction and quality before the edit, after it, and with random units of the same size and blocks.

    1. The unedited attack (`base_extraction`, usually stored) and the ranked edit with its `random_draws`
       random draws (seeds seed, seed + 1, ...; default `default_random_draws`) in ONE batched attack
       (`measure_edits`) on the same candidates: counts with bootstrap intervals over the candidates, the
       draws' mean / range / 5-95% band, the ranked edit's rank among them and its p-value
       (`random_draw_stats`). `on_stage(result, scores)` is called with stage "extraction".
    2. Quality (FD, class accuracy, bootstrap intervals) of the unedited model, the ranked edit and the first
       random draw: with `n_first`, first the ranked edit on its first `n_first` samples (`on_stage` with
       stage "first estimate"; the unedited numbers are then of its first `n_first` samples too, so both sides
       have the same sample size; the random draw's quality follows), then refined on the same samples plus
       the rest up to `n_samples` (stage "full", the return value). Quality samples share the unedited
       model's noise (same seed and blocks): a paired view.

    `units` replaces the UnitMem selection with an explicit {block: units}. Held-out images are attacked
    before the edit only. `read_stores` are searched for stored sub-results (the app's shipped results).
    """
    st = store if store is not None else store_mod.get_store()
    ecfg = extraction_cfg or extraction.ExtractionConfig()
    if n_first is not None and n_first < n_samples and n_first % QUALITY_BLOCK:
        raise ValueError(
            f"n_first={n_first}: a first estimate must be whole blocks of QUALITY_BLOCK={QUALITY_BLOCK} samples "
            "(so its samples are the first ones of the full measurement)"
        )
    draws = default_random_draws(adapter, random_draws) if with_random else 0
    if with_random and draws < 1:
        raise ValueError(f"random_draws must be at least 1, got {draws}")
    sel = dict(units) if units is not None else select_units(unitmem_result, top_percent, ranking, combine)
    edit = make_edit(sel, op, factor, cfg_half)
    draw_edits = [
        make_edit(random_control(sel, adapter.n_units, seed=seed + i), op, factor, cfg_half) for i in range(draws)
    ]
    prog = on_progress or (lambda f, m: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    before = base_extraction(
        adapter,
        image_set,
        ecfg,
        store=st,
        read_stores=read_stores,
        heldout_set=heldout_set,
        sscd_path=sscd_path,
        on_progress=lambda f, m: prog(0.05 * f, f"extraction before: {m}"),
    )
    es = measure_edits(
        adapter,
        image_set,
        [edit] + draw_edits,
        ecfg,
        base=before,
        sscd_path=sscd_path,
        on_progress=lambda f, m: prog(0.05 + 0.35 * f, f"extraction after the edit and {draws} random draws: {m}"),
        check=check,
    )
    timings["extraction_s"] = round(time.perf_counter() - t0, 3)
    sim, thr = es.similarity, es.threshold()
    ext_EI, ext0_I = es.extracted(), es.extracted_before()
    counts = ext_EI.sum(1)
    boot = bootstrap_counts(ext_EI, ext0_I, seed=seed)
    c_before = before.count(similarity=sim)
    pl_before, pl_after = es.planted_summary(ext0_I), es.planted_summary(ext_EI[0])
    how = {
        "extraction": f"{es.n_candidates} candidates of the unedited attack, {sim} > {thr:.4g} (float32, "
        f"extraction.is_extracted), the edit on generation only; the ranked edit and {draws} random draws in "
        "one batched attack",
        "intervals": f"{int(round(100 * CI_LEVEL))}% bootstrap intervals over the candidates "
        f"({N_BOOT_COUNTS} resamples, paired) for counts; quality: see interval of each number",
        "random_band": "5-95% quantiles of the random draws' counts",
    }
    base_keys = {
        "extraction_before": before.meta.get("store_key"),
        "unitmem": getattr(unitmem_result, "meta", {}).get("store_key") if unitmem_result else None,
    }

    def result(stage: str, q0: dict | None, q1: dict | None, q2: dict | None, n_q: int) -> InterventionResult:
        n0, n1, n2 = _quality_numbers(q0), _quality_numbers(q1), _quality_numbers(q2)
        rc = None
        if draws:
            pl2 = es.planted_summary(ext_EI[1])
            stats = random_draw_stats(int(counts[0]), [int(v) for v in counts[1:]])
            rc = RandomControl(
                extracted_after=int(counts[1]),
                fd_after=n2["fd"],
                class_acc_after=n2["class_acc"],
                extracted_planted_after=pl2["extracted_planted"],
                recall_planted_max_count_after=pl2["recall_planted_max_count"],
                n_units=draw_edits[0].n_units,
                seed=seed,
                edit=draw_edits[0].to_dict(),
                **stats,
                draw_seeds=[seed + i for i in range(draws)],
                store_keys={"quality": (q2 or {}).get("store_key")},
                fd_after_interval=n2["fd_interval"],
                class_acc_after_interval=n2["class_acc_interval"],
            )
        return InterventionResult(
            extracted_before=int(ext0_I.sum()),
            extracted_after=int(counts[0]),
            fd_before=n0["fd"],
            fd_after=n1["fd"],
            class_acc_before=n0["class_acc"],
            class_acc_after=n1["class_acc"],
            recall_planted_max_count_before=pl_before["recall_planted_max_count"],
            recall_planted_max_count_after=pl_after["recall_planted_max_count"],
            extracted_planted_before=pl_before["extracted_planted"],
            extracted_planted_after=pl_after["extracted_planted"],
            heldout_false_rate_before=c_before["heldout_false_rate"],
            candidates=es.n_candidates,
            similarity=sim,
            threshold=float(thr),
            fd_metric=(q0 or {}).get("fd_metric", ""),
            feature_space=(q0 or {}).get("feature_space", ""),
            n_samples=int(n_q),
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
                **base_keys,
                "quality_before": (q0 or {}).get("store_key"),
                "quality_after": (q1 or {}).get("store_key"),
            },
            random_control=rc,
            stage=stage,
            n_samples_target=int(n_samples),
            extracted_before_interval=boot["before"],
            extracted_after_interval=boot["after"][0],
            extracted_change_interval=boot["change"][0],
            fd_before_interval=n0["fd_interval"],
            fd_after_interval=n1["fd_interval"],
            class_acc_before_interval=n0["class_acc_interval"],
            class_acc_after_interval=n1["class_acc_interval"],
            how={**how, "quality": (q1 or q0 or {}).get("interval"), "timings": dict(timings)},
        )

    if on_stage is not None:
        on_stage(result("extraction", None, None, None, 0), es)

    # quality: the unedited model (stored once per model), the ranked edit, the first random draw
    ref_set = reference_set if reference_set is not None else default_reference_set(adapter)
    space = _space(feature_space, adapter)
    clf = _classifier(adapter, space)
    ref = reference_features(space, ref_set, adapter.image_size)
    qargs = (n_samples, feature_space, ref_set, seed, sampling, st, read_stores)
    qs = [_EditQuality(adapter, e, *qargs) for e in [None, edit] + draw_edits[:1]]

    todo = max(1, sum(q.n - q.have for q in qs))
    done = [0]

    def grow(q: _EditQuality, n: int) -> None:
        """Sample edit q up to n; the bar moves over all quality samples still to draw, never backwards."""
        had = q.have

        def blk(j: int) -> None:
            prog(0.4 + 0.6 * min(1.0, (done[0] + j - had) / todo), f"quality samples: {j}/{q.n} of one edit")

        q.sample_to(n, space, clf, check, blk)
        done[0] += q.have - had

    first = n_first if n_first is not None and n_first < n_samples else None
    if first is not None:
        for q in qs[:2]:  # the first estimate: the ranked edit (the unedited side is stored once per model)
            grow(q, first)
        timings["first_estimate_s"] = round(time.perf_counter() - t0, 3)
        if on_stage is not None:
            on_stage(result("first estimate", *[q.estimate(first, space, ref) for q in qs[:2]], None, first), es)
    for q in qs:
        grow(q, n_samples)
    full = [q.save(space) for q in qs]
    timings["full_s"] = round(time.perf_counter() - t0, 3)
    out = result("full", *(full + [None] * (3 - len(full)))[:3], n_samples)
    prog(1.0, "done")
    return out


MEASURE_KIND = "intervention-app"  # one edit's numbers as a job (the app's "measure this edit")
MEASURE_VERSION = "2"  # 2: batched draws (20), progressive quality, intervals, margins


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
    n_samples: int = DEFAULT_N_SAMPLES,
    n_first: int | None = DEFAULT_N_FIRST,
    random_draws: int | None = None,
) -> dict:
    """Everything that determines the measurement of one edit with the default extraction and quality settings."""
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
        "random_draws": default_random_draws(adapter, random_draws),
        "n_samples": int(n_samples),
        "n_first": None if n_first is None else int(n_first),
        "quality_block": QUALITY_BLOCK,
    }


def measurement_key(adapter: IARAdapter, unitmem_result, image_set: data.ImageSet, store=None, **edit) -> str:
    st = store if store is not None else store_mod.get_store()
    return st.key(MEASURE_KIND, measurement_spec(adapter, unitmem_result, image_set, **edit), MEASURE_VERSION)


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
    n_samples: int = DEFAULT_N_SAMPLES,
    n_first: int | None = DEFAULT_N_FIRST,
    random_draws: int | None = None,
    read_stores: Sequence = (),
) -> jobs.JobHandle:
    """`run_intervention` for one edit (top-k% or explicit units) as a background job.

    While it runs, its checkpoint holds the latest stage ("extraction", then "first estimate"; read it with
    `load_measurement_stage`); its result is the full measurement (`load_measurement`): meta =
    `InterventionResult.to_dict()` plus the batched scores' meta, arrays = the scores (`EditScores`).
    `read_stores`: stores searched for the unedited results (the app's shipped results).
    """
    st = store if store is not None else store_mod.get_store()
    edit = dict(top_percent=top_percent, units=units, factor=factor, op=op, ranking=ranking, seed=seed)
    spec = measurement_spec(
        adapter, unitmem_result, image_set, n_samples=n_samples, n_first=n_first, random_draws=random_draws, **edit
    )

    def fn(ctx):
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        def stage(r: InterventionResult, es: EditScores) -> None:
            ctx.checkpoint(es.to_arrays(), {"result": r.to_dict(), "edit_scores": es.to_meta()})

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
            n_samples=n_samples,
            n_first=n_first,
            random_draws=random_draws,
            on_stage=lambda r, es: (stage(r, es), scores.__setitem__(0, es)),
            read_stores=read_stores,
            check=ctx.check,
        )
        return scores[0].to_arrays(), {**out.to_dict(), "edit_scores": scores[0].to_meta()}

    scores: list = [None]
    return jobs.start_job(MEASURE_KIND, spec, fn, store=st, version=MEASURE_VERSION)


def measurement_from_meta(meta: Mapping) -> InterventionResult:
    """The InterventionResult stored by `start_measurement` (or held in its checkpoint)."""
    m = dict(meta)
    return InterventionResult.from_dict(m.get("result", m))


def load_measurement(arrays: Mapping[str, np.ndarray], meta: Mapping) -> tuple[InterventionResult, EditScores | None]:
    """(result, batched scores) of a stored measurement or of its checkpoint (`load_measurement_stage`)."""
    r = measurement_from_meta(meta)
    es_meta = meta.get("edit_scores")
    es = EditScores.from_stored(arrays, es_meta) if es_meta and any(k.startswith("after_") for k in arrays) else None
    return r, es


def load_measurement_stage(store, key: str) -> tuple[InterventionResult, EditScores | None] | None:
    """The latest stage of a running measurement job (from its checkpoint), or None."""
    st = store if store is not None else store_mod.get_store()
    part = st.load_partial(key)
    if part is None or "result" not in part[1]:
        return None
    return load_measurement(*part)


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
    read_stores=(),
    check=None,
) -> list[dict]:
    """All k and their random draws in one batched attack; quality of each ranked edit and first draw."""
    ecfg = extraction_cfg or extraction.ExtractionConfig()
    draws = default_random_draws(adapter, random_draws)
    ks = [float(k) for k in top_percents]
    plan: list[tuple[float, UnitEdit | None, list[UnitEdit]]] = []
    for k in ks:
        if k <= 0:
            plan.append((k, None, []))
            continue
        sel = select_units(unitmem_result, k, ranking, combine)
        e = make_edit(sel, op, factor, cfg_half)
        rnd = [
            make_edit(random_control(sel, adapter.n_units, seed=seed + i), op, factor, cfg_half) for i in range(draws)
        ]
        plan.append((k, e, rnd))
    edits: list[UnitEdit | None] = []
    index: list[tuple[int, list[int]]] = []
    for _, e, rnd in plan:
        if e is None:
            index.append((-1, []))
            continue
        index.append((len(edits), list(range(len(edits) + 1, len(edits) + 1 + len(rnd)))))
        edits += [e] + rnd
    before = base_extraction(
        adapter,
        image_set,
        ecfg,
        store=store,
        read_stores=read_stores,
        heldout_set=heldout_set,
        sscd_path=sscd_path,
        on_progress=lambda f, m: progress(0.05 * f, f"extraction before: {m}"),
    )
    es = measure_edits(
        adapter,
        image_set,
        edits or [None],  # only k = 0: one unedited row keeps the code one path
        ecfg,
        base=before,
        sscd_path=sscd_path,
        on_progress=lambda f, m: progress(0.05 + 0.45 * f, f"{len(edits)} edits in one batched attack: {m}"),
        check=check,
    )
    ext0, ext_EI = es.extracted_before(), es.extracted()
    boot = bootstrap_counts(ext_EI, ext0, seed=seed)
    sim, thr = es.similarity, es.threshold()
    qkw = dict(
        n_samples=n_samples,
        feature_space=feature_space,
        reference_set=reference_set,
        seed=seed,
        sampling=sampling,
        store=store,
        read_stores=read_stores,
    )
    n_q = 1 + sum(2 for _, e, _ in plan if e is not None)
    done = [0]

    def q_of(e):
        def p(f, m):
            progress(0.5 + 0.5 * (done[0] + f) / n_q, f"quality: {m}")

        out = quality(adapter, e, on_progress=p, **qkw)
        done[0] += 1
        return out

    q0 = q_of(None)
    rows = []
    for (k, e, rnd), (ei, ri) in zip(plan, index):
        if e is None:
            q1 = q2 = q0
            ext1 = ext2 = ext0
            n0 = int(ext0.sum())
            stats = {
                "draws": 0,
                "extracted_after_mean": n0,
                "extracted_after_min": n0,
                "extracted_after_max": n0,
                "extracted_after_q05": float(n0),
                "extracted_after_q95": float(n0),
                "p_value": None,
                "rank": None,
            }
            iv1 = iv2 = boot["before"]
            n_units = 0
        else:
            q1, q2 = q_of(e), q_of(rnd[0])
            ext1, ext2 = ext_EI[ei], ext_EI[ri[0]]
            stats = random_draw_stats(int(ext1.sum()), [int(ext_EI[i].sum()) for i in ri])
            iv1, iv2 = boot["after"][ei], boot["after"][ri[0]]
            n_units = e.n_units
        common = {
            "top_percent": float(k),
            "n_units": n_units,
            "similarity": sim,
            "threshold": float(thr),
            "fd_metric": q0["fd_metric"],
            "n_samples": q0["n_samples"],
            "extracted_before": int(ext0.sum()),
            "fd_before": q0["fd"],
            "random_draws": stats["draws"],
            "random_extracted_mean": stats["extracted_after_mean"],
            "random_extracted_min": stats["extracted_after_min"],
            "random_extracted_max": stats["extracted_after_max"],
            "random_extracted_q05": stats["extracted_after_q05"],
            "random_extracted_q95": stats["extracted_after_q95"],
            "p_value": stats["p_value"],
            "rank": stats["rank"],
        }
        for name, ext, q, iv in (("unitmem", ext1, q1, iv1), ("random", ext2, q2, iv2)):
            pl = es.planted_summary(ext)
            rows.append(
                {
                    **common,
                    "selection": name,
                    "extracted": int(ext.sum()),
                    "extracted_lo": float(iv[0]),
                    "extracted_hi": float(iv[1]),
                    "extracted_planted": pl["extracted_planted"],
                    "recall_planted_max_count": pl["recall_planted_max_count"],
                    "fd": q["fd"],
                    "fd_lo": (q.get("fd_interval") or [None, None])[0],
                    "fd_hi": (q.get("fd_interval") or [None, None])[1],
                    "class_acc": q["class_acc"],
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
        "quality_block": QUALITY_BLOCK,
    }


def _sweep_job(args: dict, read_stores: Sequence = ()):
    def fn(ctx) -> tuple[dict, dict]:
        def progress(frac: float, msg: str) -> None:
            ctx.check()
            ctx.progress(frac, msg)

        rows = _sweep_rows(**args, store=ctx.store, progress=progress, read_stores=read_stores, check=ctx.check)
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
            "how": "extraction count at the unedited result's measure and threshold (float32 compare), every k "
            "and its random draws in one batched attack on the same candidates; extracted_lo / _hi: 95% "
            "bootstrap interval over the candidates; random_extracted_q05 / _q95: the draws' 5-95% band; rank: "
            "the ranked edit's place among itself and the draws; FD and class accuracy of class-balanced "
            "samples with the model's published sampling settings (fd_lo / _hi: 95% bootstrap interval)",
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
    read_stores: Sequence = (),
):
    """The privacy / quality trade-off: one row per (k, selection in {unitmem, random}); a job in the store.

    Columns: top_percent, selection, n_units, extracted (with extracted_lo / _hi, a bootstrap interval over the
    candidates), extracted_planted, recall_planted_max_count, fd (fd_lo / _hi), class_acc, extracted_before,
    fd_before, similarity, threshold, fd_metric, n_samples, and per k the random control over `random_draws`
    draws: random_draws, random_extracted_mean / _min / _max / _q05 / _q95, p_value and rank (see
    `random_draw_stats`; the random row's own numbers are the first draw's). k = 0 is the unedited model
    (both selections). Every k and all its random draws run as one batched attack (`measure_edits`).
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
        SWEEP_KIND,
        spec,
        _sweep_job(a, read_stores),
        store=st,
        version=SWEEP_VERSION,
        force=force,
        on_progress=on_progress,
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
    read_stores: Sequence = (),
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
    return jobs.start_job(
        SWEEP_KIND, sweep_spec(**a), _sweep_job(a, read_stores), store=st, version=SWEEP_VERSION, force=force
    )


def load_sweep(store, key: str):
    """A stored sweep as a DataFrame (attrs: store_key, how)."""
    st = store if store is not None else store_mod.get_store()
    _, meta = st.load(key)
    return _frame(meta, key)
