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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from iarmem_core import data, hooks, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter, PositionGroup
from iarmem_core.registry import get_spec

REST_MODES = ("mean", "median")


@dataclass(frozen=True)
class UnitMemConfig:
    """Options of a UnitMem pass; every field is part of the result's store key."""

    n_augs: int = 10  # A views per image; view 0 is the image itself
    augmentation: str = "default"  # "default" = the model's training augmentation (spec), or a data.py name
    rest: str = "mean"  # mu_rest: "mean" (streams) or "median" (spills to disk)
    group_kinds: tuple[str, ...] = ("scale",)  # always includes "scale"; "row" / "position" refine it
    detail_scales: tuple[int, ...] | None = None  # scales that get row/position groups; None = all
    top_images: int = 5  # images kept per (unit, scale group): the one it fires for most, and the next
    batch_size: int = 16
    dtype: str = "fp32"  # "fp32" (reference) or "bf16" (GPU)
    seed: int = 0
    # the per-batch accumulator is [blocks, B, G, U]; batches are split so it stays under this size
    max_accum_mb: int = 1024

    def __post_init__(self) -> None:
        if self.rest not in REST_MODES:
            raise ValueError(f"rest must be one of {REST_MODES}, got {self.rest!r}")
        if self.n_augs < 1:
            raise ValueError("n_augs must be >= 1")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        kinds = tuple(dict.fromkeys(("scale",) + tuple(self.group_kinds)))
        object.__setattr__(self, "group_kinds", kinds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group_kinds"] = list(self.group_kinds)
        d["detail_scales"] = None if self.detail_scales is None else list(self.detail_scales)
        d.pop("max_accum_mb")  # memory/speed only: never changes a result
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


@dataclass
class _GroupReducer:
    single_g: torch.Tensor  # [Gs] groups with exactly one row in this call
    single_row: torch.Tensor  # [Gs] that row
    multi_g: torch.Tensor  # [Gm] groups with several rows
    w_multi_GT: torch.Tensor  # [Gm, T] their averaging weights

    def add_into(self, out_BGU: torch.Tensor, abs_BTU: torch.Tensor) -> None:
        """out[:, g, :] += mean over the rows of group g of abs_BTU (groups absent from the call: nothing)."""
        if self.single_g.numel():
            out_BGU.index_add_(1, self.single_g, abs_BTU.index_select(1, self.single_row).to(out_BGU.dtype))
        if self.multi_g.numel():
            out_BGU.index_add_(1, self.multi_g, torch.matmul(self.w_multi_GT, abs_BTU).to(out_BGU.dtype))


def plan_groups(adapter: IARAdapter, cfg: UnitMemConfig) -> _GroupPlan:
    groups = adapter.position_groups(kinds=cfg.group_kinds, scales=None)
    if cfg.detail_scales is not None:
        groups = [g for g in groups if g.kind == "scale" or g.scale in cfg.detail_scales]
    member = torch.zeros(adapter.n_tokens, len(groups))
    for gi, g in enumerate(groups):
        member[g.index, gi] = 1.0
    scale_ids = [i for i, g in enumerate(groups) if g.kind == "scale"]
    return _GroupPlan(groups, scale_ids, member)


@dataclass
class UnitMemState:
    """Running statistics of a pass (everything needed to resume or finish it)."""

    n_seen: int
    max_LGU: torch.Tensor  # [blocks, G, U]
    argmax_LGU: torch.Tensor  # [blocks, G, U] int64 (position in the selection)
    sum_LGU: torch.Tensor  # [blocks, G, U] float64
    topv_LKSU: torch.Tensor  # [blocks, K, S, U] top-K mu over images for the S scale groups
    topi_LKSU: torch.Tensor  # [blocks, K, S, U] int64
    correct_NT: torch.Tensor  # [N, n_tokens] uint8: teacher-forced top-1 correct on the un-augmented view

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in asdict(self).items() if isinstance(v, torch.Tensor)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], n_seen: int) -> UnitMemState:
        return cls(n_seen=n_seen, **{k: torch.from_numpy(np.asarray(v)) for k, v in a.items()})


