"""1. Per-image memorization scores (METHOD.md section 3) and the choice of candidates."""

from __future__ import annotations

import numpy as np
import torch

from iarmem_core import backends, data, jobs
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.extraction import cache
from iarmem_core.extraction.config import SCORE_KIND, TAIL_TOKENS, VERSION


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
        if (
            spec.get("model") == want["model"]
            and spec.get("data") == want["data"]
            and spec.get("dtype") == want["dtype"]
            and (spec.get("config") or {}).get("dtype") == "fp32"
            and "correct_NT" in (row.get("arrays") or {})
        ):
            return row["key"]
    return None


# Every teacher-forced forward call of the scoring job is one aligned block of SCORE_BLOCK images (the last one
# shorter), on every backend and for every batch size: a transformer's forward is not batch-size invariant, so
# fixed blocks make the per-image rows bit-identical between a local run and one split over workers. (32: the
# batch of the earlier code, so its results stay valid; changing it changes results: bump VERSION.)
SCORE_BLOCK = 32


class ScoreBlocks:
    """The work unit of the scoring job for `backends.map_blocks`: accuracies [B, G] of images [start, stop).

    Pickles as the model's load arguments and identity, the image set and the images' token ids (the shared
    `tokens` cache of the attack, so every backend scores the same tokens); a worker loads the model once."""

    def __init__(self, adapter: IARAdapter, image_set: data.ImageSet, tokens_NT: np.ndarray):
        load_args = getattr(adapter, "load_args", None)
        self.load_args = None if load_args is None else dict(load_args)
        self.identity = adapter.identity
        self.image_set = image_set
        self.tokens_NT = tokens_NT
        self._adapter = adapter

    def __getstate__(self) -> dict:
        if self.load_args is None:
            raise ValueError(
                "this model was not loaded with iarmem_core.adapters.load_adapter, so a worker cannot load it "
                "again: load it with load_adapter (or use the local backend)"
            )
        d = {k: v for k, v in vars(self).items() if k != "_adapter"}
        d["tokens_NT"] = np.ascontiguousarray(self.tokens_NT)  # a memory map pickles as its values
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d, _adapter=None)

    def setup(self) -> IARAdapter:
        if self._adapter is not None:
            return self._adapter
        from iarmem_core.adapters import reload_adapter

        return reload_adapter(self.load_args, backends.worker_device(), self.identity)

    @torch.inference_mode()
    def run(self, adapter: IARAdapter, start: int, stop: int) -> np.ndarray:
        idx = np.arange(start, stop)
        flat_BN = torch.from_numpy(np.asarray(self.tokens_NT[start:stop], np.int64)).to(adapter.device)
        logits_BNV = adapter.teacher_forced_logits(adapter.unflatten(flat_BN), self.image_set.labels_tensor(idx))
        correct_BN = (logits_BNV.argmax(-1) == flat_BN).cpu().numpy()
        return accuracies_from_correct(correct_BN, adapter)


def _score_job(adapter: IARAdapter, image_set: data.ImageSet, batch_size: int):
    def fn(ctx) -> tuple[dict, dict]:
        n, G = len(image_set), len(score_groups(adapter))
        acc_NG = np.zeros((n, G), np.float32)
        start, events = 0, []
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            acc_NG[:] = arrays["acc_NG"]
            start = int(meta["n_done"])

        # the token ids come from the shared cache (a `tokens` job of its own, stored for the attack)
        tokens_NT = cache.image_tokens(
            adapter,
            image_set,
            store=ctx.store,
            batch_size=batch_size,
            on_progress=lambda f, msg: ctx.progress(0.3 * f, msg),
        )

        def merge(i: int, j: int, acc_BG: np.ndarray) -> None:
            acc_NG[i:j] = acc_BG

        report = backends.map_blocks(
            ctx,
            ScoreBlocks(adapter, image_set, tokens_NT),
            n,
            SCORE_BLOCK,
            start=start,
            merge=merge,
            batch_size=batch_size,
            events=events,
            what="teacher-forced block",
            progress=lambda j: (0.3 + 0.7 * j / n, f"scoring {j}/{n} images (teacher-forced)"),
            save=lambda j: ({"acc_NG": acc_NG}, {"n_done": j}),
        )
        gi = [g for g, _ in score_groups(adapter)].index(score_definition(adapter))
        meta = {
            "groups": [g for g, _ in score_groups(adapter)],
            "score_group": score_definition(adapter),
            "oom_events": events,
            "source": "teacher-forced pass (memscore job)",
            "image_ids": list(image_set.ids),
            "reduction": {"block_images": SCORE_BLOCK, "order": "one forward call per aligned block of images"},
            "execution": report,
        }
        return {"acc_NG": acc_NG, "score_N": acc_NG[:, gi].copy()}, meta

    return fn


def memorization_scores(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    *,
    store=None,
    batch_size: int = 32,
    on_progress=None,
    force: bool = False,
    backend=None,
) -> tuple[np.ndarray, dict]:
    """(acc_NG [N, G] per score group, meta with `groups`, `score_group` and `source`).

    Reuses the correct_NT of a stored UnitMem pass of the same model and data when there is one; otherwise
    runs (or loads) the ``memscore`` job, whose blocks run on `backend` (iarmem_core.backends; None: here).
    """
    st = store if store is not None else store_mod.get_store()
    names = [g for g, _ in score_groups(adapter)]
    key = None if force else find_unitmem(st, adapter, image_set)
    if key is not None:
        arrays, _ = st.load(key, mmap=True)
        acc = accuracies_from_correct(np.asarray(arrays["correct_NT"]), adapter)
        return acc, {
            "groups": names,
            "score_group": score_definition(adapter),
            "source": f"correct_NT of UnitMem result {key}",
        }
    spec = _score_spec(adapter, image_set)
    arrays, meta = jobs.run_job(
        SCORE_KIND,
        spec,
        _score_job(adapter, image_set, batch_size),
        store=st,
        version=VERSION,
        force=force,
        on_progress=on_progress,
        backend=backend,
    )
    meta = dict(meta)
    meta["store_key"] = st.key(SCORE_KIND, spec, VERSION)
    return np.asarray(arrays["acc_NG"]), meta


def per_image_scores(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    *,
    store=None,
    batch_size: int = 32,
    on_progress=None,
    force: bool = False,
    group: str | None = None,
    backend=None,
) -> np.ndarray:
    """[N] per-image memorization score (VAR: last scale's accuracy; next-token: last 99 tokens).

    `group` picks another stored accuracy instead (a scale "4x4", a row "8x8/row3", or "last99").
    """
    acc, meta = memorization_scores(
        adapter, image_set, store=store, batch_size=batch_size, on_progress=on_progress, force=force, backend=backend
    )
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
