"""The attack itself: plan the items, generate from each prefix, score, and the job that stores the table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iarmem_core import checkpoints, data, hooks, jobs, metrics
from iarmem_core import store as store_mod
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.extraction import cache
from iarmem_core.extraction.config import (
    KIND,
    VERSION,
    ExtractionConfig,
    demo_heldout_sets,
    is_demo_set,
    resolve_prefixes,
)
from iarmem_core.extraction.measures import available_measures, compute_similarities
from iarmem_core.extraction.result import ExtractionResult, finalize
from iarmem_core.extraction.scores import class_ranks, memorization_scores, select_candidates
from iarmem_core.extraction.thresholds import resolve_similarity, resolve_thresholds
from iarmem_core.hooks import UnitEdit


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

    def parts(self) -> list[tuple[int, int, int]]:
        """(set index, first item, end) of each set's items: batches never mix the candidates with held-out
        images, so a set's batches (and its cached references) are the same whether the other set is there."""
        out, start = [], 0
        for si in range(len(self.sets)):
            n = int((self.set_of == si).sum())
            out.append((si, start, start + n))
            start += n
        return out

    def labels(self, i: int, j: int) -> torch.Tensor:
        """Labels of items [i, j) of one part."""
        si = int(self.set_of[i])
        return self.sets[si].labels_tensor(self.idx[i:j])

    def batch(self, i: int, j: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [j-i, 3, size, size] and labels of items [i, j) (train items come before held-out ones)."""
        xs, ys = [], []
        for si, s_ in enumerate(self.sets):
            k = self.idx[i:j][self.set_of[i:j] == si]
            if len(k):
                xs.append(s_.images(k, size=size))
                ys.append(s_.labels_tensor(k))
        return torch.cat(xs), torch.cat(ys)


def _item_columns(
    image_set: data.ImageSet, idx: np.ndarray, scores: np.ndarray, ranks: np.ndarray, split: str
) -> dict[str, np.ndarray]:
    m = image_set.meta
    return {
        "image_id": np.array([image_set.ids[i] for i in idx], dtype=str),
        "label": image_set.labels[idx],
        "score": scores.astype(np.float32),
        "split": np.full(len(idx), split, dtype="<U7"),
        "rank": ranks,
        "item": idx.astype(np.int64),
        "planted": m["planted"][idx].astype(np.int8) if "planted" in m else np.full(len(idx), -1, np.int8),
        "count": m["count"][idx].astype(np.int64) if "count" in m else np.full(len(idx), -1, np.int64),
    }


def _make_plan(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    heldout_set: data.ImageSet | None,
    cfg: ExtractionConfig,
    store,
    progress: Callable[[str], Callable[[float, str], None]],
    backend=None,
) -> _Plan:
    """Score the images (reusing UnitMem / memscore results; the scoring jobs run on `backend`) and choose the
    candidates."""
    bs = max(cfg.batch_size, 32)
    acc_tr, smeta = memorization_scores(
        adapter, image_set, store=store, batch_size=bs, on_progress=progress("train"), backend=backend
    )
    gi = smeta["groups"].index(smeta["score_group"])
    scores_tr = acc_tr[:, gi]
    if cfg.candidate_ids is not None:
        pos = {k: i for i, k in enumerate(image_set.ids)}
        missing = [c for c in cfg.candidate_ids if c not in pos]
        if missing:
            raise ValueError(
                f"candidate ids not in the data selection {image_set.name}: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        chosen = np.array([pos[c] for c in cfg.candidate_ids], np.int64)
        ranks = np.full(len(chosen), -1, np.int64)
    else:
        chosen = select_candidates(scores_tr, image_set.labels, cfg.candidates_per_class)
        ranks = class_ranks(scores_tr, image_set.labels)[chosen]
    sets, set_of, idx = [image_set], [np.zeros(len(chosen), np.int64)], [chosen]
    cols = [_item_columns(image_set, chosen, scores_tr[chosen], ranks, "train")]
    if heldout_set is not None and len(heldout_set):
        acc_ho, _ = memorization_scores(
            adapter, heldout_set, store=store, batch_size=bs, on_progress=progress("held-out"), backend=backend
        )
        all_ho = np.arange(len(heldout_set))
        sets.append(heldout_set)
        set_of.append(np.ones(len(all_ho), np.int64))
        idx.append(all_ho)
        cols.append(
            _item_columns(heldout_set, all_ho, acc_ho[:, gi], class_ranks(acc_ho[:, gi], heldout_set.labels), "heldout")
        )
    columns = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
    return _Plan(sets, np.concatenate(set_of), np.concatenate(idx), columns, smeta)


def _gen_kwargs(adapter: IARAdapter, cfg: ExtractionConfig) -> dict:
    return {
        "cfg": float(cfg.cfg),
        "top_k": int(cfg.top_k),
        "top_p": float(cfg.top_p),
        "temperature": float(cfg.temperature),
    }


class _Clock:
    """Adds the seconds of each phase to `into[name]` (CUDA work synchronised first, so it is counted)."""

    def __init__(self, device: torch.device, into: dict | None):
        self.into, self.sync = into, into is not None and device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.into is None:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


TIMING_PHASES = {  # phase of attack_batch -> what it is part of (the shares an attack reports)
    "recheck_fp32_s": "tokenizer",
    "tokenize_s": "tokenizer",
    "decode_reference_s": "tokenizer",
    "decode_generated_s": "tokenizer",
    "generate_s": "generation",
    "features_reference_s": "similarity",
    "similarity_s": "similarity",
}


def attack_batch(
    adapter: IARAdapter,
    images_B3HW: torch.Tensor | None,
    labels_B: torch.Tensor,
    prefixes: Sequence[int],
    measures: Sequence[str],
    gen_kw: dict,
    *,
    seed: int = 0,
    edit: UnitEdit | None = None,
    sscd_path=None,
    kv_cache: bool = True,
    reference: cache.References | None = None,
    precision: str = "fp32",
    timings: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Attack one batch of candidates at every prefix: (true tokens [B, N], reconstructions [B, 3, H, W],
    [(generated tokens [B, N], generated images, {measure: [B] scores}) per prefix]).

    The edit (if any) applies to generation only, inside `hooks.edit` (this thread, undone on exit).
    `reference` (`cache.References` rows of these candidates: tokens, reconstruction, its features) replaces
    tokenizing and decoding the images here (then `images_B3HW` may be None); the numbers are the same bit
    for bit when the reference was computed on the same batch. The tokens and the reconstruction are shared
    by all prefixes. `precision` is the decoder's for the compared images (fp32 or bf16; the job then rescores
    rows near a threshold with `recheck_fp32`, a caller of attack_batch does that itself); `timings` (a dict)
    accumulates the seconds of each phase (`TIMING_PHASES`). Runs under `torch.inference_mode` (nothing it
    returns can enter autograd).
    """
    spaces = cache.measure_spaces(measures, sscd_path)  # outside inference mode: cached nets stay normal tensors
    clock = _Clock(adapter.device, timings)
    with torch.inference_mode():
        if reference is None:
            if images_B3HW is None:
                raise ValueError("attack_batch needs the candidate images or their cached references")
            tokens = adapter.tokenize(images_B3HW)
            clock.lap("tokenize_s")
            ref = cache.compute_references(adapter, adapter.flatten(tokens), {}, precision, tokens)
            clock.lap("decode_reference_s")
            ref.features = {m: metrics.score_features(m, ref.recon_B3HW, sp) for m, sp in spaces.items()}
            clock.lap("features_reference_s")
        else:
            ref = reference
            tokens = adapter.unflatten(ref.tokens_BN.to(adapter.device))
        true_BN, recon = ref.tokens_BN, ref.recon_B3HW
        results = []
        with hooks.edit(adapter.transformer, edit):  # a sweep shares one prefill (next-token families)
            generated = adapter.generate_prefixes(
                labels_B, tokens, prefixes, [seed + p for p in prefixes], kv_cache=kv_cache, **gen_kw
            )
        clock.lap("generate_s")
        for p, (gen, latent) in zip(prefixes, generated):
            gen_BN = adapter.flatten(gen)
            img = adapter.decode_latent(latent, precision)
            clock.lap("decode_generated_s")
            sims = compute_similarities(
                measures, img, recon, gen_BN, true_BN, p, sscd_path, recon_features=ref.features, spaces=spaces
            )
            clock.lap("similarity_s")
            results.append((gen_BN, img, sims))
    return true_BN, recon, results


def timing_shares(seconds: dict) -> dict:
    """{generation, tokenizer, similarity: fraction} of the phases in `seconds` (`TIMING_PHASES`)."""
    tot = {}
    for k, v in seconds.items():
        if k in TIMING_PHASES:
            tot[TIMING_PHASES[k]] = tot.get(TIMING_PHASES[k], 0.0) + v
    s = sum(tot.values())
    return {k: round(v / s, 4) for k, v in sorted(tot.items())} if s > 0 else {}


BF16_RECHECK_MARGIN = 0.02  # bf16 decodes: rows this close to a threshold are scored again from fp32 decodes


def recheck_fp32(
    adapter: IARAdapter,
    measures: Sequence[str],
    thresholds: dict[tuple[str, int], float],
    prefix: int,
    sims: dict[str, np.ndarray],
    gen_BN: torch.Tensor,
    true_BN: torch.Tensor,
    sscd_path=None,
    margin: float = BF16_RECHECK_MARGIN,
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Rows of a bf16-decoded batch whose image similarity lies within `margin` of its threshold, scored again
    from fp32 decodes of the same tokens: (rows [K], {measure: fp32 scores [K]}, max |bf16 - fp32| seen).

    This is what keeps bf16 from changing a decision at the attack's thresholds: bf16 moves the demo models'
    SSIM and feature cosine by at most 0.004 (measured), far less than the margin. VAR: decode(ids) equals
    decoding the generation's f_hat, so the ids suffice.
    """
    img_measures = [m for m in measures if m != "token_match" and (m, prefix) in thresholds]
    near = np.zeros(len(true_BN), bool)
    for m in img_measures:
        near |= np.abs(sims[m].astype(np.float64) - thresholds[(m, prefix)]) <= margin
    rows = np.flatnonzero(near)
    if not len(rows):
        return rows, {}, 0.0
    k = torch.from_numpy(rows)
    with torch.inference_mode():
        g, t = gen_BN.cpu()[k], true_BN.cpu()[k]
        dev = adapter.device
        img = adapter.decode(adapter.unflatten(g.to(dev)))
        recon = adapter.decode(adapter.unflatten(t.to(dev)))
        fp32 = compute_similarities(img_measures, img, recon, g, t, prefix, sscd_path)
    worst = max(float(np.abs(fp32[m] - sims[m][rows]).max()) for m in img_measures)
    return rows, fp32, worst


def _job_fn(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    heldout_set: data.ImageSet | None,
    cfg: ExtractionConfig,
    edit: UnitEdit | None,
    sscd_path,
    use_cache: bool = True,
):
    prefixes = resolve_prefixes(adapter, cfg)
    measures, skipped = available_measures(adapter, cfg, sscd_path)

    def fn(ctx) -> tuple[dict, dict]:
        # -- 1. scores and candidates (sub-jobs in the same store, each resumable on its own): 10% of the bar
        t0 = time.perf_counter()
        plan = _make_plan(
            adapter,
            image_set,
            heldout_set,
            cfg,
            ctx.store,
            lambda what: lambda f, msg: ctx.progress(0.1 * f, f"{what}: {msg}"),
            backend=getattr(ctx, "backend", None),
        )
        t_score = time.perf_counter() - t0

        # -- 2. the table: row r = item * P + prefix index; per-item columns repeat over the prefixes
        I, P, n_tok = len(plan.idx), len(prefixes), adapter.n_tokens
        tok_dtype = np.int16 if adapter.vocab_size <= np.iinfo(np.int16).max else np.int32
        side = min(adapter.image_size, cfg.gallery_size)
        R = I * P
        rows = {k: np.repeat(v, P) for k, v in plan.columns.items()}
        rows.update(
            {
                "prefix_tokens": np.tile(np.asarray(prefixes, np.int64), I),
                "item_row": np.repeat(np.arange(I), P),
                "gen_tokens_RN": np.zeros((R, n_tok), tok_dtype),
                "true_tokens_RN": np.zeros((R, n_tok), tok_dtype),
                "generated_RHW3": np.zeros((R, side, side, 3), np.uint8),
                **{f"sim_{m}": np.full(R, np.nan, np.float32) for m in measures},
            }
        )
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
            "measures": measures,
            "skipped_measures": skipped,
            "prefix_tokens": prefixes,
            "thresholds": thr_rows,
            "calibrated_measure": cal_auto,
            "similarity": resolve_similarity(cfg.similarity, measures, cal_auto),
            "planted_counts_in_data": planted_counts,
            "model": adapter.describe(),
        }

        def partial_state(j: int) -> tuple[dict, dict]:
            """The finished rows (items [0, j)) and what resuming needs; meta_json serves the live gallery."""
            part = {k: v[: j * P] for k, v in rows.items()}
            part["recon_IHW3"] = recon_IHW3[:j]
            part["meta_json"] = np.array(
                [json.dumps(store_mod.to_jsonable({**meta, "partial": True}, "meta", allow_nan=True))]
            )
            return part, {"n_items": j, "n_rows": j * P, "batch_size": bs_now[0], "oom_events": events}

        # -- 3. references (tokens, reconstruction, its features) of each part, from the store: 10% of the bar
        gen_kw = _gen_kwargs(adapter, cfg)
        parts = plan.parts()
        t_ref0 = time.perf_counter()
        refs: dict[int, cache.References] = {}
        if use_cache:
            for si, a, b in parts:
                if b > max(start, a):
                    refs[si] = cache.references(
                        adapter,
                        plan.sets[si],
                        plan.idx[a:b],
                        measures=measures,
                        batch_size=cfg.batch_size,
                        precision=cfg.decode_dtype,
                        sscd_path=sscd_path,
                        store=ctx.store,
                        on_progress=lambda f, msg, a=a, b=b: ctx.progress(0.1 + 0.1 * (a + f * (b - a)) / I, msg),
                    )
        t_ref = time.perf_counter() - t_ref0

        # -- 4. generation, batched over the items of each part, every prefix per batch; rows are written once a
        # batch succeeded
        phases: dict[str, float] = {}
        thr_map = {(r["measure"], int(r["prefix_tokens"])): float(r["threshold"]) for r in thr_rows}
        recheck = {"rows": 0, "max_abs_diff": 0.0}
        t_gen0 = time.perf_counter()

        def work(i: int, j: int) -> None:
            bs_now[0] = j - i
            si = int(plan.set_of[i])
            if si in refs:
                a = next(a for s_, a, _ in parts if s_ == si)
                x, y, ref = None, plan.labels(i, j), refs[si].rows(i - a, j - a)
            else:
                (x, y), ref = plan.batch(i, j, adapter.image_size), None
            true_BN, recon, results = attack_batch(
                adapter,
                x,
                y,
                prefixes,
                measures,
                gen_kw,
                seed=cfg.seed + 1_000_003 * i,
                edit=edit,
                sscd_path=sscd_path,
                reference=ref,
                precision=cfg.decode_dtype,
                timings=phases,
            )
            recon_IHW3[i:j] = data.to_uint8(recon, side)
            for pi, (gen_BN, img, sims) in enumerate(results):
                r = np.arange(i, j) * P + pi
                if cfg.decode_dtype != "fp32":
                    t_re = time.perf_counter()
                    k, fp32, worst = recheck_fp32(
                        adapter, measures, thr_map, prefixes[pi], sims, gen_BN, true_BN, sscd_path
                    )
                    for m, v in fp32.items():
                        sims[m] = sims[m].copy()
                        sims[m][k] = v
                    recheck["rows"] += len(k)
                    recheck["max_abs_diff"] = max(recheck["max_abs_diff"], worst)
                    phases["recheck_fp32_s"] = phases.get("recheck_fp32_s", 0.0) + time.perf_counter() - t_re
                rows["gen_tokens_RN"][r] = gen_BN.cpu().numpy()
                rows["true_tokens_RN"][r] = true_BN.cpu().numpy()
                rows["generated_RHW3"][r] = data.to_uint8(img, side)
                for m, sc in sims.items():
                    rows[f"sim_{m}"][r] = sc

        for _, a, b in parts:
            if b <= start:
                continue
            bs_now[0] = jobs.run_batches(
                ctx,
                b,
                bs_now[0],
                work,
                start=max(start, a),
                events=events,
                what="generation batch",
                progress=lambda j: (0.2 + 0.8 * j / I, f"attacked {j}/{I} images x {P} prefix(es)"),
                save=partial_state,
            )
        t_gen = time.perf_counter() - t_gen0
        meta.update(
            {
                "config": cfg.to_dict(),
                "data": data.data_fingerprint(image_set),
                "heldout_data": data.data_fingerprint(heldout_set) if heldout_set is not None else None,
                "edit": edit.to_dict() if edit is not None else None,
                "edit_applies_to": "generation only (candidates are scored with the unedited model)",
                "sscd_file": str(sscd_path) if sscd_path is not None else None,
                "score": {
                    "definition": "teacher-forced top-1 accuracy, true class, no CFG",
                    "group": plan.score_meta["score_group"],
                    "source": plan.score_meta["source"],
                },
                "generation": {
                    **gen_kw,
                    "kv_cache": True,
                    "greedy": cfg.top_k == 1,
                    "seed_rule": "seed + 1000003 * first item of the batch + prefix (sampling only)",
                    "batches": "the candidates and the held-out images are batched separately",
                    "decode_dtype": cfg.decode_dtype,
                },
                "bf16_recheck": None
                if cfg.decode_dtype == "fp32"
                else {
                    "margin": BF16_RECHECK_MARGIN,
                    "rows_rescored_fp32": int(recheck["rows"]),
                    "max_abs_diff_bf16_fp32": round(float(recheck["max_abs_diff"]), 6),
                    "what": "rows whose bf16 image similarity was within the margin of the threshold resolved "
                    "at attack time were scored again from fp32 decodes (gallery images stay bf16)",
                },
                "compared_with": "the tokenizer's reconstruction decode(tokenize(x)) of the candidate",
                "references": {
                    "cached": bool(use_cache),
                    "store_keys": [r.key for r in refs.values()],
                    "what": "tokens, reconstruction and its features, computed once in the attack's batches "
                    "(extraction.cache)",
                },
                "decision": "similarity strictly above the threshold",
                "oom_events": events,
                "n_items": I,
                "timings": {
                    "scoring_s": round(t_score, 3),
                    "references_s": round(t_ref, 3),
                    "generation_s": round(t_gen, 3),
                    "phases": {k: round(v, 3) for k, v in sorted(phases.items())},
                    "shares": timing_shares(phases),
                    "items_per_s": round((I - start) / t_gen, 3) if t_gen > 0 and I > start else None,
                    "resumed_at_item": int(start),
                },
            }
        )
        return {**rows, "recon_IHW3": recon_IHW3}, meta

    return fn


def job_spec(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: ExtractionConfig,
    edit: UnitEdit | None,
    heldout_set: data.ImageSet | None,
    sscd_path,
) -> dict:
    """Everything that determines the stored table (the decision measure and threshold are left out)."""
    sscd = None
    if sscd_path is not None:
        p = Path(sscd_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"SSCD file {p} not found: give the path of sscd_disc_mixup.torchscript.pt")
        sscd = f"{p.name}:{checkpoints.file_fingerprint(p)}"
    return {
        "model": adapter.identity,
        "dtype": str(adapter.dtype),
        "data": data.data_fingerprint(image_set),
        "heldout": data.data_fingerprint(heldout_set) if heldout_set is not None else None,
        "config": cfg.job_dict(),
        "edit": edit.to_dict() if edit is not None and edit.n_units else None,
        "sscd": sscd,
    }


def _prepare(adapter, image_set, cfg, edit, heldout_set, store):
    st = store if store is not None else store_mod.get_store()
    cfg = cfg or ExtractionConfig()
    if heldout_set is None and cfg.heldout and is_demo_set(image_set):
        heldout_set, _ = demo_heldout_sets(cfg.heldout_n, cfg.seed)
    if not cfg.heldout:
        heldout_set = None
    if edit is not None and edit.n_units == 0:
        edit = None
    return st, cfg, edit, heldout_set


def run_extraction(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: ExtractionConfig | None = None,
    *,
    store=None,
    edit: UnitEdit | None = None,
    heldout_set: data.ImageSet | None = None,
    sscd_path=None,
    on_progress=None,
    force: bool = False,
    backend=None,
    cache: bool = True,
) -> ExtractionResult:
    """Run (or load from the store) the attack; the result's decision follows `cfg.similarity`/`threshold`.

    On the demo data the held-out images default to `demo_heldout_sets(cfg.heldout_n, cfg.seed)[0]`; for
    other data pass `heldout_set` (e.g. ImageNet validation images) to get a false rate. With `cache` (the
    default) the candidates' tokens, reconstructions and their features come from the store
    (`extraction.cache`; computed once, shared by every run over the same candidates); `cache=False`
    computes them in each batch, with the same result bit for bit.
    `backend` (iarmem_core.backends; None: this process) runs the scoring blocks; generation runs in the job's
    process.
    """
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    spec = job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path)
    fn = _job_fn(adapter, image_set, heldout_set, cfg, edit, sscd_path, cache)
    arrays, meta = jobs.run_job(
        KIND, spec, fn, store=st, version=VERSION, force=force, on_progress=on_progress, backend=backend
    )
    meta = dict(meta)
    meta["store_key"] = st.key(KIND, spec, VERSION)
    return finalize(ExtractionResult(arrays, meta), st, cfg.similarity, cfg.threshold)


def start_extraction(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: ExtractionConfig | None = None,
    *,
    store=None,
    edit: UnitEdit | None = None,
    heldout_set: data.ImageSet | None = None,
    sscd_path=None,
    on_progress=None,
    force: bool = False,
    backend=None,
    cache: bool = True,
) -> jobs.JobHandle:
    """Start the attack as a background job; `load_extraction(store, handle.key)` once done,
    `load_partial_extraction(store, handle.key)` while it runs."""
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    spec = job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path)
    fn = _job_fn(adapter, image_set, heldout_set, cfg, edit, sscd_path, cache)
    return jobs.start_job(
        KIND, spec, fn, store=st, version=VERSION, force=force, on_progress=on_progress, backend=backend
    )


def extraction_key(
    adapter: IARAdapter,
    image_set: data.ImageSet,
    cfg: ExtractionConfig | None = None,
    *,
    store=None,
    edit: UnitEdit | None = None,
    heldout_set=None,
    sscd_path=None,
) -> str:
    """The store key `run_extraction` would use (to look a result up without running anything)."""
    st, cfg, edit, heldout_set = _prepare(adapter, image_set, cfg, edit, heldout_set, store)
    return st.key(KIND, job_spec(adapter, image_set, cfg, edit, heldout_set, sscd_path), VERSION)