class UnitMemPass:
    """A resumable streaming UnitMem pass over N images, driven batch by batch."""

    def __init__(
        self, adapter: IARAdapter, n_images: int, cfg: UnitMemConfig, spill_dir: str | os.PathLike | None = None
    ):
        self.adapter, self.n, self.cfg = adapter, n_images, cfg
        self.augmentation = adapter.spec.train_augmentation if cfg.augmentation == "default" else cfg.augmentation
        data.parse_augmentation(self.augmentation)  # fail early on a bad name
        self.plan = plan_groups(adapter, cfg)
        self.blocks = [s.block for s in adapter.unit_sites()]
        self.n_units = adapter.n_units
        G, U, L = len(self.plan.groups), self.n_units, len(self.blocks)
        S, K = len(self.plan.scale_group_ids), min(cfg.top_images, n_images)
        dev = adapter.device
        self.state = UnitMemState(
            n_seen=0,
            max_LGU=torch.full((L, G, U), -1.0, device=dev),
            argmax_LGU=torch.zeros((L, G, U), dtype=torch.long, device=dev),
            sum_LGU=torch.zeros((L, G, U), dtype=torch.float64, device=dev),
            topv_LKSU=torch.full((L, K, S, U), -1.0, device=dev),
            topi_LKSU=torch.zeros((L, K, S, U), dtype=torch.long, device=dev),
            correct_NT=torch.zeros((n_images, adapter.n_tokens), dtype=torch.uint8),
        )
        self._spill: np.memmap | None = None
        self._spill_path: Path | None = None
        if cfg.rest == "median":
            d = Path(spill_dir) if spill_dir is not None else Path(tempfile.mkdtemp(prefix="iarmem-unitmem-"))
            d.mkdir(parents=True, exist_ok=True)
            self._spill_path = d / "mu_NLGU.f32"
            mode = "r+" if self._spill_path.exists() else "w+"
            self._spill = np.memmap(self._spill_path, dtype=np.float32, mode=mode, shape=(n_images, L, G, U))

    # ---- resume --------------------------------------------------------------------------------
    def load_state(self, state: UnitMemState) -> None:
        dev = self.adapter.device
        self.state = UnitMemState(
            state.n_seen,
            *(getattr(state, f).to(dev) for f in ("max_LGU", "argmax_LGU", "sum_LGU", "topv_LKSU", "topi_LKSU")),
            correct_NT=state.correct_NT.cpu(),
        )

    # ---- one batch -------------------------------------------------------------------------------
    def step(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, keys: Sequence[int | str]) -> None:
        """Consume the next batch (images start at position `state.n_seen` of the selection).

        `keys` (e.g. image ids) seed each image's views, so results do not depend on batching or resumes.
        A batch whose accumulator would exceed `cfg.max_accum_mb` is processed in smaller pieces.
        """
        per_image = len(self.blocks) * len(self.plan.groups) * self.n_units * 4
        chunk = max(1, int(self.cfg.max_accum_mb * 2**20 // per_image))
        for i in range(0, images_B3HW.shape[0], chunk):
            self._step(images_B3HW[i : i + chunk], labels_B[i : i + chunk], keys[i : i + chunk])

    @torch.no_grad()
    def _step(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor, keys: Sequence[int | str]) -> None:
        ad, cfg, st = self.adapter, self.cfg, self.state
        B, start = images_B3HW.shape[0], st.n_seen
        if start + B > self.n:
            raise ValueError(f"batch of {B} images past the end of the selection ({start} + {B} > {self.n})")
        L, G, U = len(self.blocks), len(self.plan.groups), self.n_units
        block_pos = {b: i for i, b in enumerate(self.blocks)}
        acc_dtype = torch.float32
        mu_LBGU = torch.zeros((L, B, G, U), device=ad.device, dtype=acc_dtype)
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
        views_BV3HW = None
        if cfg.n_augs > 1:
            views_BV3HW = data.augment_views(images_B3HW.cpu(), self.augmentation, cfg.n_augs - 1, cfg.seed, keys)
        for v in range(cfg.n_augs):
            view = images_B3HW if v == 0 else views_BV3HW[:, v - 1]
            tokens = ad.tokenize(view)
            with hooks.capture(ad.transformer, on_units), autocast:
                logits_BNV = ad.teacher_forced_logits(tokens, labels_B)
            if v == 0:
                flat = ad.flatten(tokens)
                st.correct_NT[start : start + B] = (logits_BNV.argmax(-1) == flat).to(torch.uint8).cpu()
        mu_LBGU /= cfg.n_augs
        self._update(mu_LBGU, start)
        st.n_seen = start + B

    def _update(self, mu_LBGU: torch.Tensor, start: int) -> None:
        st = self.state
        B = mu_LBGU.shape[1]
        bmax_LGU, barg_LGU = mu_LBGU.max(dim=1)
        better = bmax_LGU > st.max_LGU
        st.max_LGU = torch.where(better, bmax_LGU, st.max_LGU)
        st.argmax_LGU = torch.where(better, barg_LGU + start, st.argmax_LGU)
        st.sum_LGU += mu_LBGU.sum(dim=1, dtype=torch.float64)
        # top-K images of the scale groups: merge the running top-K with this batch
        sidx = torch.tensor(self.plan.scale_group_ids, device=mu_LBGU.device)
        cand_v = torch.cat([st.topv_LKSU, mu_LBGU.index_select(2, sidx)], dim=1)
        ids = (
            torch.arange(start, start + B, device=mu_LBGU.device)
            .view(1, B, 1, 1)
            .expand(mu_LBGU.shape[0], B, len(sidx), mu_LBGU.shape[-1])
        )
        cand_i = torch.cat([st.topi_LKSU, ids], dim=1)
        K = st.topv_LKSU.shape[1]
        st.topv_LKSU, sel = cand_v.topk(K, dim=1)
        st.topi_LKSU = cand_i.gather(1, sel)
        if self._spill is not None:
            self._spill[start : start + B] = mu_LBGU.transpose(0, 1).float().cpu().numpy()
            self._spill.flush()

    # ---- finish ----------------------------------------------------------------------------------
    def finish(self) -> dict[str, np.ndarray]:
        """UnitMem and its statistics; arrays with a leading block axis ([blocks, G, U] etc.)."""
        st = self.state
        if st.n_seen != self.n:
            raise RuntimeError(f"pass not complete: {st.n_seen} of {self.n} images seen")
        mu_max = st.max_LGU.float()
        if self.cfg.rest == "mean":
            mu_rest = ((st.sum_LGU - st.max_LGU.double()) / max(self.n - 1, 1)).float()
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
            "top_images_LKSU": st.topi_LKSU,
            "top_mu_LKSU": st.topv_LKSU,
            "correct_NT": st.correct_NT,
        }
        # image indices fit int32 (a selection never has 2^31 images): halves the result's largest arrays
        for k in ("argmax_LGU", "top_images_LKSU"):
            out[k] = out[k].to(torch.int32)
        return {k: v.cpu().numpy() for k, v in out.items()}

    def cleanup(self) -> None:
        if self._spill_path is not None and self._spill_path.exists():
            del self._spill
            self._spill = None
            self._spill_path.unlink()


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

    def unit_scores(self, combine: str | int = "max") -> np.ndarray:
        """[L, U] one score per unit: its max over the scale groups, or its score at one scale (index) or group
        (name). The ranking the edits use."""
        um_LGU = np.asarray(self.unitmem)
        scale_ids = self.scale_group_ids or list(range(um_LGU.shape[1]))
        if combine == "max":
            return um_LGU[:, scale_ids, :].max(axis=1)
        if isinstance(combine, str):
            return um_LGU[:, self.group_id(combine), :]
        c = int(combine)
        if not 0 <= c < len(scale_ids):
            raise ValueError(f"combine={c}: a scale index in 0..{len(scale_ids) - 1}, 'max', or a group name")
        return um_LGU[:, scale_ids[c], :]

    def unit_ranking(self, combine: str | int = "max", k: int | None = None) -> list[tuple[int, int]]:
        """(block, unit) pairs by `unit_scores(combine)`, highest first (ties: lower block, then lower unit)."""
        s = self.unit_scores(combine).reshape(-1).astype(np.float64)
        order = np.lexsort((np.arange(s.size), -s))[: (k if k is not None else s.size)]
        U = self.n_units
        return [(self.blocks[int(f) // U], int(f) % U) for f in order]

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


def make_job(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig):
    """The job function fn(ctx) -> (arrays, meta) of a UnitMem pass (resumable, cancellable)."""

    def fn(ctx) -> tuple[dict[str, np.ndarray], dict]:
        n = len(image_set)
        # the median variant's per-image spill lives beside the store's partial state, so it survives a resume
        spill = Path(ctx.store.root) / "spill" / ctx.key if cfg.rest == "median" else None
        p = UnitMemPass(adapter, n, cfg, spill_dir=spill)
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            p.load_state(UnitMemState.from_arrays(arrays, int(meta["n_seen"])))

        def work(start: int, stop: int) -> None:
            idx = np.arange(start, stop)
            x = image_set.images(idx, size=adapter.image_size)
            y = image_set.labels_tensor(idx)
            p.step(x, y, keys=[image_set.ids[i] for i in idx])

        jobs.run_batches(
            ctx,
            n,
            cfg.batch_size,
            work,
            start=p.state.n_seen,
            what="UnitMem batch",
            progress=lambda j: (j / n, f"{j}/{n} images x {cfg.n_augs} views"),
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
            "blocks": p.blocks,
            "n_units": p.n_units,
            "groups": [
                {"name": g.name, "kind": g.kind, "scale": g.scale, "n_positions": int(g.index.numel())}
                for g in p.plan.groups
            ],
            "scale_groups": p.plan.scale_group_ids,
            "token_grids": [list(g) for g in adapter.token_grids],
            "image_ids": list(image_set.ids),
            "labels": [int(v) for v in image_set.labels],
            "planted": [bool(v) for v in image_set.meta["planted"]] if "planted" in image_set.meta else None,
            "counts": [int(v) for v in image_set.meta["count"]] if "count" in image_set.meta else None,
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
    adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig, store=None, on_progress=None, force: bool = False
) -> UnitMemResult:
    """Run (or load from the store) the UnitMem pass synchronously; returns the result with its key."""
    st = store if store is not None else store_mod.get_store()
    spec = job_spec(adapter, image_set, cfg)
    arrays, meta = jobs.run_job(
        KIND, spec, make_job(adapter, image_set, cfg), store=st, force=force, on_progress=on_progress
    )
    meta = dict(meta)
    meta["store_key"] = st.key(KIND, spec)
    return UnitMemResult(arrays, meta)


def start_unitmem(adapter: IARAdapter, image_set: data.ImageSet, cfg: UnitMemConfig, store=None):
    """Start the pass as a background job (the app); returns the job handle (a running one is reused)."""
    st = store if store is not None else store_mod.get_store()
    return jobs.start_job(KIND, job_spec(adapter, image_set, cfg), make_job(adapter, image_set, cfg), store=st)


def summarize(res: UnitMemResult, top: int = 10, kinds: Sequence[str] = ("scale",)) -> dict:
    """The CLI's JSON: block x group means, the top units and whether their images are planted."""
    groups = res.meta["groups"]
    gids = [i for i, g in enumerate(groups) if g["kind"] in kinds]
    um = res.unitmem
    sub = um[:, gids, :]  # [L, G', U]
    flat = np.argsort(sub.reshape(-1))[::-1][:top]
    L, G, U = sub.shape
    ids, planted = res.meta["image_ids"], res.meta.get("planted")
    top_units = []
    for f in flat:
        li, gi, u = np.unravel_index(int(f), (L, G, U))
        g = gids[gi]
        img = int(res.arrays["argmax_LGU"][li, g, u])
        top_units.append(
            {
                "block": int(res.meta["blocks"][li]),
                "unit": int(u),
                "group": groups[g]["name"],
                "unitmem": round(float(um[li, g, u]), 4),
                "argmax_image": ids[img],
                "planted": None if planted is None else bool(planted[img]),
            }
        )
    out = {
        "store_key": res.meta.get("store_key"),
        "n_images": len(ids),
        "blocks": len(res.meta["blocks"]),
        "units_per_block": int(res.meta["n_units"]),
        "groups": [groups[g]["name"] for g in gids],
        "augmentation": res.meta["augmentation"],
        "n_augs": res.meta["config"]["n_augs"],
        "rest": res.meta["config"]["rest"],
        "block_group_mean": np.round(res.arrays["block_mean_LG"][:, gids].astype(np.float64), 5).tolist(),
        "top_units": top_units,
    }
    if planted is not None:
        # among the top 1% units per scale group: how often is the image they fire for most a planted one?
        k = max(1, int(round(0.01 * L * U)))
        hits = []
        for g in gids:
            order = np.argsort(um[:, g, :].reshape(-1))[::-1][:k]
            imgs = res.arrays["argmax_LGU"][:, g, :].reshape(-1)[order]
            hits.extend(bool(planted[int(i)]) for i in imgs)
        out["planted_fraction_among_top_argmax"] = round(float(np.mean(hits)), 4)
        out["planted_share_of_data"] = round(float(np.mean(planted)), 4)
        out["top_argmax_definition"] = "top 1% units by UnitMem in each listed group"
    return out
