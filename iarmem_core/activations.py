"""Per-image unit activations of one position group, for the memorization page's distribution plot.

UnitMem keeps only each unit's running max, mean and top images (it never stores images x units). To draw
a unit's distribution over the images, this job runs one teacher-forced pass over the selection (the
un-augmented view 0 of each image) and keeps mu(x) = mean over the group's positions of |a_u| for every
block and unit of one group: float16 [blocks, N, U]. A job in the store like UnitMem.
"""

from __future__ import annotations

import numpy as np
import torch

from iarmem_core import data, hooks, jobs
from iarmem_core.adapters.base import IARAdapter

KIND = "unit-acts"


def job_spec(adapter: IARAdapter, image_set: data.ImageSet, group_name: str, batch_size: int = 32) -> dict:
    return {
        "model": adapter.identity,
        "data": data.data_fingerprint(image_set),
        "group": group_name,
        "view": "original",
        "batch_size": batch_size,
        "dtype": str(adapter.dtype),
    }


def _group_index(adapter: IARAdapter, group_name: str) -> torch.Tensor:
    for g in adapter.position_groups(kinds=("scale", "row", "position")):
        if g.name == group_name:
            return g.index
    raise KeyError(f"{adapter.spec.name} has no position group {group_name!r}")


@torch.no_grad()
def group_activations(
    adapter: IARAdapter, images_B3HW: torch.Tensor, labels_B: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """mu [blocks, B, U]: mean over the rows predicting a token in `index` of |unit activation|."""
    member = torch.zeros(adapter.n_tokens, dtype=torch.bool)
    member[index] = True
    out: dict[int, torch.Tensor] = {}

    def on_units(block: int, acts_BTU: torch.Tensor, info: hooks.CallInfo | None) -> None:
        ti = info.target_index.cpu() if info is not None else torch.arange(acts_BTU.shape[1])
        rows = (ti >= 0) & member[ti.clamp(min=0)]
        out[block] = acts_BTU[:, rows.to(acts_BTU.device)].abs().mean(1).float().cpu()

    tokens = adapter.tokenize(images_B3HW)
    with hooks.capture(adapter.transformer, on_units):
        adapter.teacher_forced_logits(tokens, labels_B.to(adapter.device))
    return torch.stack([out[b] for b in sorted(out)])


def make_job(adapter: IARAdapter, image_set: data.ImageSet, group_name: str, batch_size: int = 32):
    index = _group_index(adapter, group_name)

    def fn(ctx) -> tuple[dict[str, np.ndarray], dict]:
        n = len(image_set)
        L = len(adapter.unit_sites())
        mu_LNU = np.zeros((L, n, adapter.n_units), np.float16)
        start = 0
        if ctx.resume_state is not None:
            mu_LNU[:] = ctx.resume_state[0]["mu_LNU"]
            start = int(ctx.resume_state[1]["n_done"])

        def work(i: int, j: int) -> None:
            idx = np.arange(i, j)
            x = image_set.images(idx, size=adapter.image_size)
            mu_LNU[:, i:j] = group_activations(adapter, x, image_set.labels_tensor(idx), index).numpy()

        jobs.run_batches(
            ctx,
            n,
            batch_size,
            work,
            start=start,
            what="activation batch",
            progress=lambda j: (j / n, f"{j}/{n} images"),
            save=lambda j: ({"mu_LNU": mu_LNU}, {"n_done": j}),
        )
        return {"mu_LNU": mu_LNU}, {"group": group_name, "image_ids": list(image_set.ids)}

    return fn


def result_key(adapter: IARAdapter, image_set: data.ImageSet, group_name: str, store) -> str:
    return store.key(KIND, job_spec(adapter, image_set, group_name))


def start(adapter: IARAdapter, image_set: data.ImageSet, group_name: str, store) -> jobs.JobHandle:
    """The pass as a background job; `store.load(result_key(...))` once done: {"mu_LNU": float16 [L, N, U]}."""
    return jobs.start_job(
        KIND, job_spec(adapter, image_set, group_name), make_job(adapter, image_set, group_name), store=store
    )
