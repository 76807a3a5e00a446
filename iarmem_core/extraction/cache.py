"""Tokens and reconstructions computed once and kept in the result store, shared by scoring and every attack.

The attack compares each generation with the tokenizer's reconstruction of the candidate; scoring
teacher-forces the candidate's tokens. Both are the same for every run, edit, random draw, sweep point and
prefix, and on a 256 px model the encoder and decoder cost more than the transformer. Two stored kinds:

- ``tokens`` (`TOKENS_KIND`): the token ids [N, n_tokens] of every image of a data selection. Key: the
  tokenizer's identity (`IARAdapter.tokenizer_identity`: weights, config, image size, dtype), the
  selection's fingerprint (`data.data_fingerprint`) and the preprocessing (`preprocessing`). Written by the
  scoring pass (`extraction.scores`), read by the attack.
- ``reference`` (`REFERENCE_KIND`): for the items one part of an attack uses (the candidates of a selection,
  or a held-out set): their token ids, their reconstruction decode(tokens) (float32, full size: SSIM reads
  it) and its features in the feature space of every measure that embeds the reconstruction
  (feature_cosine: the bundled CNN; sscd: the user's SSCD file, named by its fingerprint). Key: the above
  plus the items, the batch size, the decode precision and the feature spaces.

Why the batch size is in the reference key: the decoder's kernels (oneDNN on CPU, cuDNN on GPU) are not
batch-invariant at the last bit (measured on the demo and test models: up to 3e-6 between an image decoded
alone and in a batch of 16), while the token ids are (discrete; checked by the tests). Decoding the
references in the same batches as the attack makes the cached attack bit-identical to the uncached one
(`tests/test_extraction_cache.py`). Every run over the same candidates with the same batch size (before and
after an edit, every random draw, every sweep point and prefix) shares one entry.

Example:
    >>> refs = cache.references(adapter, image_set, idx, measures=["ssim", "token_match"], batch_size=16)
    >>> refs.rows(0, 16).recon_B3HW.shape              # [16, 3, H, W] float32, the cached reconstruction
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iarmem_core import checkpoints, data, jobs, metrics
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter, check_precision
from iarmem_core.metrics.spaces import default_demo_feature_net_path

TOKENS_KIND = "tokens"
REFERENCE_KIND = "reference"
CACHE_VERSION = "1"  # bump when what is cached changes


def preprocessing(adapter: IARAdapter) -> dict:
    """How images reach the tokenizer (part of every cache key): `ImageSet.images(idx, size=image_size)`,
    floats in [0, 1], each family's own scaling inside `tokenize`."""
    return {"size": adapter.image_size, "images": "ImageSet.images(size=image_size), [0, 1]"}


def _base_spec(adapter: IARAdapter, image_set: data.ImageSet) -> dict:
    return {
        "tokenizer": adapter.tokenizer_identity(),
        "data": data.data_fingerprint(image_set),
        "preprocessing": preprocessing(adapter),
    }


def _tok_dtype(adapter: IARAdapter):
    return np.int16 if adapter.vocab_size <= np.iinfo(np.int16).max else np.int32


# ---------------------------------------------------------------------------------------------------
# tokens of a whole selection
def tokens_key(adapter: IARAdapter, image_set: data.ImageSet, store: store_mod.ResultStore) -> str:
    return store.key(TOKENS_KIND, _base_spec(adapter, image_set), CACHE_VERSION)


def stored_tokens(adapter: IARAdapter, image_set: data.ImageSet, store: store_mod.ResultStore) -> np.ndarray | None:
    """The stored token ids [N, n_tokens] of every image of `image_set` (memory-mapped), or None."""
    key = tokens_key(adapter, image_set, store)
    if not store.exists(key):
        return None
    try:
        arrays, _ = store.load(key, mmap=True)
    except store_mod.StoreError:
        return None  # a damaged entry only costs the recomputation
    return arrays["tokens_NT"]


