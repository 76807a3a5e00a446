"""Streaming UnitMem for IARs (METHOD.md sections 2 and 3).

For every unit u (block b, hidden unit j of the MLP) and position group G (a set of flat token indices,
e.g. one VAR scale), over the N images x of the data selection D':

    mu_u,G(x)   = mean over the A views of x and the rows t predicting a token of G of |a_u(t)|
    mu_max      = max_x mu_u,G(x),  k = argmax_x
    mu_rest     = mean (default) or median of mu_u,G(x) over the other N - 1 images
    UnitMem     = (mu_max - mu_rest) / (mu_max + mu_rest)   in [0, 1]; 0 when both are 0

The mean variant streams: per unit and group only a running max, argmax, sum (and the top-k images of
the coarse groups) are kept, so memory is O(units x groups) whatever N is. The median variant cannot
stream exactly; it spills mu to a memory-mapped file on disk ([N, G, U] per block, never held in RAM)
and reduces it block by block at the end.

In the same pass, view 0 of every image is the image itself (views 1..A-1 are augmented), and its
teacher-forced top-1 correctness per token gives the per-image memorization score of section 3.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from iarmem_core import backends, data, hooks, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter, PositionGroup
from iarmem_core.extraction.config import default_prefix
from iarmem_core.registry import get_spec

REST_MODES = ("mean", "median", "class")
MAX_ACCUM_MB = 1024  # the per-block accumulator [blocks, B, G, U] stays under this (fewer images per block if not)


@dataclass(frozen=True)
class UnitMemConfig:
    """Options of a UnitMem pass; every field is part of the result's store key."""

    n_augs: int = 10  # A views per image; view 0 is the image itself (finite families: see exact_views)
    augmentation: str = "default"  # "default" = the model's training augmentation (spec), or a data.py name
    # mu_rest: "mean" of the other images (streams), "median" (spills to disk), or "class": the mean over the other
    # images of the argmax image's class (a class-controlled UnitMem: 0 where a group sees only the class)
    rest: str = "mean"
    exact_views: bool = True  # finite augmentation families (none, flip) use every member once, not random draws
    block_images: int = 16  # images per reduction block: the fixed order that makes results batch-invariant
    group_kinds: tuple[str, ...] = ("scale",)  # always includes "scale"; "row" / "position" refine it
    detail_scales: tuple[int, ...] | None = None  # scales that get row/position groups; None = all
    top_images: int = 5  # images kept per (unit, scale group): the one it fires for most, and the next
    batch_size: int = 16
    dtype: str = "fp32"  # "fp32" (reference) or "bf16" (GPU)
    seed: int = 0
    max_class_sums_mb: int = 4096  # rest="class" keeps [classes, blocks, G, U] float64 sums; refuse above this

    def __post_init__(self) -> None:
        if self.rest not in REST_MODES:
            raise ValueError(f"rest must be one of {REST_MODES}, got {self.rest!r}")
        if self.n_augs < 1:
            raise ValueError("n_augs must be >= 1")
        if self.block_images < 1:
            raise ValueError(f"block_images must be >= 1, got {self.block_images}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        kinds = tuple(dict.fromkeys(("scale",) + tuple(self.group_kinds)))
        object.__setattr__(self, "group_kinds", kinds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group_kinds"] = list(self.group_kinds)
        d["detail_scales"] = None if self.detail_scales is None else list(self.detail_scales)
        d.pop("max_class_sums_mb")  # a memory limit only: never changes a result
        d.pop("batch_size")
        return d


def default_config(model, detail: bool = False, **overrides) -> UnitMemConfig:
    """The default UnitMem pass of a model (a registry name, ModelSpec or adapter), shared by the CLI and the app.

    Overview (the heatmap, the unit ranking, the edits): one group per scale, plus each row of the token grid
    for next-token models (one "scale" there covers the whole image). `detail=True` adds every position as a
    group (the token-grid view). `overrides` replace fields (n_augs, rest, seed, ...).
    """
    spec = getattr(model, "spec", model)
    if isinstance(spec, str):
        spec = get_spec(spec)
    kinds = ("scale",) if spec.family == "var" else ("scale", "row")
    if detail:
        kinds = kinds + ("position",)
    return replace(UnitMemConfig(group_kinds=kinds), **overrides)


def unitmem_from_stats(mu_max: torch.Tensor, mu_rest: torch.Tensor) -> torch.Tensor:
    """(mu_max - mu_rest) / (mu_max + mu_rest), defined as 0 where both are 0."""
    den = mu_max + mu_rest
    out = (mu_max - mu_rest) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, out, torch.zeros_like(out)).clamp_(0.0, 1.0)


def median_rest(mu_NGU: torch.Tensor, argmax_GU: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Median over images of mu with the argmax image left out (numpy convention: mean of the two middle).

    Works on chunks of units so that a large N never needs more than N x G x chunk floats at once.
    """
    n = mu_NGU.shape[0]
    if n < 2:
        return torch.zeros_like(mu_NGU[0])
    m = n - 1
    out = torch.empty(mu_NGU.shape[1:], dtype=mu_NGU.dtype)
    for u0 in range(0, mu_NGU.shape[-1], chunk):
        x = mu_NGU[..., u0 : u0 + chunk].clone()
        # the argmax is the largest value: push exactly that one copy to the end and drop it
        x.scatter_(0, argmax_GU[..., u0 : u0 + chunk].long().unsqueeze(0), float("inf"))
        srt = x.sort(dim=0).values[:m]
        out[..., u0 : u0 + chunk] = srt[m // 2] if m % 2 else 0.5 * (srt[m // 2 - 1] + srt[m // 2])
    return out


def brute_force_unitmem(mu_NGU: torch.Tensor, rest: str = "mean") -> dict[str, torch.Tensor]:
    """Reference implementation from the full [N, G, U] matrix (tests and small data only)."""
    mu_max, argmax = mu_NGU.max(dim=0)
    n = mu_NGU.shape[0]
    if rest == "mean":
        mu_rest = (mu_NGU.sum(0) - mu_max) / max(n - 1, 1)
    else:
        mu_rest = median_rest(mu_NGU, argmax)
    return {"unitmem": unitmem_from_stats(mu_max, mu_rest), "mu_max": mu_max, "argmax": argmax, "mu_rest": mu_rest}


@dataclass
class _GroupPlan:
    groups: list[PositionGroup]
    scale_group_ids: list[int]  # indices (into groups) of the "scale" kind groups
    member_NG: torch.Tensor  # [n_tokens, G] float: 1 where flat token n belongs to group g
    visible_G: torch.Tensor  # [G] long: the rows of group g see the class and the first visible_G[g] flat tokens

    def input_hashes(self, flat_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """[B, G] int64: a 64-bit hash of what the rows of each group see (class label + visible tokens), so the
        number of distinct inputs per group over D' can be counted (VAR 1x1: one per class)."""
        tok = flat_BN.to(torch.int64).numpy().astype(np.uint64)
        B, N = tok.shape
        h = np.empty((B, N + 1), np.uint64)
        h[:, 0] = labels_B.numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
        with np.errstate(over="ignore"):
            for n in range(N):  # a polynomial rolling hash mod 2^64 of (label, tok_0, ..., tok_{n-1})
                h[:, n + 1] = h[:, n] * np.uint64(1_000_003) + tok[:, n] + np.uint64(1)
        return torch.from_numpy(h[:, self.visible_G.numpy()].view(np.int64).copy())

    def weights(self, target_index_T: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[T, G] weights that average the rows of each group present in this call (0 for absent groups)."""
        valid = target_index_T >= 0
        rows = torch.zeros(target_index_T.shape[0], self.member_NG.shape[1])
        rows[valid] = self.member_NG[target_index_T[valid].cpu()]
        cnt = rows.sum(0, keepdim=True)
        w = rows / torch.where(cnt > 0, cnt, torch.ones_like(cnt))
        return w.to(device, dtype)

    def reducer(self, target_index_T: torch.Tensor, device: torch.device, dtype: torch.dtype) -> _GroupReducer:
        """The group means of this call's rows, split into one-row groups (a gather) and the rest (a matmul).

        Per-position groups are most of the groups of a detailed pass; as columns of a dense [T, G] matmul
        they cost as much as the transformer's own MLPs on a small model. A gather costs next to nothing.
        """
        w = self.weights(target_index_T, torch.device("cpu"), torch.float32)
        nz = w > 0
        single = nz.sum(0) == 1
        single_g = torch.nonzero(single).flatten()
        multi_g = torch.nonzero(nz.any(0) & ~single).flatten()
        return _GroupReducer(
            single_g.to(device),
            nz[:, single_g].float().argmax(0).to(device),
            multi_g.to(device),
            w[:, multi_g].T.contiguous().to(device, dtype),
        )


def _runs(g: torch.Tensor, r: torch.Tensor | None = None, most: int = 16) -> list[tuple[int, int, int]] | None:
    """(g0, r0, n) runs where groups g0.. take rows r0.. one to one (both step by 1), or None beyond `most` runs.
    `r` None: the groups' own order 0, 1, ... (the rows of a matmul's output)."""
    gl = g.tolist()
    rl = list(range(len(gl))) if r is None else r.tolist()
    runs: list[tuple[int, int, int]] = []
    for gi, ri in zip(gl, rl):
        if runs and gi == runs[-1][0] + runs[-1][2] and ri == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((gi, ri, 1))
    return runs if len(runs) <= most else None


@dataclass
class _GroupReducer:
    single_g: torch.Tensor  # [Gs] groups with exactly one row in this call
    single_row: torch.Tensor  # [Gs] that row
    multi_g: torch.Tensor  # [Gm] groups with several rows
    w_multi_GT: torch.Tensor  # [Gm, T] their averaging weights

    def __post_init__(self) -> None:
        # groups and rows in a few aligned runs (the usual layout: a scale's positions in order) add as slices,
        # without the gather's copy; the sums are the same element by element (one add per element)
        self.single_runs = _runs(self.single_g, self.single_row)
        self.multi_runs = _runs(self.multi_g)

    def add_into(self, out_BGU: torch.Tensor, abs_BTU: torch.Tensor) -> None:
        """out[:, g, :] += mean over the rows of group g of abs_BTU (groups absent from the call: nothing)."""
        if self.single_g.numel():
            if self.single_runs is not None:
                for g0, r0, n in self.single_runs:
                    out_BGU[:, g0 : g0 + n].add_(abs_BTU[:, r0 : r0 + n])
            else:
                out_BGU.index_add_(1, self.single_g, abs_BTU.index_select(1, self.single_row).to(out_BGU.dtype))
        if self.multi_g.numel():
            means = torch.matmul(self.w_multi_GT, abs_BTU).to(out_BGU.dtype)
            if self.multi_runs is not None:
                for g0, r0, n in self.multi_runs:
                    out_BGU[:, g0 : g0 + n].add_(means[:, r0 : r0 + n])
            else:
                out_BGU.index_add_(1, self.multi_g, means)


def plan_groups(adapter: IARAdapter, cfg: UnitMemConfig) -> _GroupPlan:
    groups = adapter.position_groups(kinds=cfg.group_kinds, scales=None)
    if cfg.detail_scales is not None:
        groups = [g for g in groups if g.kind == "scale" or g.scale in cfg.detail_scales]
    member = torch.zeros(adapter.n_tokens, len(groups))
    for gi, g in enumerate(groups):
        member[g.index, gi] = 1.0
    scale_ids = [i for i, g in enumerate(groups) if g.kind == "scale"]
    if cfg.detail_scales is not None:
        bad = [s for s in cfg.detail_scales if not 0 <= s < len(adapter.token_grids)]
        if bad:
            raise ValueError(
                f"detail_scales {bad} out of range: {adapter.spec.name} has scales 0..{len(adapter.token_grids) - 1}"
            )
    # what a group's rows see: VAR (block-causal over scales) the tokens of the earlier scales; next-token models
    # the tokens before the group's last position
    if len(adapter.token_grids) > 1:
        starts = [sl.start for sl in adapter.scale_slices]
        visible = [starts[g.scale] for g in groups]
    else:
        visible = [int(g.index.max()) for g in groups]
    return _GroupPlan(groups, scale_ids, member, torch.tensor(visible, dtype=torch.long))


@dataclass
class UnitMemState:
    """Running statistics of a pass (everything needed to resume or finish it).

    The reduction has a fixed order, so a result does not depend on batch size, resume points, backend or
    worker count: images are reduced in aligned blocks of `cfg.block_images` (block k = images
    [k * block_images, (k + 1) * block_images)), each block's statistics are computed on their own
    (`UnitMemPass.block_stats`) and merged into the running state in block order (`UnitMemPass.merge`):
    max keeps the earlier image on ties (lowest index wins), sums are float64 and added block after block,
    the top-K keeps (value descending, index ascending).
    """

    n_seen: int  # images merged so far (always a multiple of block_images, or N)
    max_LGU: torch.Tensor  # [blocks, G, U]
    argmax_LGU: torch.Tensor  # [blocks, G, U] int64 (position in the selection)
    ties_LGU: torch.Tensor  # [blocks, G, U] int32: how many images reach the max exactly
    sum_LGU: torch.Tensor  # [blocks, G, U] float64
    topv_LKSU: torch.Tensor  # [blocks, K, S, U] top-K mu over images for the S scale groups
    topi_LKSU: torch.Tensor  # [blocks, K, S, U] int64
    class_sum_CLGU: torch.Tensor  # [C, blocks, G, U] float64 per-class sums (rest="class"), else [0, ...]
    class_count_C: torch.Tensor  # [C] int64 images per class seen
    correct_NT: torch.Tensor  # [N, n_tokens] uint8: teacher-forced top-1 correct on the un-augmented view
    input_hash_NG: torch.Tensor  # [N, G] int64: hash of what the rows of group g see (class + earlier tokens)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in asdict(self).items() if isinstance(v, torch.Tensor)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], n_seen: int) -> UnitMemState:
        return cls(n_seen=n_seen, **{k: torch.from_numpy(np.array(v)) for k, v in a.items()})


@dataclass
class BlockStats:
    """The statistics of one block of consecutive images [start, start + B) (what a worker returns)."""

    start: int
    n: int
    max_LGU: torch.Tensor
    argmax_LGU: torch.Tensor  # global image positions
    ties_LGU: torch.Tensor
    sum_LGU: torch.Tensor  # float64, images added one after another in index order
    topv_LKSU: torch.Tensor
    topi_LKSU: torch.Tensor
    class_sum_CLGU: torch.Tensor
    class_count_C: torch.Tensor
    correct_BT: torch.Tensor
    input_hash_BG: torch.Tensor
    mu_BLGU: torch.Tensor | None = None  # per-image mu, only for the median variant (spilled to disk)

    def to(self, device: torch.device | str) -> BlockStats:
        return BlockStats(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


def _max_first_ties(x_LBGU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along dim 1: (max, the first index holding it, how many hold it), equal to ``x.max(dim=1)`` and its tie
    count. Built from amax and one comparison: on the CPU ``max(dim=1)`` with indices takes ~13 ms on a
    [8, 16, 136, 384] block (demo-var with position groups), this ~5 ms. NaN anywhere: max(dim=1) itself."""
    mx = x_LBGU.amax(dim=1)
    if torch.isnan(mx).any():
        mx, arg = x_LBGU.max(dim=1)
        return mx, arg, (x_LBGU == mx.unsqueeze(1)).sum(dim=1, dtype=torch.int32)
    eq = x_LBGU == mx.unsqueeze(1)
    B = x_LBGU.shape[1]
    # the first holder b has the largest weight B - b among the holders (uint8 weights: the fastest, B < 256)
    wdt = torch.uint8 if B < 2**8 else torch.int32
    w = torch.arange(B, 0, -1, device=x_LBGU.device, dtype=wdt).view(1, B, 1, 1)
    first = B - (eq.to(wdt) * w).amax(dim=1).long()
    return mx, first, eq.sum(dim=1, dtype=torch.int32)


def _stable_topk(values: torch.Tensor, index: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along `dim` by (value descending, index ascending); `values`/`index` must already be ordered by index
    ascending among equal values along `dim` (true for [running top-K; next images])."""
    order = torch.sort(values, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return values.gather(dim, order), index.gather(dim, order)


class UnitMemPass:
    """A resumable streaming UnitMem pass over N images.

    Feed it in any batches (`step`); it reduces aligned blocks of `cfg.block_images` images, holding back an
    incomplete block until the rest arrives (or `finish`), so the arrays are bit-identical for every batch
    size. A distributed run computes `block_stats` of blocks elsewhere and `merge`s them in block order.
    """

    def __init__(
        self,
        adapter: IARAdapter,
        n_images: int,
        cfg: UnitMemConfig,
        spill_dir: str | os.PathLike | None = None,
        labels: Sequence[int] | None = None,
        stats_only: bool = False,
    ):
        """`stats_only`: a worker's pass that only computes `block_stats` (no spill file for the median)."""
        self.adapter, self.n, self.cfg = adapter, n_images, cfg
        self.augmentation = adapter.spec.train_augmentation if cfg.augmentation == "default" else cfg.augmentation
        data.parse_augmentation(self.augmentation)  # fail early on a bad name
        self.views = view_plan(self.augmentation, cfg.n_augs, cfg.exact_views)
        self.plan = plan_groups(adapter, cfg)
        self.blocks = [s.block for s in adapter.unit_sites()]
        self.n_units = adapter.n_units
        self.n_classes = adapter.num_classes
        G, U, L = len(self.plan.groups), self.n_units, len(self.blocks)
        S, K = len(self.plan.scale_group_ids), min(cfg.top_images, n_images)
        # images per reduction block: cfg.block_images, fewer when the accumulator would not fit (a function of the
        # model and the groups only, so the order stays fixed)
        per_image = L * G * U * 4
        self.block = max(1, min(cfg.block_images, MAX_ACCUM_MB * 2**20 // per_image))
        C = self.n_classes if cfg.rest == "class" else 0
        if C:
            need = C * L * G * U * 8
            if need > cfg.max_class_sums_mb * 2**20:
                raise ValueError(
                    f"rest='class' keeps per-class sums: {C} classes x {L} blocks x {G} groups x {U} units = "
                    f"{need / 2**30:.1f} GiB, above the limit of {cfg.max_class_sums_mb} MB. Use fewer groups "
                    f"(--detail none), or raise max_class_sums_mb if the memory is there."
                )
        dev = adapter.device
        self.state = UnitMemState(
            n_seen=0,
            max_LGU=torch.full((L, G, U), -1.0, device=dev),
            argmax_LGU=torch.zeros((L, G, U), dtype=torch.long, device=dev),
            ties_LGU=torch.zeros((L, G, U), dtype=torch.int32, device=dev),
            sum_LGU=torch.zeros((L, G, U), dtype=torch.float64, device=dev),
            topv_LKSU=torch.full((L, K, S, U), -1.0, device=dev),
            topi_LKSU=torch.zeros((L, K, S, U), dtype=torch.long, device=dev),
            class_sum_CLGU=torch.zeros((C, L, G, U), dtype=torch.float64, device=dev),
            class_count_C=torch.zeros(C, dtype=torch.long),
            correct_NT=torch.zeros((n_images, adapter.n_tokens), dtype=torch.uint8),
            input_hash_NG=torch.zeros((n_images, G), dtype=torch.long),
        )
        self._pending: list[tuple[torch.Tensor, torch.Tensor, list]] = []  # an incomplete block, held back
        self._spill: np.memmap | None = None
        self._spill_path: Path | None = None
        if cfg.rest == "median" and not stats_only:
            d = Path(spill_dir) if spill_dir is not None else Path(tempfile.mkdtemp(prefix="iarmem-unitmem-"))
            d.mkdir(parents=True, exist_ok=True)
            self._spill_path = d / "mu_NLGU.f32"
            mode = "r+" if self._spill_path.exists() else "w+"
            self._spill = np.memmap(self._spill_path, dtype=np.float32, mode=mode, shape=(n_images, L, G, U))

    # ---- resume --------------------------------------------------------------------------------
    def load_state(self, state: UnitMemState) -> None:
        dev = self.adapter.device
        on_dev = ("max_LGU", "argmax_LGU", "ties_LGU", "sum_LGU", "topv_LKSU", "topi_LKSU", "class_sum_CLGU")
        kw = {
            f: (getattr(state, f).to(dev) if f in on_dev else getattr(state, f).cpu())
            for f in (
                "max_LGU",
                "argmax_LGU",
                "ties_LGU",
                "sum_LGU",
                "topv_LKSU",
                "topi_LKSU",
                "class_sum_CLGU",
                "class_count_C",
                "correct_NT",
                "input_hash_NG",
            )
        }
        if state.n_seen % self.block and state.n_seen != self.n:
            raise ValueError(
                f"a UnitMem state must end on a block boundary ({self.block} images); this one has {state.n_seen}"
            )
        self.state = UnitMemState(state.n_seen, **kw)
        self._pending = []

    @property
    def n_fed(self) -> int:
        """Images fed so far (merged plus held back in an incomplete block)."""
        return self.state.n_seen + sum(len(k) for _, _, k in self._pending)

    # ---- feeding -------------------------------------------------------------------------------
    def step(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, keys: Sequence[int | str]) -> None:
        """Consume the next images (they start at position `n_fed` of the selection).

        `keys` (e.g. image ids) seed each image's views. Complete blocks are reduced at once; the images of an
        incomplete block are held back, so the result is the same whatever the batch sizes are.
        """
        if self.n_fed + images_B3HW.shape[0] > self.n:
            raise ValueError(
                f"{images_B3HW.shape[0]} images past the end of the selection "
                f"({self.n_fed} + {images_B3HW.shape[0]} > {self.n})"
            )
        pending = self._pending + [(images_B3HW, labels_B, list(keys))]
        blk = self.block
        while True:
            have = sum(len(k) for _, _, k in pending)
            end = min(self.n, (self.state.n_seen // blk + 1) * blk)
            if self.state.n_seen + have < end:
                self._pending = pending
                return
            x = torch.cat([p[0] for p in pending])
            y = torch.cat([p[1] for p in pending])
            ks = [k for p in pending for k in p[2]]
            take = end - self.state.n_seen
            # the block is merged first: if computing it fails (out of memory), nothing fed is lost or moved
            self.merge(self.block_stats(x[:take], y[:take], ks[:take], self.state.n_seen))
            pending = [(x[take:], y[take:], ks[take:])] if len(ks) > take else []
            self._pending = pending
            if not pending:
                return

    @torch.no_grad()
    def block_stats(
        self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, keys: Sequence[int | str], start: int
    ) -> BlockStats:
        """The statistics of the images [start, start + B) (one block), computed on their own."""
        cfg = self.cfg
        B = images_B3HW.shape[0]
        L, G, U = len(self.blocks), len(self.plan.groups), self.n_units
        mu_LBGU, correct_BT, hash_BG = self._mu(images_B3HW, labels_B, keys)
        max_LGU, arg_LGU, ties_LGU = _max_first_ties(mu_LBGU)
        sum_LGU = torch.zeros((L, G, U), dtype=torch.float64, device=mu_LBGU.device)
        for b in range(B):  # one image after another: the float64 sum has a fixed order
            sum_LGU += mu_LBGU[:, b].double()
        sidx = torch.tensor(self.plan.scale_group_ids, device=mu_LBGU.device)
        K = self.state.topv_LKSU.shape[1]
        v = mu_LBGU.index_select(2, sidx)
        ids = torch.arange(start, start + B, device=mu_LBGU.device).view(1, B, 1, 1).expand_as(v)
        k = min(K, B)
        topv, topi = _stable_topk(v, ids, k, dim=1)
        C = self.state.class_sum_CLGU.shape[0]
        csum = torch.zeros((C, L, G, U), dtype=torch.float64, device=mu_LBGU.device)
        ccount = torch.zeros(C, dtype=torch.long)
        for b in range(B) if C else ():
            c = int(labels_B[b])
            csum[c] += mu_LBGU[:, b].double()
            ccount[c] += 1
        return BlockStats(
            start,
            B,
            max_LGU,
            arg_LGU + start,
            ties_LGU,
            sum_LGU,
            topv,
            topi,
            csum,
            ccount,
            correct_BT,
            hash_BG,
            mu_LBGU.transpose(0, 1).contiguous() if cfg.rest == "median" else None,
        )

    def _mu(
        self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, keys: Sequence[int | str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu [L, B, G, U]: mean over the views and the rows of each group of |unit activation|, teacher-forced
        top-1 correctness [B, N] of view 0, input hashes [B, G] of view 0)."""
        ad, cfg = self.adapter, self.cfg
        B = images_B3HW.shape[0]
        L, G, U = len(self.blocks), len(self.plan.groups), self.n_units
        block_pos = {b: i for i, b in enumerate(self.blocks)}
        mu_LBGU = torch.zeros((L, B, G, U), device=ad.device, dtype=torch.float32)
        r_cache: dict[bytes, _GroupReducer] = {}

        def on_units(block: int, acts_BTU: torch.Tensor, info: hooks.CallInfo | None) -> None:
            ti = info.target_index if info is not None else torch.arange(acts_BTU.shape[1])
            key = ti.cpu().numpy().tobytes()
            r = r_cache.get(key)
            if r is None:
                r = r_cache[key] = self.plan.reducer(ti, acts_BTU.device, acts_BTU.dtype)
            # mean over the rows of each group of |a|: [B, T, U] -> [B, G, U]
            r.add_into(mu_LBGU[block_pos[block]], acts_BTU.abs())

        labels_B = labels_B.to(ad.device)
        autocast = torch.autocast(ad.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else _null()
        n_views = 0
        for v, view in enumerate(self.views_of(images_B3HW, keys)):
            tokens = ad.tokenize(view)
            with hooks.capture(ad.transformer, on_units), autocast:
                logits_BNV = ad.teacher_forced_logits(tokens, labels_B)
            if v == 0:
                flat_BN = ad.flatten(tokens)
                correct_BN = (logits_BNV.argmax(-1) == flat_BN).to(torch.uint8).cpu()
                hash_BG = self.plan.input_hashes(flat_BN.cpu(), labels_B.cpu())
            n_views += 1
        mu_LBGU /= n_views
        return mu_LBGU, correct_BN, hash_BG

    def views_of(self, images_B3HW: torch.Tensor, keys: Sequence[int | str]) -> Iterator[torch.Tensor]:
        """The views this pass sees of a batch: view 0 is the image itself; then the exact family (flip: the
        mirror; `view_plan`) or seeded random views. A cost baseline iterates the same ones (bench/unitmem.py)."""
        if self.views["exact"]:
            for op in self.views["ops"]:
                yield data.apply_view(images_B3HW, op)
            return
        yield images_B3HW
        if self.views["n"] > 1:
            v_BV3HW = data.augment_views(images_B3HW.cpu(), self.augmentation, self.views["n"] - 1, self.cfg.seed, keys)
            for v in range(self.views["n"] - 1):
                yield v_BV3HW[:, v]

    def merge(self, bs: BlockStats) -> None:
        """Fold a block's statistics into the running state; blocks must come in order."""
        st = self.state
        if bs.start != st.n_seen:
            raise ValueError(f"blocks must be merged in order: expected the block at {st.n_seen}, got {bs.start}")
        bs = bs.to(st.max_LGU.device)
        better = bs.max_LGU > st.max_LGU
        same = bs.max_LGU == st.max_LGU
        st.max_LGU = torch.where(better, bs.max_LGU, st.max_LGU)
        st.argmax_LGU = torch.where(better, bs.argmax_LGU, st.argmax_LGU)
        st.ties_LGU = torch.where(better, bs.ties_LGU, torch.where(same, st.ties_LGU + bs.ties_LGU, st.ties_LGU))
        st.sum_LGU += bs.sum_LGU
        K = st.topv_LKSU.shape[1]
        st.topv_LKSU, st.topi_LKSU = _stable_topk(
            torch.cat([st.topv_LKSU, bs.topv_LKSU], dim=1), torch.cat([st.topi_LKSU, bs.topi_LKSU], dim=1), K, dim=1
        )
        if st.class_sum_CLGU.shape[0]:
            st.class_sum_CLGU += bs.class_sum_CLGU
            st.class_count_C += bs.class_count_C.cpu()
        st.correct_NT[bs.start : bs.start + bs.n] = bs.correct_BT.cpu()
        st.input_hash_NG[bs.start : bs.start + bs.n] = bs.input_hash_BG.cpu()
        if self._spill is not None and bs.mu_BLGU is not None:
            self._spill[bs.start : bs.start + bs.n] = bs.mu_BLGU.float().cpu().numpy()
            self._spill.flush()
        st.n_seen = bs.start + bs.n

    # ---- finish ----------------------------------------------------------------------------------
    def finish(self) -> dict[str, np.ndarray]:
        """UnitMem and its statistics; arrays with a leading block axis ([blocks, G, U] etc.)."""
        st = self.state
        if self._pending and self.n_fed == self.n:
            x = torch.cat([p[0] for p in self._pending])
            y = torch.cat([p[1] for p in self._pending])
            ks = [k for p in self._pending for k in p[2]]
            self._pending = []
            self.merge(self.block_stats(x, y, ks, st.n_seen))
        if st.n_seen != self.n:
            raise RuntimeError(f"pass not complete: {st.n_seen} of {self.n} images seen")
        mu_max = st.max_LGU.float()
        if self.cfg.rest == "mean":
            mu_rest = ((st.sum_LGU - st.max_LGU.double()) / max(self.n - 1, 1)).float()
        elif self.cfg.rest == "class":
            labels = torch.as_tensor(self._labels_of_argmax(), device=st.max_LGU.device)  # [L, G, U] class
            csum = st.class_sum_CLGU.gather(0, labels.unsqueeze(0)).squeeze(0)
            ccount = st.class_count_C.to(st.max_LGU.device)[labels]
            mu_rest = ((csum - st.max_LGU.double()) / (ccount - 1).clamp(min=1)).float()
        else:
            assert self._spill is not None
            mu_rest = torch.empty_like(mu_max)
            for li in range(len(self.blocks)):
                mu_NGU = torch.from_numpy(np.ascontiguousarray(self._spill[:, li]))
                mu_rest[li] = median_rest(mu_NGU, st.argmax_LGU[li].cpu()).to(mu_rest.device)
        um = unitmem_from_stats(mu_max, mu_rest)
        out = {
            "unitmem_LGU": um,
            "mu_max_LGU": mu_max,
            "mu_rest_LGU": mu_rest,
            "argmax_LGU": st.argmax_LGU,
            "argmax_ties_LGU": st.ties_LGU,
            "top_images_LKSU": st.topi_LKSU,
            "top_mu_LKSU": st.topv_LKSU,
            "correct_NT": st.correct_NT,
            "distinct_inputs_G": torch.tensor(
                [len(torch.unique(st.input_hash_NG[:, g])) for g in range(st.input_hash_NG.shape[1])], dtype=torch.int32
            ),
        }
        # image indices fit int32 (a selection never has 2^31 images): halves the result's largest arrays
        for k in ("argmax_LGU", "top_images_LKSU"):
            out[k] = out[k].to(torch.int32)
        return {k: v.cpu().numpy() for k, v in out.items()}

    def set_labels(self, labels_N: Sequence[int]) -> None:
        """The labels of all N images (rest="class" needs the argmax image's class at the end)."""
        self._labels_N = np.asarray(labels_N, dtype=np.int64)

    def _labels_of_argmax(self) -> np.ndarray:
        if getattr(self, "_labels_N", None) is None:
            raise RuntimeError("rest='class' needs the labels of the selection: call set_labels(labels) first")
        return self._labels_N[self.state.argmax_LGU.cpu().numpy()]

    def cleanup(self) -> None:
        if self._spill_path is not None and self._spill_path.exists():
            del self._spill
            self._spill = None
            self._spill_path.unlink()


def view_plan(augmentation: str, n_augs: int, exact: bool = True) -> dict:
    """The views of each image: {"exact": True, "ops": [...], "n"} where the augmentation family is finite
    ("none": the image; "flip": the image and its mirror) and `exact`, so mu is the exact expectation over
    the family; else {"exact": False, "n": n_augs}: view 0 the image, n_augs - 1 seeded random views."""
    ops = data.parse_augmentation(augmentation)
    if exact and ops == []:
        return {"exact": True, "ops": ["none"], "n": 1, "rule": "the image itself (no augmentation)"}
    if exact and ops == ["flip"]:
        return {
            "exact": True,
            "ops": ["none", "flip"],
            "n": 2,
            "rule": "exact expectation over the flip family: the image and its mirror, weight 1/2 each",
        }
    return {
        "exact": False,
        "n": int(n_augs),
        "rule": f"view 0 = the image, {n_augs - 1} seeded random views of '{augmentation}'",
    }


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------------
# Summaries
def block_summaries(unitmem_LGU: np.ndarray, top_frac: float = 0.01) -> dict[str, np.ndarray]:
    """Per (block, group): mean, max and top-1% mean of UnitMem over the block's units."""
    L, G, U = unitmem_LGU.shape
    k = max(1, int(math.ceil(top_frac * U)))
    srt = np.sort(unitmem_LGU, axis=-1)
    return {"mean": unitmem_LGU.mean(-1), "max": unitmem_LGU.max(-1), "top1pct_mean": srt[..., -k:].mean(-1)}


def per_image_scores(correct_NT: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """[N, S] teacher-forced top-1 accuracy per scale (VAR) or over the given token ranges."""
    return np.stack([correct_NT[:, s].mean(axis=1) for s in slices], axis=1)


@dataclass
class UnitMemResult:
    """A finished UnitMem result: its arrays, its groups and image ids, and the questions the app and CLI ask.

    Arrays (leading axis: blocks L; G groups, U units, K top images, S scale groups): ``unitmem_LGU``,
    ``mu_max_LGU``, ``mu_rest_LGU``, ``argmax_LGU`` (image index), ``top_images_LKSU`` / ``top_mu_LKSU``,
    ``correct_NT`` and ``block_{mean,max,top1pct_mean}_LG``. Ask through the methods rather than indexing
    the arrays by name.
    """

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    # -- identity --------------------------------------------------------------------------------------
    @property
    def store_key(self) -> str | None:
        return self.meta.get("store_key")

    @property
    def unitmem(self) -> np.ndarray:
        """[L, G, U] UnitMem of every unit and group."""
        return self.arrays["unitmem_LGU"]

    @property
    def blocks(self) -> list[int]:
        return [int(b) for b in self.meta["blocks"]]

    @property
    def n_units(self) -> int:
        """Units per block."""
        return int(self.meta["n_units"])

    @property
    def n_units_total(self) -> int:
        return len(self.blocks) * self.n_units

    @property
    def groups(self) -> list[dict]:
        return list(self.meta["groups"])

    @property
    def group_names(self) -> list[str]:
        return [g["name"] for g in self.meta["groups"]]

    def group_ids(self, kind: str) -> list[int]:
        return [i for i, g in enumerate(self.meta["groups"]) if g["kind"] == kind]

    def group_id(self, name: str) -> int:
        names = self.group_names
        if name not in names:
            raise KeyError(f"no group {name!r} in this UnitMem result; groups: {', '.join(names[:12])}")
        return names.index(name)

    @property
    def scale_group_ids(self) -> list[int]:
        return [int(g) for g in self.meta["scale_groups"]]

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in g) for g in self.meta["token_grids"]]

    @property
    def is_next_scale(self) -> bool:
        """VAR (several scales) rather than a next-token model (one grid)."""
        return len(self.meta["token_grids"]) > 1

    @property
    def image_ids(self) -> list[str]:
        return list(self.meta["image_ids"])

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in self.meta["labels"]]

    @property
    def planted(self) -> list[bool] | None:
        return self.meta.get("planted")

    @property
    def counts(self) -> list[int] | None:
        return self.meta.get("counts")

    def image_index(self, image_id: str) -> int:
        """Position of `image_id` in the data selection D' (KeyError naming the selection otherwise)."""
        try:
            return self.meta["image_ids"].index(image_id)
        except ValueError:
            raise KeyError(
                f"image {image_id!r} is not in this UnitMem result's data selection "
                f"({len(self.meta['image_ids'])} images)"
            ) from None

    def _li(self, block: int) -> int:
        blocks = self.blocks
        if int(block) not in blocks:
            raise KeyError(f"no block {block}; blocks are {blocks[0]}..{blocks[-1]}")
        return blocks.index(int(block))

    # -- views -----------------------------------------------------------------------------------------
    def heatmap_group_ids(self) -> list[int]:
        """The columns of the block x group heatmap: VAR's scales; next-token: all positions, then each row."""
        return self.scale_group_ids if self.is_next_scale else self.scale_group_ids + self.group_ids("row")

    def summary(self, stat: str = "mean") -> np.ndarray:
        """[L, G] per (block, group) summary over the block's units: mean, max or top1pct_mean."""
        key = f"block_{stat}_LG"
        if key not in self.arrays:
            raise KeyError(f"unknown summary {stat!r}: mean, max or top1pct_mean")
        return self.arrays[key]

    def position_grid(self, block: int, scale: int, stat: str = "mean") -> np.ndarray:
        """[h, w] summary per token position of one scale (needs a pass with position groups)."""
        ids = [i for i, g in enumerate(self.meta["groups"]) if g["kind"] == "position" and int(g["scale"]) == scale]
        h, w = self.token_grids[scale]
        if len(ids) != h * w:
            raise KeyError(
                f"this UnitMem result has no per-position groups for scale {h}x{w} (run it with --detail position)"
            )
        return self.summary(stat)[self._li(block), ids].reshape(h, w)

    def top_units(self, block: int, group: int, k: int = 50) -> list[int]:
        """The k units of a block with the highest UnitMem in `group` (ties: lower unit first)."""
        um = self.unitmem[self._li(block), group]
        return [int(u) for u in np.lexsort((np.arange(um.size), -um))[:k]]

    def argmax_images(self, block: int, group: int) -> np.ndarray:
        """[U] the image index each unit of the block fires for most in `group`."""
        return self.arrays["argmax_LGU"][self._li(block), group]

    def unit(self, block: int, group: int, unit: int) -> dict:
        """One unit in one group: unitmem, mu_max, mu_rest, argmax (image index) and, for scale groups, its
        top images [(image index, mu), ...] (the one it fires for most first)."""
        li = self._li(block)
        a = self.arrays
        out = {
            "block": int(block),
            "group": self.meta["groups"][group]["name"],
            "unit": int(unit),
            "unitmem": float(self.unitmem[li, group, unit]),
            "mu_max": float(a["mu_max_LGU"][li, group, unit]),
            "mu_rest": float(a["mu_rest_LGU"][li, group, unit]),
            "argmax": int(self.arrays["argmax_LGU"][li, group, unit]),
        }
        scale_ids = self.scale_group_ids
        if group in scale_ids and "top_images_LKSU" in self.arrays:
            si = scale_ids.index(group)
            out["top_images"] = [
                (int(i), float(m))
                for i, m in zip(
                    self.arrays["top_images_LKSU"][li, :, si, unit], self.arrays["top_mu_LKSU"][li, :, si, unit]
                )
            ]
        else:
            out["top_images"] = [(out["argmax"], out["mu_max"])]
        return out

    def unit_profile(self, block: int, unit: int, groups: Sequence[int] | None = None) -> np.ndarray:
        """UnitMem of one unit over `groups` (default: the heatmap's columns)."""
        ids = list(groups) if groups is not None else self.heatmap_group_ids()
        return self.unitmem[self._li(block), ids, unit]

    def units_for_image(self, image_id: str, kinds: Sequence[str] = ("scale",)) -> list[dict]:
        """The units whose argmax image is `image_id`, in the groups of `kinds`, by UnitMem (highest first):
        [{"block", "group", "unit", "unitmem"}, ...]."""
        i = self.image_index(image_id)
        rows = []
        for g in (gi for gi, gr in enumerate(self.meta["groups"]) if gr["kind"] in kinds):
            for li, u in np.argwhere(self.arrays["argmax_LGU"][:, g, :] == i):
                rows.append(
                    {
                        "block": self.blocks[int(li)],
                        "group": self.meta["groups"][g]["name"],
                        "unit": int(u),
                        "unitmem": float(self.unitmem[li, g, u]),
                    }
                )
        return sorted(rows, key=lambda r: (-r["unitmem"], r["block"], r["unit"]))

    def generated_group_ids(self, prefix_tokens: int | None = None) -> list[int]:
        """The groups the extraction attack generates (all their positions after the prefix; default: the attack's
        default prefix): VAR the scales after the prefix scales; next-token models the grid rows after the prefix
        (the whole-image group when the pass has no rows)."""
        if "groups" not in self.meta or "token_grids" not in self.meta:
            return self.scale_group_ids
        p = int(prefix_tokens if prefix_tokens is not None else self.meta.get("attack_prefix_tokens", 0))
        kinds = ("scale",) if self.is_next_scale else ("row",)
        ids = [i for i, g in enumerate(self.meta["groups"]) if g["kind"] in kinds and self._first(g) >= p]
        return ids or self.scale_group_ids

    def _first(self, g: dict) -> int:
        if "first" in g:
            return int(g["first"])
        starts = np.cumsum([0] + [h * w for h, w in self.token_grids])
        return int(starts[int(g["scale"])])  # results written before "first" was stored: scale groups only

    def unit_scores(self, combine: str | int = "generated") -> np.ndarray:
        """[L, U] one score per unit, the ranking the edits use: "generated" (default) its max over the groups the
        attack generates (`generated_group_ids`); "max" its max over every scale group (the paper's choice);
        a scale index or a group name: its score there."""
        um_LGU = np.asarray(self.unitmem)
        scale_ids = self.scale_group_ids or list(range(um_LGU.shape[1]))
        if combine == "generated":
            return um_LGU[:, self.generated_group_ids(), :].max(axis=1)
        if combine == "max":
            return um_LGU[:, scale_ids, :].max(axis=1)
        if isinstance(combine, str):
            return um_LGU[:, self.group_id(combine), :]
        c = int(combine)
        if not 0 <= c < len(scale_ids):
            raise ValueError(f"combine={c}: a scale index in 0..{len(scale_ids) - 1}, 'max', or a group name")
        return um_LGU[:, scale_ids[c], :]

    def unit_ranking(self, combine: str | int = "generated", k: int | None = None) -> list[tuple[int, int]]:
        """(block, unit) pairs by `unit_scores(combine)`, highest first (ties: lower block, then lower unit)."""
        s = self.unit_scores(combine).reshape(-1).astype(np.float64)
        order = np.lexsort((np.arange(s.size), -s))[: (k if k is not None else s.size)]
        U = self.n_units
        return [(self.blocks[int(f) // U], int(f) % U) for f in order]

    # -- ties and controls ------------------------------------------------------------------------------
    def distinct_inputs(self, group: int) -> int | None:
        """How many different inputs the rows of `group` saw over D' (class label + visible tokens, view 0):
        VAR's 1x1 scale sees only the class, so this is the number of classes there."""
        d = self.arrays.get("distinct_inputs_G")
        return None if d is None else int(d[group])

    def argmax_label(self, block: int, group: int, unit: int) -> str:
        """What the unit fires for most: an image id, or "class c" when its max is a tie among the images of one
        class that the group cannot tell apart (e.g. VAR's 1x1 scale), or "tie of n images"."""
        li = self._li(block)
        i = int(self.arrays["argmax_LGU"][li, group, unit])
        ties = self.arrays.get("argmax_ties_LGU")
        n_tie = int(ties[li, group, unit]) if ties is not None else 1
        if n_tie <= 1:
            return self.image_ids[i]
        d = self.distinct_inputs(group)
        if d is not None and d <= int(self.meta.get("n_classes", d)):
            return f"class {self.labels[i]}"
        return f"tie of {n_tie} images (first: {self.image_ids[i]})"

    @property
    def trained(self) -> list[bool] | None:
        """Per image of D': in the training data (False: a never-trained image of the null control)."""
        return self.meta.get("trained")

    def never_trained_share_of_data(self) -> float | None:
        t = self.trained
        return None if t is None else float(1.0 - np.mean(t))

    def _top_flat(self, group: int, top_frac: float) -> np.ndarray:
        um = self.unitmem[:, group, :].reshape(-1).astype(np.float64)
        k = max(1, int(round(top_frac * um.size)))
        return np.lexsort((np.arange(um.size), -um))[:k]

    def never_trained_share_among_top(self, group: int, top_frac: float = 0.1) -> float | None:
        """Among the top `top_frac` units of `group` (all blocks), the share whose argmax image was never trained.
        Beside `never_trained_share_of_data()`: equal shares mean UnitMem finds atypical images, not memorized
        ones. None without the null control."""
        t = self.trained
        if t is None or all(t):
            return None
        arg = self.arrays["argmax_LGU"][:, group, :].reshape(-1)[self._top_flat(group, top_frac)]
        return float(np.mean([not t[int(i)] for i in arg]))

    def null_share_map(self, top_frac: float = 0.1) -> np.ndarray | None:
        """[L, G] per cell: share of its top `top_frac` units (by UnitMem) whose argmax image was never trained."""
        t = self.trained
        if t is None or all(t):
            return None
        untrained = ~np.asarray(t, dtype=bool)
        L, G, U = self.unitmem.shape
        k = max(1, int(round(top_frac * U)))
        order = np.argsort(-self.unitmem, axis=-1, kind="stable")[..., :k]  # [L, G, k]
        arg = np.take_along_axis(self.arrays["argmax_LGU"], order, axis=-1)
        return untrained[arg].mean(axis=-1)

    def train_minus_null_map(self) -> np.ndarray | None:
        """[L, G] mean UnitMem of the cell's units whose argmax is a training image minus that of the units whose
        argmax was never trained (NaN where one side has no unit). Near 0: the pattern is not memorization."""
        t = self.trained
        if t is None or all(t):
            return None
        trained = np.asarray(t, dtype=bool)[self.arrays["argmax_LGU"]]
        um = self.unitmem.astype(np.float64)
        with np.errstate(invalid="ignore"):
            a = np.where(trained, um, 0).sum(-1) / trained.sum(-1)
            b = np.where(~trained, um, 0).sum(-1) / (~trained).sum(-1)
        return a - b

    def planted_among_top(self, block: int, group: int, k: int = 10) -> int | None:
        """How many of the cell's k top units fire most for a planted image (None without ground truth)."""
        if not self.planted:
            return None
        arg = self.argmax_images(block, group)
        return sum(bool(self.planted[int(arg[u])]) for u in self.top_units(block, group, k))


# ---------------------------------------------------------------------------------------------------
# The job: shared by the CLI and the app; results land in the store.
KIND = "unitmem"


def job_spec(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig) -> dict:
    """Everything that determines a UnitMem result (the store key is its hash plus the code version)."""
    return {
        "model": adapter.identity,
        "data": data.data_fingerprint(image_set),
        "config": cfg.to_dict(),
        "dtype": str(adapter.dtype),
    }


def trained_flags(image_set: data.ImageSet, adapter: IARAdapter | None = None) -> list[bool] | None:
    """Per image of D': was it in this model's training data? Demo data: its split is one the model was trained
    on (`ModelSpec.trained_splits`; twins, held-out images and, except for demo-var-ctl, the control canaries
    never were); other data: the set's "trained" meta (e.g. from `data.concat` with a never-trained folder); None
    when nothing says (an ImageFolder of training images)."""
    m = image_set.meta
    if "split" in m:
        splits = adapter.spec.trained_splits if adapter is not None else ("train",)
        return [str(v) in splits for v in m["split"]]
    if "trained" in m:
        return [bool(v) for v in m["trained"]]
    return None


def planted_flags(image_set: data.ImageSet, adapter: IARAdapter | None = None) -> list[bool] | None:
    """Per image of D': an item planted into this model's training data (demo data; None otherwise). For
    demo-var-ctl the control canaries count as planted."""
    m = image_set.meta
    if "role" in m and "split" in m:
        splits = adapter.spec.trained_splits if adapter is not None else ("train",)
        return [str(r) == "planted" and str(sp) in splits for r, sp in zip(m["role"], m["split"])]
    if "planted" in m:
        return [bool(v) for v in m["planted"]]
    return None


class UnitMemBlocks:
    """The work unit of a UnitMem pass for `backends.map_blocks`: `block_stats` of images [start, stop).

    Pickles as the model's load arguments and identity, the image set and the config; a worker loads the model
    once (`setup`, on its GPU or the CPU) and keeps it. In this process it uses the given adapter (and pass)."""

    def __init__(self, adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig, local_pass=None):
        load_args = getattr(adapter, "load_args", None)
        self.load_args = None if load_args is None else dict(load_args)
        self.identity = adapter.identity
        self.image_set, self.cfg, self.n = image_set, cfg, len(image_set)
        self._adapter, self._pass = adapter, local_pass

    def __getstate__(self) -> dict:
        if self.load_args is None:
            raise ValueError(
                "this model was not loaded with iarmem_core.adapters.load_adapter, so a worker cannot load it "
                "again: load it with load_adapter (or use the local backend)"
            )
        return {k: v for k, v in vars(self).items() if k not in ("_adapter", "_pass")}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d, _adapter=None, _pass=None)

    def setup(self) -> UnitMemPass:
        if self._pass is not None:
            return self._pass
        from iarmem_core.adapters import reload_adapter

        ad = self._adapter or reload_adapter(self.load_args, backends.worker_device(), self.identity)
        return UnitMemPass(ad, self.n, self.cfg, stats_only=True)

    def run(self, p: UnitMemPass, start: int, stop: int) -> BlockStats:
        idx = np.arange(start, stop)
        x = self.image_set.images(idx, size=p.adapter.image_size)
        y = self.image_set.labels_tensor(idx)
        bs = p.block_stats(x, y, [self.image_set.ids[i] for i in idx], start)
        return bs if self._pass is not None else bs.to("cpu")  # a worker's payload travels on the CPU


def make_job(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig):
    """The job function fn(ctx) -> (arrays, meta) of a UnitMem pass (resumable, cancellable); its blocks run on
    the job's backend (ctx.backend: this process, or the workers of a Ray cluster) and merge here in order."""

    def fn(ctx) -> tuple[dict[str, np.ndarray], dict]:
        n = len(image_set)
        # the median variant's per-image spill lives beside the store's partial state, so it survives a resume
        spill = Path(ctx.store.root) / "spill" / ctx.key if cfg.rest == "median" else None
        p = UnitMemPass(adapter, n, cfg, spill_dir=spill)
        p.set_labels(image_set.labels)
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            p.load_state(UnitMemState.from_arrays(arrays, int(meta["n_seen"])))

        report = backends.map_blocks(
            ctx,
            UnitMemBlocks(adapter, image_set, cfg, local_pass=p),
            n,
            p.block,
            start=p.state.n_seen,
            merge=lambda i, j, bs: p.merge(bs),
            batch_size=cfg.batch_size,
            what="UnitMem block",
            progress=lambda j: (j / n, f"{j}/{n} images x {p.views['n']} views"),
            save=lambda j: (p.state.arrays(), {"n_seen": p.state.n_seen}),
        )
        arrays = p.finish()
        p.cleanup()
        summ = block_summaries(arrays["unitmem_LGU"])
        arrays.update({f"block_{k}_LG": v for k, v in summ.items()})
        meta = {
            "model": adapter.describe(),
            "data": data.data_fingerprint(image_set),
            "config": cfg.to_dict(),
            "augmentation": p.augmentation,
            "views": p.views,
            "execution": report,
            "reduction": {
                "block_images": p.block,
                "order": "aligned blocks of images merged in order; max keeps "
                "the lowest image index on ties; float64 sums added image by image, block by block",
            },
            "blocks": p.blocks,
            "n_units": p.n_units,
            "groups": [
                {
                    "name": g.name,
                    "kind": g.kind,
                    "scale": g.scale,
                    "n_positions": int(g.index.numel()),
                    "first": int(g.index.min()),
                    "last": int(g.index.max()),
                }
                for g in p.plan.groups
            ],
            "attack_prefix_tokens": int(default_prefix(adapter)),
            "scale_groups": p.plan.scale_group_ids,
            "token_grids": [list(g) for g in adapter.token_grids],
            "image_ids": list(image_set.ids),
            "labels": [int(v) for v in image_set.labels],
            "planted": planted_flags(image_set, adapter),
            "counts": [int(v) for v in image_set.meta["count"]] if "count" in image_set.meta else None,
            "trained": trained_flags(image_set, adapter),
            "kinds": [str(v) for v in image_set.meta["kind"]] if "kind" in image_set.meta else None,
            "n_classes": int(adapter.num_classes),
        }
        return arrays, meta

    return fn


def result_key(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig, store=None) -> str:
    """The store key of this pass (to look a result up without running anything)."""
    st = store if store is not None else store_mod.get_store()
    return st.key(KIND, job_spec(adapter, image_set, cfg))


def load_result(store, key: str) -> UnitMemResult:
    """A stored UnitMem result by key."""
    arrays, meta = store.load(key)
    return UnitMemResult(arrays, {**meta, "store_key": key})


def run_unitmem(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: UnitMemConfig,
    store=None,
    on_progress=None,
    force: bool = False,
    backend=None,
) -> UnitMemResult:
    """Run (or load from the store) the UnitMem pass synchronously; returns the result with its key.
    `backend`: where the blocks run (iarmem_core.backends; None: this process). Never part of the key."""
    st = store if store is not None else store_mod.get_store()
    spec = job_spec(adapter, image_set, cfg)
    arrays, meta = jobs.run_job(
        KIND, spec, make_job(adapter, image_set, cfg), store=st, force=force, on_progress=on_progress, backend=backend
    )
    meta = dict(meta)
    meta["store_key"] = st.key(KIND, spec)
    return UnitMemResult(arrays, meta)


def start_unitmem(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig, store=None, backend=None):
    """Start the pass as a background job (the app); returns the job handle (a running one is reused)."""
    st = store if store is not None else store_mod.get_store()
    return jobs.start_job(
        KIND, job_spec(adapter, image_set, cfg), make_job(adapter, image_set, cfg), store=st, backend=backend
    )


def summarize(res: UnitMemResult, top: int = 10, kinds: Sequence[str] = ("scale",)) -> dict:
    """The CLI's JSON: block x group means, the top units (what they fire for), the controls, a digest of the arrays."""
    groups = res.meta["groups"]
    gids = [i for i, g in enumerate(groups) if g["kind"] in kinds]
    um = res.unitmem
    sub = um[:, gids, :]  # [L, G', U]
    flat = np.lexsort((np.arange(sub.size), -sub.reshape(-1).astype(np.float64)))[:top]
    L, G, U = sub.shape
    planted, trained = res.planted, res.trained
    top_units = []
    for f in flat:
        li, gi, u = np.unravel_index(int(f), (L, G, U))
        g = gids[gi]
        img = int(res.arrays["argmax_LGU"][li, g, u])
        top_units.append(
            {
                "block": int(res.blocks[li]),
                "unit": int(u),
                "group": groups[g]["name"],
                "unitmem": round(float(um[li, g, u]), 4),
                "argmax_image": res.argmax_label(res.blocks[li], g, int(u)),
                "planted": None if planted is None else bool(planted[img]),
                "trained": None if trained is None else bool(trained[img]),
            }
        )
    per_group = {}
    for g in gids:
        row = {"distinct_inputs": res.distinct_inputs(g)}
        if trained is not None and not all(trained):
            row["heldout_share_among_top"] = {
                "top1": res.never_trained_share_among_top(g, 0.01),
                "top10": res.never_trained_share_among_top(g, 0.10),
            }
        per_group[groups[g]["name"]] = row
    cfg = res.meta["config"]
    out = {
        "store_key": res.meta.get("store_key"),
        "n_images": len(res.image_ids),
        "blocks": len(res.blocks),
        "units_per_block": res.n_units,
        "groups": [groups[g]["name"] for g in gids],
        "augmentation": res.meta["augmentation"],
        "n_augs": cfg["n_augs"],
        "views": (res.meta.get("views") or {}).get("rule"),
        "rest": cfg["rest"],
        "block_group_mean": np.round(res.arrays["block_mean_LG"][:, gids].astype(np.float64), 5).tolist(),
        "top_units": top_units,
        "per_group": per_group,
        "generated_groups": [groups[g]["name"] for g in res.generated_group_ids()],
        "ranking_for_edits": "max of each unit's UnitMem over the generated groups (combine='generated'); "
        "the paper's max over all scales is combine='max'",
        "arrays_sha256": store_mod.arrays_sha256(res.arrays),
        "reduction": res.meta.get("reduction"),
    }
    if trained is not None and not all(trained):
        out["heldout_share_of_data"] = round(res.never_trained_share_of_data(), 4)
        out["heldout_definition"] = (
            "share of the top 1% / 10% units of a group (all blocks, by UnitMem) whose "
            "argmax image was never trained on, beside that share of D'"
        )
    if planted is not None:
        # among the top 1% units per listed group: how often is the image they fire for most a planted one?
        k = max(1, int(round(0.01 * L * U)))
        hits = []
        for g in gids:
            order = np.lexsort((np.arange(L * U), -um[:, g, :].reshape(-1).astype(np.float64)))[:k]
            imgs = res.arrays["argmax_LGU"][:, g, :].reshape(-1)[order]
            hits.extend(bool(planted[int(i)]) for i in imgs)
        out["planted_fraction_among_top_argmax"] = round(float(np.mean(hits)), 4)
        out["planted_share_of_data"] = round(float(np.mean(planted)), 4)
        out["top_argmax_definition"] = "top 1% units by UnitMem in each listed group"
    return out
