"""Class-stratified sample sizes, shared by the folder loader and the demo selection."""

from __future__ import annotations

import math

import numpy as np


def class_quotas(
    n_avail: list[int],
    fraction: float | None,
    count: int | None,
    per_class: int | None,
    rng: np.random.Generator,
) -> list[int]:
    n_cls = len(n_avail)
    if fraction is not None:
        # round half up per class, at least one: 1% of ImageNet gives 13 of 1300 and 7 of 732
        return [min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0 for n in n_avail]
    if per_class is not None:
        return [min(n, per_class) for n in n_avail]
    if count is not None:
        quota = [0] * n_cls
        left = count
        # fill evenly; classes that run out give their share to the others (seeded tie order)
        while left > 0:
            open_ = [c for c in range(n_cls) if quota[c] < n_avail[c]]
            if not open_:
                break
            share, extra = divmod(left, len(open_))
            lucky = set(rng.permutation(open_)[:extra].tolist())
            for c in open_:
                add = min(share + (c in lucky), n_avail[c] - quota[c])
                quota[c] += add
                left -= add
        return quota
    return list(n_avail)