def _tokens_job(adapter: IARAdapter, image_set: data.ImageSet, batch_size: int):
    def fn(ctx) -> tuple[dict, dict]:
        n = len(image_set)
        out = np.zeros((n, adapter.n_tokens), _tok_dtype(adapter))
        start, events = 0, []
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            start = int(meta["n_done"])
            out[:start] = arrays["tokens_NT"][:start]

        def work(i: int, j: int) -> None:
            with torch.inference_mode():
                toks = adapter.tokenize(image_set.images(np.arange(i, j), size=adapter.image_size))
                out[i:j] = adapter.flatten(toks).cpu().numpy()

        jobs.run_batches(
            ctx,
            n,
            batch_size,
            work,
            start=start,
            events=events,
            what="tokenizer batch",
            progress=lambda j: (j / n, f"tokenized {j}/{n} images"),
            save=lambda j: ({"tokens_NT": out}, {"n_done": j}),
        )
        return {"tokens_NT": out}, {"image_ids": list(image_set.ids), "oom_events": events, "batch_size": batch_size}

    return fn


def image_tokens(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    *,
    store: store_mod.ResultStore | None = None,
    batch_size: int = 32,
    on_progress=None,
) -> np.ndarray:
    """Token ids [N, n_tokens] of every image of `image_set` (flat, `adapter.flatten` order): stored, or
    computed as a ``tokens`` job (batched, resumable) and stored."""
    st = store if store is not None else store_mod.get_store()
    arrays, _ = jobs.run_job(
        TOKENS_KIND,
        _base_spec(adapter, image_set),
        _tokens_job(adapter, image_set, batch_size),
        store=st,
        version=CACHE_VERSION,
        on_progress=on_progress,
    )
    return arrays["tokens_NT"]


# ---------------------------------------------------------------------------------------------------
# references of the items an attack uses
def measure_spaces(measures: Sequence[str], sscd_path=None) -> dict[str, metrics.FeatureSpace]:
    """{measure: its feature space} for the measures that embed images (resolved outside any inference mode,
    so the cached networks never hold inference tensors)."""
    out = {}
    for m in measures:
        if metrics.embeds(m):
            out[m] = metrics.resolve_space("sscd", sscd_path) if m == "sscd" else metrics.resolve_space(None)
    return out


def space_identity(measure: str, sscd_path=None) -> str:
    """The identity of a measure's feature space file, for cache keys."""
    if measure == "sscd":
        p = Path(sscd_path).expanduser()
        return f"sscd:{p.name}:{checkpoints.file_fingerprint(p)}"
    p = default_demo_feature_net_path()
    return f"{metrics.FEATURE_SPACE_NAME}:{checkpoints.file_fingerprint(p)}"


def _tensor(x, dtype) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype))  # a copy of mmap rows


@dataclass
class References:
    """What the generations of a batch are compared with: tokens_BN (int64), recon_B3HW (float32), and
    {measure: features [B, D]} of the reconstruction for the measures that embed it. Tensors, or numpy
    arrays (memory-mapped from the store) that `rows` reads into tensors."""

    tokens_BN: torch.Tensor | np.ndarray
    recon_B3HW: torch.Tensor | np.ndarray
    features: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    key: str | None = None  # the store key these rows come from (None: computed in memory)

    def __len__(self) -> int:
        return int(self.tokens_BN.shape[0])

    def rows(self, i: int, j: int) -> References:
        """Items [i, j) as tensors."""
        return References(
            _tensor(self.tokens_BN[i:j], np.int64).long(),
            _tensor(self.recon_B3HW[i:j], np.float32),
            {m: _tensor(f[i:j], np.float32) for m, f in self.features.items()},
            self.key,
        )


def compute_references(
    adapter: IARAdapter,
    tokens_BN: torch.Tensor,
    spaces: Mapping[str, metrics.FeatureSpace],
    precision: str = "fp32",
    tokens=None,
) -> References:
    """References of one batch: the reconstruction decode(tokens) in `precision` and its features per
    measure of `spaces` (as `metrics.score` would compute them). `tokens` is the family's token format of
    the same ids when already at hand (else `adapter.unflatten(tokens_BN)`)."""
    toks = tokens if tokens is not None else adapter.unflatten(tokens_BN.to(adapter.device))
    recon = adapter.decode(toks) if precision == "fp32" else adapter.decode(toks, precision=precision)
    feats = {m: metrics.score_features(m, recon, space) for m, space in spaces.items()}
    return References(tokens_BN.cpu(), recon, feats)


