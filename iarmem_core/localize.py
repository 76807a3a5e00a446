"""Per-image causal localization: which units carry one memorized image? (LOCALIZATION.md section 2, item 6).

UnitMem ranks units by how selectively they fire; whether a unit *carries* an image is a causal question. For
one training image x (its tokens, its class) and the attack's prefix of P tokens:

1. Attribution of every unit u (block b, hidden unit j), teacher forced, one backward pass:

       g_u = sum_t a_u(t) * d log p(tokens of the generated region | prefix, class) / d a_u(t)

   over all rows t of the forward pass (a first-order estimate of how much log p drops when u is zeroed),
   and per (block, group) the positive part summed over the block's units: the attribution map.
2. The minimal set: zero the image's top-n units by g during generation from the prefix, n = 1, 2, 4, ...
   until the image is no longer extracted (similarity at or below the model's calibrated threshold), then
   bisect between the last two n. n_min is the smallest size found that removes the copy.
3. Controls: >= 20 random sets of n_min units matched per block (the same count in every block), and how
   many of them remove the image (if they do, the set is not specific); collateral: which other extracted
   images stop being extracted under the same edit; and the edit's cost in sample quality.
4. NeMo-style units (Hintersdorf et al. 2024): the z-score of each unit's mean |activation| on x against
   its statistics over never-trained (held-out) images; the units above a threshold, which can be edited too.

Everything runs in the calling thread inside `hooks` scopes (the shared model object is never modified);
`run_localization` stores the result as a job (kind ``localize``) keyed by everything that determines it.

Example:
    >>> m = load_adapter("demo-var")
    >>> res = run_localization(m, data.select_demo(500), "train/1143")
    >>> res["n_min"], res["random_flips"], res["collateral"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from iarmem_core import data, extraction, hooks, jobs, metrics
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.hooks import UnitEdit

KIND = "localize"
NULL_STATS_KIND = "unit-null-stats"
VERSION = "1"


@dataclass(frozen=True)
class LocalizeConfig:
    """Options of a per-image localization; every field is part of the result's store key."""

    prefix_tokens: int | None = None  # None: the attack's default prefix (VAR: 4 scales)
    op: str = "zero"  # how the set is removed: "zero", or "fc1_scale"/"out_scale" with `factor`
    factor: float = 0.0
    max_units: int | None = None  # budget of the search; None: a third of all units
    random_draws: int = 20  # random same-size sets matched per block
    similarity: str = "auto"  # the attack's decision measure (auto: the model's calibrated one)
    threshold: float | None = None  # None: the calibrated threshold at this prefix
    nemo_z: float = 3.0  # NeMo units: z-score of mean |activation| against held-out images above this
    nemo_heldout: int = 200  # held-out images behind the NeMo statistics (demo: the held-out split)
    quality_samples: int = 200  # samples for FD / class accuracy of the minimal-set edit (0: skip)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.op not in hooks.EDIT_OPS:
            raise ValueError(f"op must be one of {hooks.EDIT_OPS}, got {self.op!r}")
        if self.random_draws < 0:
            raise ValueError(f"random_draws must be >= 0, got {self.random_draws}")
        if self.max_units is not None and self.max_units < 1:
            raise ValueError(f"max_units must be >= 1, got {self.max_units}")
        if not math.isfinite(self.nemo_z):
            raise ValueError(f"nemo_z must be a finite number, got {self.nemo_z}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# 1. Attribution
def _group_index_T(adapter: IARAdapter, kinds: Sequence[str]) -> tuple[list, torch.Tensor]:
    groups = adapter.position_groups(kinds=kinds)
    member = torch.zeros(adapter.n_tokens, len(groups))
    for gi, g in enumerate(groups):
        member[g.index, gi] = 1.0
    return groups, member


def attribution(
    adapter: IARAdapter, image_3HW: torch.Tensor, label: int, n_prefix: int, kinds: Sequence[str] | None = None
) -> dict:
    """Attribution of every unit to the generated region of one image (one teacher-forced backward pass).

    Returns {"scores_LU": float64 [L, U] g_u, "map_LG": [L, G] positive attribution summed over the block's
    units per group (rows grouped by the token they predict), "groups": group names, "log_p": the summed log
    probability of the generated region's true tokens, "n_generated": its token count}.
    """
    kinds = tuple(kinds or (("scale",) if len(adapter.token_grids) > 1 else ("scale", "row")))
    groups, member_NG = _group_index_T(adapter, kinds)
    blocks = [s.block for s in adapter.unit_sites()]
    pos = {b: i for i, b in enumerate(blocks)}
    acts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(hp, x, info):
        # the first block's activation has no history (weights never require grad): make it a leaf that requires
        # grad; later ones depend on it, so their grads are kept with retain_grad (every path counts)
        if x.grad_fn is None:
            x = x.detach().requires_grad_(True)
        else:
            x.retain_grad()
        ti = info.target_index if info is not None else torch.arange(x.shape[1])
        acts[hp.block] = (x, ti)
        return x

    x_13HW = image_3HW.unsqueeze(0).to(adapter.device)
    lab = torch.tensor([int(label)], device=adapter.device)
    with torch.no_grad():
        tokens = adapter.tokenize(x_13HW)
        flat_1N = adapter.flatten(tokens)
    names = hooks.match_unit_names(adapter.transformer)
    with torch.enable_grad(), hooks.active(adapter.transformer, names, keep):
        logits_1NV = adapter.teacher_forced_logits(tokens, lab)
        logp_1NV = torch.log_softmax(logits_1NV.float(), dim=-1)
        tgt = logp_1NV.gather(-1, flat_1N.unsqueeze(-1)).squeeze(-1)[0]  # [N]
        log_p = tgt[n_prefix:].sum()
        log_p.backward()
    L, U = len(blocks), adapter.n_units
    scores = torch.zeros(L, U, dtype=torch.float64)
    map_LG = torch.zeros(L, len(groups), dtype=torch.float64)
    for b, (a, ti) in acts.items():
        if a.grad is None:
            continue
        ga_TU = (a.detach() * a.grad)[0].double().cpu()  # [T, U]
        scores[pos[b]] = ga_TU.sum(0)
        valid = ti.cpu() >= 0
        rows_TG = torch.zeros(ti.shape[0], len(groups), dtype=torch.float64)
        rows_TG[valid] = member_NG[ti.cpu()[valid]].double()
        map_LG[pos[b]] = (rows_TG.T @ ga_TU.clamp(min=0)).sum(-1)
    return {
        "scores_LU": scores.numpy(),
        "map_LG": map_LG.numpy(),
        "groups": [g.name for g in groups],
        "group_kinds": [g.kind for g in groups],
        "blocks": blocks,
        "log_p": float(log_p.detach()),
        "n_generated": int(adapter.n_tokens - n_prefix),
    }


def ranked_units(scores_LU: np.ndarray, blocks: Sequence[int], k: int | None = None) -> list[tuple[int, int]]:
    """(block, unit) by descending score (ties: lower block, then lower unit)."""
    s = np.asarray(scores_LU, dtype=np.float64).reshape(-1)
    order = np.lexsort((np.arange(s.size), -s))[: (k if k is not None else s.size)]
    U = scores_LU.shape[1]
    return [(int(blocks[f // U]), int(f % U)) for f in order]


def units_dict(pairs: Sequence[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """(block, unit) pairs -> {block: sorted distinct units} (a pair listed twice is one unit)."""
    out: dict[int, set[int]] = {}
    for b, u in pairs:
        out.setdefault(int(b), set()).add(int(u))
    return {b: tuple(sorted(us)) for b, us in sorted(out.items())}


# ---------------------------------------------------------------------------------------------------
# 2. Is the image extracted under an edit?
@dataclass
class Judge:
    """The attack on a fixed set of images at one prefix, with the decision measure and threshold fixed.

    `scores(edit)` generates every image from its prefix under `edit` (greedy, class-conditional, no CFG) and
    returns the similarity to its reconstruction; `extracted(edit)` compares with the threshold (strictly above).
    Tokens and reconstructions are computed once.
    """

    adapter: IARAdapter
    images_B3HW: torch.Tensor
    labels_B: torch.Tensor
    prefix: int
    measure: str
    threshold: float
    threshold_source: str
    seed: int = 0

    def __post_init__(self) -> None:
        ad = self.adapter
        with torch.no_grad():
            self.tokens = ad.tokenize(self.images_B3HW.to(ad.device))
            self.true_BN = ad.flatten(self.tokens)
            self.recon = ad.decode(self.tokens)
        self.gen_kw = {"cfg": 0.0, "top_k": 1, "top_p": 0.0, "temperature": 1.0}

    def _scores_of(self, idx, edit) -> np.ndarray:
        """float64 [len(idx)]: images `idx` generated from their prefix under `edit` (a UnitEdit, a BatchedEdit of
        the same rows, or None) and scored against their tokens / reconstructions with the decision measure."""
        ad = self.adapter
        tok = [t[idx] for t in self.tokens] if isinstance(self.tokens, list) else self.tokens[idx]
        with torch.no_grad(), hooks.edit(ad.transformer, edit):
            gen = ad.generate(
                self.labels_B[idx].to(ad.device),
                prefix=tok,
                n_prefix=self.prefix,
                seed=self.seed + self.prefix,
                **self.gen_kw,
            )
        gen_BN = ad.flatten(gen)
        if self.measure == "token_match":  # tokens only: nothing to decode
            s = metrics.score(
                "token_match", tokens_a=gen_BN.cpu(), tokens_b=self.true_BN[idx].cpu(), token_start=self.prefix
            )
            return s.double().numpy()
        img = ad.decode(gen)
        sims = extraction.compute_similarities(
            [self.measure], img, self.recon[idx], gen_BN, self.true_BN[idx], self.prefix
        )
        return sims[self.measure].astype(np.float64)

    def scores(self, edit: UnitEdit | None, rows: Sequence[int] | None = None) -> np.ndarray:
        idx = list(range(len(self.labels_B))) if rows is None else list(rows)
        return self._scores_of(idx, edit)

    def extracted(self, edit: UnitEdit | None, rows: Sequence[int] | None = None) -> np.ndarray:
        return extraction.is_extracted(self.scores(edit, rows), self.threshold)

    def scores_many(self, edits: Sequence[UnitEdit | None], rows_per_batch: int = 1024, on_batch=None) -> np.ndarray:
        """float64 [E, B]: `scores` of every image under each of `edits`, E edits in batched generate calls (a
        `hooks.BatchedEdit` gives each (edit, image) row its own edit). Equal to E `scores` calls where the batch
        shapes give the same transformer rows (greedy decoding: a rare argmax flip otherwise)."""
        B, E = len(self.labels_B), len(edits)
        batched = hooks.BatchedEdit.tiled(list(edits), B)
        out = np.zeros(E * B, np.float64)
        step = max(B, (max(1, int(rows_per_batch)) // B) * B)  # whole edits per batch
        for r0 in range(0, E * B, step):
            r1 = min(E * B, r0 + step)
            out[r0:r1] = self._scores_of(np.arange(r0, r1) % B, batched.rows(r0, r1))
            if on_batch is not None:
                on_batch(r1 / (E * B))
        return out.reshape(E, B)


def make_judge(
    adapter: IARAdapter, image_set: data.ImageSet, idx: Sequence[int], cfg: LocalizeConfig, store=None
) -> Judge:
    """A Judge for images `idx` of `image_set` with the model's calibrated decision (or cfg's threshold)."""
    ecfg = extraction.ExtractionConfig(similarity=cfg.similarity, prefix_tokens=cfg.prefix_tokens)
    prefix = extraction.resolve_prefixes(adapter, ecfg)[0]
    measures, _ = extraction.available_measures(adapter, ecfg, None)
    rows, auto = extraction.resolve_thresholds(adapter.spec.name, adapter.identity, measures, [prefix], store)
    measure = extraction.resolve_similarity(metrics.canonical_measure(cfg.similarity), measures, auto)
    row = next(r for r in rows if r["measure"] == measure)
    thr, src = (float(cfg.threshold), "given") if cfg.threshold is not None else (row["threshold"], row["source"])
    if cfg.threshold is None and src.startswith("uncalibrated"):
        raise ValueError(
            f"{adapter.spec.name} has no calibrated threshold for {measure} at a {prefix}-token prefix (only an "
            f"uncalibrated default), so 'no longer extracted' would mean nothing. Calibrate it first "
            f"(python -m iarmem_core extract --model {adapter.spec.name} --calibrate ...) or give --threshold."
        )
    idx = np.asarray(idx, dtype=np.int64)
    return Judge(
        adapter,
        image_set.images(idx, size=adapter.image_size),
        image_set.labels_tensor(idx),
        prefix,
        measure,
        float(thr),
        src,
        cfg.seed,
    )


def _edit(units: Mapping[int, Sequence[int]], cfg: LocalizeConfig) -> UnitEdit:
    return UnitEdit(units={int(b): tuple(u) for b, u in units.items()}, op=cfg.op, factor=float(cfg.factor))


# ---------------------------------------------------------------------------------------------------
# 3. The minimal set and its controls
def minimal_set(
    judge: Judge, row: int, ranking: Sequence[tuple[int, int]], cfg: LocalizeConfig, max_units: int
) -> dict:
    """The smallest n (doubling, then bisection) whose top-n units of `ranking` remove image `row` of the judge.

    Returns {"n_min" (None if not reached within max_units), "tried": [(n, extracted, score)], "units"}.
    """
    tried: list[tuple[int, bool, float]] = []

    def removed(n: int) -> bool:
        e = _edit(units_dict(ranking[:n]), cfg)
        s = float(judge.scores(e, [row])[0])
        ext = bool(extraction.is_extracted(np.array([s]), judge.threshold)[0])
        tried.append((n, ext, s))
        return not ext

    lo, n = 0, 1  # lo: largest size known to keep the image extracted
    hi = None
    while n <= max_units:
        if removed(n):
            hi = n
            break
        lo, n = n, n * 2
    if hi is None and lo < max_units and removed(max_units):
        hi = max_units
    if hi is None:
        return {"n_min": None, "tried": tried, "units": []}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if removed(mid):
            hi = mid
        else:
            lo = mid
    return {"n_min": int(hi), "tried": tried, "units": [list(p) for p in ranking[:hi]]}


def random_matched(
    units: Mapping[int, Sequence[int]], n_units_per_block: int, draws: int, seed: int
) -> list[dict[int, tuple[int, ...]]]:
    """`draws` random sets with as many units in every block as `units` (seeded per draw and block)."""
    out = []
    for d in range(draws):
        sel = {}
        for b, us in sorted(units.items()):
            rng = np.random.default_rng([int(seed), 7919, int(d), int(b)])
            sel[int(b)] = tuple(sorted(int(u) for u in rng.choice(n_units_per_block, size=len(us), replace=False)))
        out.append(sel)
    return out


def set_map(
    units: Mapping[int, Sequence[int]], attr_map_LG: np.ndarray, scores_LU: np.ndarray, blocks: Sequence[int]
) -> dict:
    """Where the set lives: units per block, and its share of the positive attribution per block."""
    pos = {b: i for i, b in enumerate(blocks)}
    per_block = {str(b): len(us) for b, us in sorted(units.items())}
    pos_total = float(np.clip(scores_LU, 0, None).sum()) or 1.0
    share = {
        str(b): round(float(np.clip(scores_LU[pos[b], list(us)], 0, None).sum()) / pos_total, 4)
        for b, us in sorted(units.items())
    }
    return {"units_per_block": per_block, "attribution_share_per_block": share}


# ---------------------------------------------------------------------------------------------------
# 4. NeMo-style units: activation z-scores against never-trained images
@torch.no_grad()
def mean_abs_activations(adapter: IARAdapter, images_B3HW: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """[B, L, U] mean over all rows of |unit activation| (teacher forced, one view)."""
    blocks = [s.block for s in adapter.unit_sites()]
    pos = {b: i for i, b in enumerate(blocks)}
    out = torch.zeros(images_B3HW.shape[0], len(blocks), adapter.n_units, dtype=torch.float64)

    def on_units(block: int, acts_BTU: torch.Tensor, info) -> None:
        out[:, pos[block]] = acts_BTU.abs().mean(1).double().cpu()

    tokens = adapter.tokenize(images_B3HW.to(adapter.device))
    with hooks.capture(adapter.transformer, on_units):
        adapter.teacher_forced_logits(tokens, labels_B.to(adapter.device))
    return out


def null_stats(adapter: IARAdapter, null_set: data.ImageSet, store=None, batch_size: int = 32) -> dict:
    """Per unit mean and standard deviation of the mean |activation| over never-trained images (a stored job)."""
    st = store if store is not None else store_mod.get_store()
    spec = {"model": adapter.identity, "data": data.data_fingerprint(null_set), "dtype": str(adapter.dtype)}

    def fn(ctx):
        n = len(null_set)
        sums = torch.zeros(len(adapter.unit_sites()), adapter.n_units, dtype=torch.float64)
        sq = torch.zeros_like(sums)

        def work(i: int, j: int) -> None:
            idx = np.arange(i, j)
            m = mean_abs_activations(
                adapter, null_set.images(idx, size=adapter.image_size), null_set.labels_tensor(idx)
            )
            for b in range(m.shape[0]):  # fixed order
                sums.add_(m[b])
                sq.add_(m[b] ** 2)

        jobs.run_batches(
            ctx,
            n,
            batch_size,
            work,
            align=batch_size,
            what="null-statistics batch",
            progress=lambda j: (j / n, f"{j}/{n} never-trained images"),
        )
        mean = sums / n
        std = (sq / n - mean**2).clamp(min=0).sqrt()
        return {"mean_LU": mean.numpy(), "std_LU": std.numpy()}, {"n_images": n, "data": null_set.name}

    arrays, meta = jobs.run_job(NULL_STATS_KIND, spec, fn, store=st, version=VERSION)
    return {**arrays, **meta}


def nemo_units(
    adapter: IARAdapter, image_3HW: torch.Tensor, label: int, stats: Mapping, z: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(z-scores [L, U] of the image's mean |activation| against `stats`, the (block, unit) pairs above z)."""
    m = mean_abs_activations(adapter, image_3HW.unsqueeze(0), torch.tensor([int(label)]))[0].numpy()
    std = np.asarray(stats["std_LU"], dtype=np.float64)
    zs = (m - np.asarray(stats["mean_LU"])) / np.where(std > 0, std, np.inf)
    blocks = [s.block for s in adapter.unit_sites()]
    above = [p for p in ranked_units(zs, blocks) if zs[blocks.index(p[0]), p[1]] > z]
    return zs, above


def default_null_set(adapter: IARAdapter, n: int, seed: int = 0) -> data.ImageSet:
    """The never-trained images behind NeMo statistics: the demo's held-out split (demo and test models)."""
    if adapter.spec.kind == "released":
        raise ValueError(
            f"{adapter.spec.name}: NeMo statistics need never-trained images: pass null_set (e.g. an "
            f"ImageFolder of ImageNet validation images)"
        )
    return data.select_demo(n=n, seed=seed, split="heldout")


# ---------------------------------------------------------------------------------------------------
# 5. One image, as a stored job
def job_spec(
    adapter: IARAdapter, image_set: data.ImageSet, image_id: str, cfg: LocalizeConfig, others: Sequence[str]
) -> dict:
    return {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "data": data.data_fingerprint(image_set),
        "image": image_id,
        "config": cfg.to_dict(),
        "collateral_on": sorted(others),
    }


def extracted_ids(adapter: IARAdapter, image_set: data.ImageSet, cfg: LocalizeConfig, store=None) -> list[str]:
    """Ids of the training candidates the default attack extracts (the images worth localizing)."""
    ecfg = extraction.ExtractionConfig(
        similarity=cfg.similarity,
        threshold=cfg.threshold,
        prefix_tokens=None if cfg.prefix_tokens is None else (cfg.prefix_tokens,),
        seed=cfg.seed,
    )
    res = extraction.run_extraction(adapter, image_set, ecfg, store=store)
    return res.extracted_ids()


def _localize(adapter, image_set, image_id, cfg, others, null_set, store, progress) -> dict:
    from iarmem_core import intervention

    pos = {k: i for i, k in enumerate(image_set.ids)}
    row = pos[image_id]
    others = [o for o in others if o != image_id and o in pos]
    judge = make_judge(adapter, image_set, [row] + [pos[o] for o in others], cfg, store)
    blocks = [s.block for s in adapter.unit_sites()]
    n_total = len(blocks) * adapter.n_units
    budget = int(cfg.max_units or max(1, n_total // 3))
    base_scores = judge.scores(None)
    base = extraction.is_extracted(base_scores, judge.threshold)
    out = {
        "image": image_id,
        "label": int(image_set.labels[row]),
        "n_units_total": n_total,
        "budget": budget,
        "prefix_tokens": judge.prefix,
        "similarity": judge.measure,
        "threshold": judge.threshold,
        "threshold_source": judge.threshold_source,
        "score_before": float(base_scores[0]),
        "margin_before": float(base_scores[0] - judge.threshold),
        "extracted_before": bool(base[0]),
        "op": cfg.op,
        "factor": cfg.factor,
    }
    for k in ("planted", "count", "kind", "split"):
        if k in image_set.meta:
            v = image_set.meta[k][row]
            out[k] = v.item() if hasattr(v, "item") else v
    progress(0.05, "attribution (one backward pass)")
    x = image_set.images([row], size=adapter.image_size)[0]
    attr = attribution(adapter, x, int(image_set.labels[row]), judge.prefix)
    ranking = ranked_units(attr["scores_LU"], blocks)
    out["attribution"] = {
        "map_LG": np.round(attr["map_LG"], 6).tolist(),
        "groups": attr["groups"],
        "blocks": blocks,
        "log_p": attr["log_p"],
        "n_generated": attr["n_generated"],
        "top": [[b, u, round(float(attr["scores_LU"][blocks.index(b), u]), 6)] for b, u in ranking[:32]],
        "definition": "g_u = sum_t a_u(t) * d log p(generated-region tokens | prefix, class) / "
        "d a_u(t), teacher forced; map: positive part per (block, group)",
    }
    if not base[0]:
        out.update(
            n_min=None,
            units=[],
            random_draws=0,
            random_flips=None,
            collateral=[],
            quality=None,
            note=f"{image_id} is not extracted by the unedited model at this threshold "
            f"({judge.measure} {base_scores[0]:.4f} <= {judge.threshold:.4f}): nothing to localize",
        )
        return out
    progress(0.15, "minimal set (doubling, then bisection)")
    ms = minimal_set(judge, 0, ranking, cfg, budget)
    out["n_min"] = ms["n_min"]
    out["search"] = [{"n": n, "extracted": e, "score": round(s, 6)} for n, e, s in ms["tried"]]
    if ms["n_min"] is None:
        out.update(
            units=[],
            random_draws=0,
            random_flips=None,
            collateral=[],
            quality=None,
            note=f"not removed by its top {budget} units (the budget; raise max_units / --max-units)",
        )
        return out
    units = units_dict(ranking[: ms["n_min"]])
    out["units"] = ms["units"]
    out["where"] = set_map(units, attr["map_LG"], attr["scores_LU"], blocks)
    edit = _edit(units, cfg)
    progress(0.4, f"{cfg.random_draws} random sets of {ms['n_min']} units")
    flips = [
        not bool(judge.extracted(_edit(r, cfg), [0])[0])
        for r in random_matched(units, adapter.n_units, cfg.random_draws, cfg.seed)
    ]
    out["random_draws"] = cfg.random_draws
    out["random_flips"] = int(sum(flips))
    out["random_p_value"] = float((1 + sum(flips)) / (cfg.random_draws + 1)) if cfg.random_draws else None
    out["random_definition"] = (
        "random sets with the minimal set's count of units in every block; a flip = the "
        "image is no longer extracted; p = (1 + flips) / (draws + 1)"
    )
    progress(0.6, "collateral on the other extracted images")
    if others:
        still = judge.extracted(edit, list(range(1, len(others) + 1)))
        was = base[1:]
        out["collateral"] = [o for o, w, s in zip(others, was, still) if w and not s]
        out["collateral_of"] = int(was.sum())
    else:
        out["collateral"], out["collateral_of"] = [], 0
    if cfg.nemo_z is not None:
        progress(0.7, "NeMo z-scores against never-trained images")
        null = null_set if null_set is not None else default_null_set(adapter, cfg.nemo_heldout, cfg.seed)
        stats = null_stats(adapter, null, store)
        _, above = nemo_units(adapter, x, int(image_set.labels[row]), stats, cfg.nemo_z)
        nemo = {
            "z": cfg.nemo_z,
            "n_units": len(above),
            "units": [list(p) for p in above[:512]],
            "null_images": int(stats["n_images"]),
        }
        if above:
            nemo["removes_image"] = not bool(judge.extracted(_edit(units_dict(above), cfg), [0])[0])
            nemo["overlap_with_minimal_set"] = len(set(map(tuple, above)) & set(map(tuple, ranking[: ms["n_min"]])))
        out["nemo"] = nemo
    if cfg.quality_samples:
        progress(0.8, f"quality of the edit ({cfg.quality_samples} samples)")
        q0 = intervention.quality(adapter, None, n_samples=cfg.quality_samples, seed=cfg.seed, store=store)
        q1 = intervention.quality(adapter, edit, n_samples=cfg.quality_samples, seed=cfg.seed, store=store)
        out["quality"] = {
            "fd_before": q0["fd"],
            "fd_after": q1["fd"],
            "class_acc_before": q0["class_acc"],
            "class_acc_after": q1["class_acc"],
            "fd_metric": q0["fd_metric"],
            "n_samples": cfg.quality_samples,
        }
    else:
        out["quality"] = None
    out["edit"] = edit.to_dict()
    return out


def run_localization(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    image_id: str,
    cfg: LocalizeConfig | None = None,
    *,
    others: Sequence[str] | None = None,
    null_set: data.ImageSet | None = None,
    store=None,
    on_progress=None,
    force: bool = False,
) -> dict:
    """Localize one image (a job in the store); `others`: the images whose collateral is checked (default: every
    image the default attack extracts). See the module docstring for what the result holds."""
    cfg = cfg or LocalizeConfig()
    st = store if store is not None else store_mod.get_store()
    if image_id not in set(image_set.ids):
        near = [i for i in image_set.ids if i.split("/")[-1] == str(image_id).split("/")[-1]][:3]
        raise KeyError(
            f"image {image_id!r} is not in the data selection {image_set.name} ({len(image_set)} images"
            f"{'; did you mean ' + ', '.join(near) + '?' if near else ''}). `iarmem extract --json` "
            f"lists the extracted ids (extracted_ids)"
        )
    if others is None:
        others = extracted_ids(adapter, image_set, cfg, st)
    spec = job_spec(adapter, image_set, image_id, cfg, others)

    def fn(ctx):
        def progress(f: float, msg: str) -> None:
            ctx.check()
            ctx.progress(f, msg)
            if on_progress is not None:
                on_progress(f, msg)

        return {}, _localize(adapter, image_set, image_id, cfg, list(others), null_set, ctx.store, progress)

    _, meta = jobs.run_job(KIND, spec, fn, store=st, version=VERSION, force=force)
    return {**meta, "store_key": st.key(KIND, spec, VERSION)}


def start_localization(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    image_id: str,
    cfg: LocalizeConfig | None = None,
    *,
    others: Sequence[str],
    store=None,
) -> jobs.JobHandle:
    """The same as a background job (the app); `others` must be given (the extracted ids)."""
    cfg = cfg or LocalizeConfig()
    st = store if store is not None else store_mod.get_store()
    spec = job_spec(adapter, image_set, image_id, cfg, others)

    def fn(ctx):
        def progress(f: float, msg: str) -> None:
            ctx.check()
            ctx.progress(f, msg)

        return {}, _localize(adapter, image_set, image_id, cfg, list(others), None, ctx.store, progress)

    return jobs.start_job(KIND, spec, fn, store=st, version=VERSION)


def localization_key(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    image_id: str,
    cfg: LocalizeConfig | None,
    others: Sequence[str],
    store=None,
) -> str:
    st = store if store is not None else store_mod.get_store()
    return st.key(KIND, job_spec(adapter, image_set, image_id, cfg or LocalizeConfig(), others), VERSION)


# ---------------------------------------------------------------------------------------------------
# 6. Every extracted image: the union of the minimal sets and its effect
def jaccard(a: Sequence, b: Sequence) -> float:
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    return len(sa & sb) / max(1, len(sa | sb))


ALL_KIND = "localize-all"
ALL_VERSION = "2"  # 2: the union counts each unit once (version 1 counted a unit once per image it carries)


def localize_all(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: LocalizeConfig | None = None,
    *,
    store=None,
    on_progress=None,
    null_set=None,
    force: bool = False,
) -> dict:
    """`run_localization` for every extracted image, then the union of their minimal sets and its effect (a job
    of its own, kind ``localize-all``; every image is its own stored job as well)."""
    cfg = cfg or LocalizeConfig()
    st = store if store is not None else store_mod.get_store()
    ids = extracted_ids(adapter, image_set, cfg, st)
    spec = job_spec(adapter, image_set, "*", cfg, ids)

    def fn(ctx):
        def p(f, m):
            ctx.check()
            ctx.progress(f, m)
            if on_progress is not None:
                on_progress(f, m)

        return {}, _localize_all(adapter, image_set, cfg, ids, ctx.store, p, null_set)

    _, meta = jobs.run_job(ALL_KIND, spec, fn, store=st, version=ALL_VERSION, force=force)
    return {**meta, "store_key": st.key(ALL_KIND, spec, ALL_VERSION)}


def localize_all_key(
    adapter: IARAdapter, image_set: data.ImageSet, cfg: LocalizeConfig | None, ids: Sequence[str], store=None
) -> str:
    st = store if store is not None else store_mod.get_store()
    return st.key(ALL_KIND, job_spec(adapter, image_set, "*", cfg or LocalizeConfig(), ids), ALL_VERSION)


def _localize_all(adapter, image_set, cfg, ids, st, on_progress, null_set) -> dict:
    per = []
    for i, image_id in enumerate(ids):

        def p(f, m, i=i, image_id=image_id):
            if on_progress is not None:
                on_progress((i + f) / max(1, len(ids)), f"{image_id}: {m}")

        per.append(
            run_localization(adapter, image_set, image_id, cfg, others=ids, null_set=null_set, store=st, on_progress=p)
        )
    found = [r for r in per if r.get("n_min")]
    union = units_dict([tuple(u) for r in found for u in r["units"]])
    n_union = sum(len(u) for u in union.values())
    out = {
        "images": [
            {
                k: r.get(k)
                for k in (
                    "image",
                    "n_min",
                    "random_flips",
                    "random_draws",
                    "collateral",
                    "margin_before",
                    "planted",
                    "count",
                    "kind",
                    "store_key",
                )
            }
            for r in per
        ],
        "n_extracted": len(ids),
        "n_localized": len(found),
        "n_units_total": per[0]["n_units_total"] if per else 0,
        "union_units": n_union,
        "union_share": n_union / per[0]["n_units_total"] if per else 0.0,
        "n_min_median": float(np.median([r["n_min"] for r in found])) if found else None,
        "random_flips_total": int(sum(r["random_flips"] or 0 for r in found)),
        "random_draws_total": int(sum(r["random_draws"] or 0 for r in found)),
    }
    tops = [[tuple(t[:2]) for t in r["attribution"]["top"]] for r in found]
    pairs = [(a, b) for a in range(len(tops)) for b in range(a + 1, len(tops))]
    out["jaccard_top32_mean"] = float(np.mean([jaccard(tops[a], tops[b]) for a, b in pairs])) if pairs else None
    if ids and n_union:
        pos = {k: i for i, k in enumerate(image_set.ids)}
        judge = make_judge(adapter, image_set, [pos[k] for k in ids], cfg, st)
        after = judge.extracted(_edit(union, cfg))
        out["union_effect"] = {
            "extracted_before": len(ids),
            "extracted_after": int(after.sum()),
            "still_extracted": [k for k, a in zip(ids, after) if a],
        }
    return out