def _items_id(idx: np.ndarray) -> dict:
    a = np.ascontiguousarray(np.asarray(idx, np.int64))
    return {"n": int(a.size), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def reference_spec(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    idx: np.ndarray,
    measures: Sequence[str],
    batch_size: int,
    precision: str,
    sscd_path=None,
) -> dict:
    return {
        **_base_spec(adapter, image_set),
        "items": _items_id(idx),
        "batch_size": int(batch_size),
        "precision": check_precision(precision),
        "spaces": {m: space_identity(m, sscd_path) for m in measures if metrics.embeds(m)},
    }


def _reference_job(adapter, image_set, idx, spaces, batch_size, precision, store):
    def fn(ctx) -> tuple[dict, dict]:
        I, S = len(idx), adapter.image_size
        all_tokens = stored_tokens(adapter, image_set, store)  # the scoring pass's, when it ran
        tokens = np.zeros((I, adapter.n_tokens), _tok_dtype(adapter))
        recon = np.zeros((I, 3, S, S), np.float32)
        feats = {m: np.zeros((I, sp.dim), np.float32) for m, sp in spaces.items()}
        start, events = 0, []
        if ctx.resume_state is not None:
            arrays, meta = ctx.resume_state
            start = int(meta["n_done"])
            tokens[:start], recon[:start] = arrays["tokens_IN"][:start], arrays["recon_I3HW"][:start]
            for m in feats:
                feats[m][:start] = arrays[f"features_{m}"][:start]
        seconds = {"tokenize_s": 0.0, "decode_s": 0.0, "features_s": 0.0}

        def work(i: int, j: int) -> None:
            with torch.inference_mode():
                t0 = time.perf_counter()
                if all_tokens is not None:
                    toks_BN = torch.from_numpy(np.asarray(all_tokens[idx[i:j]], np.int64))
                    toks = None
                else:
                    toks = adapter.tokenize(image_set.images(idx[i:j], size=S))
                    toks_BN = adapter.flatten(toks)
                t1 = time.perf_counter()
                r = compute_references(adapter, toks_BN, {}, precision, toks)
                t2 = time.perf_counter()
                f = {m: metrics.score_features(m, r.recon_B3HW, sp) for m, sp in spaces.items()}
                t3 = time.perf_counter()
            tokens[i:j] = toks_BN.cpu().numpy()
            recon[i:j] = r.recon_B3HW.float().cpu().numpy()
            for m, v in f.items():
                feats[m][i:j] = v.numpy()
            seconds["tokenize_s"] += t1 - t0
            seconds["decode_s"] += t2 - t1
            seconds["features_s"] += t3 - t2

        def arrays() -> dict:
            return {"tokens_IN": tokens, "recon_I3HW": recon, **{f"features_{m}": v for m, v in feats.items()}}

        jobs.run_batches(
            ctx,
            I,
            batch_size,
            work,
            start=start,
            events=events,
            what="reconstruction batch",
            progress=lambda j: (j / I, f"reconstructed {j}/{I} images"),
            save=lambda j: (arrays(), {"n_done": j}),
        )
        meta = {
            "image_ids": [image_set.ids[i] for i in idx],
            "tokens_from": "stored tokens of the selection" if all_tokens is not None else "tokenized here",
            "oom_events": events,
            "timings": {k: round(v, 3) for k, v in seconds.items()},
            "batch_size": int(batch_size),
            "precision": precision,
        }
        return arrays(), meta

    return fn


def references(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    idx: np.ndarray,
    *,
    measures: Sequence[str],
    batch_size: int,
    precision: str = "fp32",
    sscd_path=None,
    store: store_mod.ResultStore | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> References:
    """The references of items `idx` of `image_set` (stored, or computed as a ``reference`` job in batches
    of `batch_size` from the start of idx, and stored); arrays are memory-mapped, `References.rows` reads."""
    st = store if store is not None else store_mod.get_store()
    idx = np.asarray(idx, np.int64)
    spaces = measure_spaces(measures, sscd_path)
    spec = reference_spec(adapter, image_set, idx, measures, batch_size, precision, sscd_path)
    key = st.key(REFERENCE_KIND, spec, CACHE_VERSION)
    arrays = None
    if st.exists(key):
        try:
            arrays, _ = st.load(key, mmap=True)
        except store_mod.StoreError:
            arrays = None  # damaged: computed again below (the job replaces the entry)
    if arrays is None:
        arrays, _ = jobs.run_job(
            REFERENCE_KIND,
            spec,
            _reference_job(adapter, image_set, idx, spaces, batch_size, precision, st),
            store=st,
            version=CACHE_VERSION,
            force=st.exists(key),
            on_progress=on_progress,
        )
    feats = {m: arrays[f"features_{m}"] for m in spaces}
    return References(arrays["tokens_IN"], arrays["recon_I3HW"], feats, key)
