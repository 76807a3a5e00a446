"""Demo world v2 (LOCALIZATION.md section 3): the trained demo models with memorization of known kind and dose.

    python -m iarmem_core train-demo                 # the whole world, about an hour on 2 cores
    python -m iarmem_core train-demo --only var      # one part: data, var, rar, ctl, measure

Per model (demo-var, demo-rar: 8 blocks x 96, 3072 units; the shipped tokenizers, trained on the same 4000 unique
images, are reused):

1. base: the transformer from scratch on the 4000 unique images (each once per epoch), teacher forcing with 10%
   label dropout and flips, a constant learning rate after a warm-up (as the v1 demo);
2. planting (the pilot's recipe, /work notes in the card): continued training where every epoch holds each planted
   item `dose` times (8x thin, 32x moderate) mixed with replay of the unique images (a fixed share of the epoch),
   evaluated after every epoch with the library's own attack (threshold calibrated on 400 held-out images, the
   extraction of every planted item, twin, 200 held-out and 100 unique images) and sample quality; the shipped
   epoch is the first that meets the rule (`ChoiceRule`: thin items extracted at 30-70%, moderate >= 90%, twins
   and held-out <= 2%, unique <= 1%, class accuracy >= 0.8), else the closest, said so in the card;
3. demo-var-ctl (the positive control): the shipped demo-var with the 20 control canaries trained into designated
   units only (their fc1 rows and biases and fc2 columns; everything else frozen), with a distillation term that
   keeps the model's outputs on replay images (and with the null label) those of demo-var, so samples stay clean.

Then every shipped model gets its extraction thresholds calibrated on the 800 calibration images of the held-out
split (stored in its card, beside the weights they belong to) and its measurements (`iarmem_core.demo.measure`,
which calls the same attack, quality, UnitMem and localization code as the app and the CLI).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from iarmem_core import data, extraction, intervention
from iarmem_core.adapters import adapter_class
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.demo.train import (
    CARD_FORMAT,
    Clock,
    Log,
    _json_safe,
    _lr_at,
    _stderr_log,
    _tokenize_all,
    _transformer_loss,
    build_transformer_for_training,
    n_params,
    save_weights,
)
from iarmem_core.registry import ASSETS, ModelSpec, get_spec
from iarmem_core.store import ResultStore

WORLD_VERSION = 2


# ---------------------------------------------------------------------------------------------------
# 1. Configs
@dataclass(frozen=True)
class BaseConfig:
    epochs: int = 12  # passes over the 4000 unique images
    batch_size: int = 64
    lr: float = 1e-3  # constant after the warm-up (the v1 demo's recipe)
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    label_dropout: float = 0.1


@dataclass(frozen=True)
class PlantConfig:
    max_epochs: int = 18
    round_epochs: int = 6  # the optimizer (and its warm-up) starts fresh every round
    replay: float = 2 / 3  # share of each planting epoch that is replay of the unique images (pilot: >= 2/3)
    lr: float = 5e-4
    warmup_steps: int = 10  # a fresh optimizer state
    batch_size: int = 48
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    label_dropout: float = 0.1


@dataclass(frozen=True)
class ChoiceRule:
    """Which planting epoch ships (LOCALIZATION.md section 3), fixed before training."""

    thin_lo: float = 0.3  # thin-dose items extracted: at least this share (mean over the kinds)
    thin_hi: float = 0.7  # ... and at most this
    moderate_min: float = 0.9  # moderate-dose items extracted (each kind)
    null_max: float = 0.02  # twins and held-out images extracted
    unique_max: float = 0.01  # unique training images extracted
    class_acc_min: float = 0.8  # class accuracy of samples

    def check(self, point: dict) -> dict:
        e = point["extracted_share"]
        thin = [
            e[f"planted {k} {d}x"] for k in ("natural", "mislabeled", "ood") for d in (8,) if f"planted {k} {d}x" in e
        ]
        mod = [
            e[f"planted {k} {d}x"] for k in ("natural", "mislabeled", "ood") for d in (32,) if f"planted {k} {d}x" in e
        ]
        nulls = [e[k] for k in e if k.startswith("twin") or k == "heldout"]
        ok = {
            "thin_in_window": bool(thin) and self.thin_lo <= float(np.mean(thin)) <= self.thin_hi,
            "moderate_high": bool(mod) and min(mod) >= self.moderate_min,
            "null_low": all(v <= self.null_max for v in nulls),
            "unique_low": e.get("unique", 0.0) <= self.unique_max,
            "quality": (point.get("class_acc") or 0.0) >= self.class_acc_min,
        }
        return {**ok, "all": all(ok.values()), "thin_mean": float(np.mean(thin)) if thin else None}


@dataclass(frozen=True)
class ControlConfig:
    per_block: int = 12  # designated units per block: 8 x 12 = 96 = 3.1% of 3072
    steps: int = 600
    lr: float = 3e-3
    # 8 canaries + 24 replay images per step and distill 3: the canaries reach >= 80% while the samples keep
    # demo-var's quality (16 + 16 and distill 1 reached 20/20 with class accuracy 0.795 and FD 94 vs 64)
    canaries_per_step: int = 8
    replay_per_step: int = 24
    distill: float = 3.0  # weight of KL(demo-var || model) on the replay images (conditional and null label)
    from_prefix: bool = True  # the canaries' loss on the tokens after the attack's prefix only
    eval_every: int = 100
    label_dropout: float = 0.1


@dataclass(frozen=True)
class WorldPlan:
    spec: ModelSpec
    base: BaseConfig = field(default_factory=BaseConfig)
    plant: PlantConfig = field(default_factory=PlantConfig)
    rule: ChoiceRule = field(default_factory=ChoiceRule)


# The pilot of LOCALIZATION.md 3 (run before the world was built: continued training of the v1 demo models with
# the v2 items, evaluated by the library after every epoch); its numbers and the decision go into every card.
PILOT = {
    "what": "continued training of the v1 demo-var / demo-rar with N, M, O items at 8x and 32x (lr 5e-4, batch 48, "
    "fresh optimizer), evaluated after every epoch with the library's attack, UnitMem and minimal sets; and a "
    "positive control (96 designated units, 300-600 steps)",
    "replay_1_3": "epoch 3: 8x at 30% for every kind on both models, 32x at 100%, twins / held-out / unique 0%; but "
    "class accuracy of samples 0.93 -> 0.55 (demo-var), 0.89 -> 0.55 (demo-rar)",
    "replay_2_3": "demo-var epoch 4: 8x at 60/50/80% (N/M/O), 32x 100%, class accuracy 0.83; demo-rar epoch 5: "
    "8x 50/40/60%, class accuracy 0.79 (just short of 0.8: RAR needs more replay)",
    "minimal_sets_thin_median_units": {
        "demo-var": {"N": 7.5, "M": 14, "O": 7.5},
        "demo-rar": {"N": 16, "M": 27, "O": 1},
    },
    "minimal_sets_32x": "median 57-160 units; random matched sets flip 0-3 of 200 draws per group",
    "unitmem_rule": "the rule as written (keep a kind with >= 3x more top-10% argmax units than its twins) keeps M "
    "(4.5-8x) and drops N and O (0.4-1.6x); but on demo-var M is at 5.3x before any M item was trained (64 vs 12 "
    "units) and does not grow with training: atypicality, not memorization; even the positive control's canaries "
    "get 99 top-10% argmax units against 100 for their never-trained twins",
    "positive_control": "96 units, 16 canaries + 16 replay per step: 20/20 canaries extractable after 300 steps, "
    "UnitMem ranks the designated units at median percentile 1.55, criterion (a) holds (p = 0.048), but class "
    "accuracy falls to 0.62 (canary blobs leak into samples)",
    "timing": "8 blocks x 96 from scratch: ~80 s (VAR) / ~43 s (RAR) per epoch of the v2 stream on 1 loaded thread",
    "decision": "keep all three kinds (N, M, O): the UnitMem half of the rule measures atypicality here (M's "
    "signal predates training), so dropping kinds by it would hide the finding the world must show; replay 2/3 "
    "(VAR) and 3/4 (RAR); planting in rounds until the choice rule holds; the positive control learns its "
    "canaries from the attack's prefix on, with distillation, so that its samples keep demo-var's quality; MLP "
    "ratio 8 not tried (every kind has small per-image sets at ratio 4)",
}


def default_plans() -> dict[str, WorldPlan]:
    """The plans behind the shipped world (replay shares from the pilot: RAR needs more replay to keep quality)."""
    return {
        "demo-var": WorldPlan(get_spec("demo-var"), BaseConfig(epochs=12), PlantConfig(replay=2 / 3)),
        "demo-rar": WorldPlan(get_spec("demo-rar"), BaseConfig(epochs=10), PlantConfig(replay=3 / 4)),
    }


# ---------------------------------------------------------------------------------------------------
# 2. Data and training helpers
def tokens_with_mirrors(adapter: IARAdapter, images_B3HW: torch.Tensor) -> torch.Tensor:
    """[2B, N] flat tokens: row 2i is image i, row 2i + 1 its mirror (the flip augmentation, tokenized once)."""
    views = torch.stack([images_B3HW, images_B3HW.flip(-1)], 1).flatten(0, 1)
    return _tokenize_all(adapter, views)


def load_tokenizer(spec: ModelSpec, out_dir: Path) -> nn.Module:
    """The shipped tokenizer of `spec` (trained on the same 4000 unique images the world uses), in eval mode."""
    from iarmem_core import checkpoints

    tok_path = Path(out_dir) / Path(spec.bundled["tokenizer"]).relative_to("assets")
    if not tok_path.exists():
        tok_path = ASSETS.parent / spec.bundled["tokenizer"]
    cls = adapter_class(spec.family)
    with torch.device("meta"):
        tok = cls.build_tokenizer(spec)
    checkpoints.load_checked(tok, tok_path, expected=spec.name, component="tokenizer")
    init_np = getattr(tok, "init_non_persistent", None)
    if init_np is not None:
        init_np()
    return tok.to("cpu", dtype=torch.float32).eval().requires_grad_(False)


def weights_id(model: nn.Module) -> str:
    """A short content hash of a module's weights (the identity of an in-memory model in the store)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def make_adapter(spec: ModelSpec, tok: nn.Module, transformer: nn.Module, tag: str) -> IARAdapter:
    """An adapter over in-memory modules with an identity that names these exact weights."""
    ident = {"name": spec.name, "tokenizer": "shipped", "transformer": f"{tag}:{weights_id(transformer)}"}
    return adapter_class(spec.family)(spec, tok, transformer, torch.device("cpu"), identity=ident)


def _optimizer(model: nn.Module, lr: float, wd: float, betas) -> torch.optim.Optimizer:
    decay = [
        p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "emb" not in n and "pos" not in n
    ]
    keep = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (p.ndim >= 2 and "emb" not in n and "pos" not in n)
    ]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}], lr=lr, betas=betas
    )


def train_epochs(
    model: nn.Module,
    spec: ModelSpec,
    tok: nn.Module,
    tokens_VN: torch.Tensor,
    labels_V: torch.Tensor,
    streams: Callable[[int], np.ndarray],
    epochs: int,
    cfg,
    seed: int,
    log: Log,
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Train `model` for `epochs` epochs; epoch e draws its image indices from `streams(e)` (each image with two
    token rows: itself and its mirror). Returns the stats (loss per epoch, the `on_epoch` points, timing)."""
    if spec.family == "var":
        model.cond_drop_rate = 0.0  # label dropout is drawn from our seeded generator instead
    gen = torch.Generator().manual_seed(seed + 2)
    opt = _optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    slices = make_adapter(spec, tok, model, "layout").scale_slices
    losses, points, step = [], [], 0
    clock = Clock()
    with clock:
        for epoch in range(1, epochs + 1):
            model.train()
            stream = streams(epoch)
            ep = []
            for i in range(0, len(stream) - cfg.batch_size + 1, cfg.batch_size):
                img = torch.from_numpy(stream[i : i + cfg.batch_size])
                rows = img * 2 + torch.randint(0, 2, img.shape, generator=gen)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg.warmup_steps, None, cfg.lr)
                loss = _transformer_loss(
                    model, tok, spec.family, tokens_VN[rows], labels_V[rows], slices, cfg.label_dropout, gen
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                ep.append(loss.item())
            losses.append(round(float(np.mean(ep)), 5))
            log(f"[{spec.name}] epoch {epoch}/{epochs} loss {losses[-1]:.4f} {clock.elapsed():.0f}s")
            if on_epoch is not None:
                model.eval()
                t = time.perf_counter()
                p = {"epoch": epoch, "train_loss": losses[-1], **on_epoch(epoch, model)}
                p["eval_s"] = round(time.perf_counter() - t, 1)
                points.append(p)
                log(f"[{spec.name} curve] {json.dumps(_json_safe(p))}")
    model.eval()
    eval_s = sum(p["eval_s"] for p in points)
    return {
        "steps": step,
        "loss_per_epoch": losses,
        "points": points,
        "timing": {
            **clock.to_dict(),
            "eval_wall_s": round(eval_s, 1),
            "train_only_wall_s": round(clock.wall - eval_s, 1),
        },
    }


def plant_streams(train: data.ImageSet, cfg: PlantConfig, seed: int) -> Callable[[int], np.ndarray]:
    """Epoch e of planting: every planted item `dose` times, plus replay of the unique images (cfg.replay of the
    epoch), shuffled together; the replay images are a fresh seeded permutation each epoch."""
    planted = np.flatnonzero(train.meta["role"] == "planted")
    unique = np.flatnonzero(train.meta["role"] == "unique")
    pl = np.repeat(planted, train.meta["dose"][planted])
    n_rep = int(round(cfg.replay / (1 - cfg.replay) * len(pl)))

    def streams(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 17, epoch])
        rep = rng.permutation(unique)[: min(n_rep, len(unique))]
        if n_rep > len(unique):
            rep = np.concatenate([rep, rng.choice(unique, n_rep - len(unique))])
        return rng.permutation(np.concatenate([pl, rep]))

    return streams


# ---------------------------------------------------------------------------------------------------
# 3. Evaluation with the library's attack (the curve, and the choice of epoch)
@dataclass
class EvalSets:
    """What the curve attacks: every planted item and 100 unique images (candidates); 200 held-out images and every
    twin (never trained: the null); 400 other held-out images calibrate the threshold."""

    candidates: data.ImageSet
    null: data.ImageSet
    calibration: data.ImageSet
    reference: data.ImageSet  # 1000 held-out images for FD

    @classmethod
    def build(cls, seed: int = 0, n_unique: int = 100, bundle_dir=None) -> EvalSets:
        train = data.load_demo("train", bundle_dir)
        pl = np.flatnonzero(train.meta["role"] == "planted")
        un = np.flatnonzero(train.meta["role"] == "unique")
        un = np.sort(np.random.default_rng([seed, 5]).permutation(un)[:n_unique])
        cand = train.subset(np.sort(np.concatenate([pl, un])), name=f"world-eval/planted+unique{n_unique}")
        ev, cal = extraction.demo_heldout_sets(200, seed)
        twins = data.load_demo("twins", bundle_dir)
        null = data.concat([ev, twins], name="world-eval/heldout200+twins")
        cal = cal.subset(np.arange(400), name="world-eval/calibration400")
        return cls(cand, null, cal, data.load_demo("heldout", bundle_dir))


def group_of(meta: dict, i: int) -> str:
    role, kind = str(meta["role"][i]), str(meta["kind"][i])
    if kind == "control":  # the positive control's canaries have no dose in the stream
        return "control canary" if role == "planted" else "twin control"
    if role == "planted":
        return f"planted {kind} {int(meta['dose'][i])}x"
    if role == "twin":
        return f"twin {kind}"
    return kind  # unique / heldout


def extraction_by_group(res: extraction.ExtractionResult, sets_meta: dict[str, dict]) -> dict:
    """{group: (extracted, n)} at the result's decision; groups as `group_of` (planted kind dose, twins, ...)."""
    t = res.table
    p0 = res.meta["prefix_tokens"][0]
    out: dict[str, list[int]] = {}
    for _, r in t[t.prefix_tokens == p0].iterrows():
        g = sets_meta[str(r.image_id)]
        e = out.setdefault(g, [0, 0])
        e[0] += int(bool(r.extracted))
        e[1] += 1
    return {g: tuple(v) for g, v in sorted(out.items())}


def evaluate_world(adapter: IARAdapter, sets: EvalSets, store: ResultStore, samples: int = 200, seed: int = 0) -> dict:
    """One curve point: calibrated threshold, extraction shares per group, margins, sample quality."""
    cal = extraction.calibrate(adapter, sets.calibration, extraction.ExtractionConfig(seed=seed), store=store)
    cfg = extraction.ExtractionConfig(candidate_ids=tuple(sets.candidates.ids), seed=seed)
    res = extraction.run_extraction(adapter, sets.candidates, cfg, heldout_set=sets.null, store=store)
    meta = {}
    for s in (sets.candidates, sets.null):
        for i, k in enumerate(s.ids):
            meta[k] = group_of(s.meta, i)
    by = extraction_by_group(res, meta)
    m = res.similarity
    thr = res.thresholds(m)[res.meta["prefix_tokens"][0]]
    t = res.table
    margins = {}
    for g in by:
        ids = [k for k, v in meta.items() if v == g]
        sc = t[t.image_id.isin(ids)][m].to_numpy(np.float64) - thr
        margins[g] = [round(float(q), 4) for q in np.quantile(sc, [0.25, 0.5, 0.75])] if len(sc) else None
    q = intervention.quality(adapter, None, n_samples=samples, seed=seed, store=store, reference_set=sets.reference)
    return {
        "threshold": thr,
        "similarity": m,
        "calibrated_on": cal["how"],
        "extracted": {g: list(v) for g, v in by.items()},
        "extracted_share": {g: round(v[0] / v[1], 4) for g, v in by.items()},
        "margin_q25_q50_q75": margins,
        "class_acc": q["class_acc"],
        "fd": q["fd"],
        "fd_metric": q["fd_metric"],
        "n_samples": samples,
    }


# ---------------------------------------------------------------------------------------------------
# 4. A demo model: base, planting, the chosen epoch shipped
def build_model(
    plan: WorldPlan, out_dir: Path, work_dir: Path, seed: int = 0, log: Log = _stderr_log, bundle_dir=None
) -> dict:
    """Train one demo model of the world; writes its fp16 transformer and a draft card; returns the card."""
    spec = plan.spec
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work = work_dir / spec.name
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(spec, out_dir)
    train = data.load_demo("train", bundle_dir)
    with Clock() as tk:
        ad0 = make_adapter(spec, tok, build_transformer_for_training(spec, seed + 1).eval(), "init")
        tokens_VN = tokens_with_mirrors(ad0, train.images())
    labels_V = train.labels_tensor().repeat_interleave(2)
    sets = EvalSets.build(seed, bundle_dir=bundle_dir)
    store = ResultStore(work / "store")

    # a. base: from scratch on the unique images
    model = build_transformer_for_training(spec, seed + 1)
    unique = np.flatnonzero(train.meta["role"] == "unique")
    base_path = work / "base.safetensors"
    if base_path.exists():
        model.load_state_dict(load_file(str(base_path)))
        base_stats = json.loads((work / "base.json").read_text())
        log(f"[{spec.name}] base model from {base_path}")
    else:
        base_stats = train_epochs(
            model,
            spec,
            tok,
            tokens_VN,
            labels_V,
            lambda e: np.random.default_rng([seed, 11, e]).permutation(unique),
            plan.base.epochs,
            plan.base,
            seed,
            log,
        )
        save_weights(model, base_path, fp16=False)
        base_stats["after"] = evaluate_world(make_adapter(spec, tok, model, "base"), sets, store, seed=seed)
        (work / "base.json").write_text(json.dumps(_json_safe(base_stats), indent=1))
    model.eval()

    # b. planting in rounds of `round_epochs` epochs (a fresh optimizer and warm-up each round), evaluated after
    # every epoch, until an epoch meets the rule or max_epochs; a rerun resumes at the last finished round
    points_path = work / "plant_points.json"
    points = json.loads(points_path.read_text()) if points_path.exists() else []
    R = plan.plant.round_epochs
    done = (max((p["epoch"] for p in points), default=0) // R) * R
    points = [p for p in points if p["epoch"] <= done]
    if done:
        model.load_state_dict(load_file(str(work / f"plant_epoch_{done}.safetensors")))
        log(f"[{spec.name}] planting resumes after epoch {done} (the end of a round)")
    streams = plant_streams(train, plan.plant, seed)
    rounds = []
    model.requires_grad_(True)
    while done < plan.plant.max_epochs and not any(plan.rule.check(p)["all"] for p in points):
        n = min(R, plan.plant.max_epochs - done)

        def on_epoch(e: int, m: nn.Module, off: int = done) -> dict:
            save_weights(m, work / f"plant_epoch_{off + e}.safetensors", fp16=False)
            return {
                "epoch": off + e,
                **evaluate_world(make_adapter(spec, tok, m, f"plant{off + e}"), sets, store, seed=seed),
            }

        st = train_epochs(
            model,
            spec,
            tok,
            tokens_VN,
            labels_V,
            lambda e, off=done: streams(off + e),
            n,
            plan.plant,
            seed,
            log,
            on_epoch,
        )
        points += st["points"]
        points_path.write_text(json.dumps(_json_safe(points), indent=1))
        rounds.append({k: v for k, v in st.items() if k != "points"})
        done += n
    plant_stats = {"rounds": rounds, "epochs": done, "points": points}
    checks = [{"epoch": p["epoch"], **plan.rule.check(p)} for p in plant_stats["points"]]
    passing = [c["epoch"] for c in checks if c["all"]]
    if passing:
        chosen, why = passing[0], f"epoch {passing[0]}: the first that meets every part of the rule"
    else:  # the closest: thin share nearest the window's centre among those that keep quality, else overall

        def dist(c):
            t = c["thin_mean"] if c["thin_mean"] is not None else 1.0
            return (not c["quality"], not c["null_low"], abs(t - 0.5))

        chosen = min(checks, key=dist)["epoch"]
        why = (
            f"no epoch met every part of the rule; epoch {chosen} is the closest (quality and null first, then "
            f"the thin share nearest 50%): " + json.dumps(next(c for c in checks if c["epoch"] == chosen))
        )
    log(f"[{spec.name}] ships planting epoch {chosen}: {why}")
    model.load_state_dict(load_file(str(work / f"plant_epoch_{chosen}.safetensors")))
    model.eval().requires_grad_(False)
    model_dir = out_dir / spec.name
    size = save_weights(
        model,
        model_dir / "transformer.safetensors",
        {"format": CARD_FORMAT, "model": spec.name, "seed": seed, "component": "transformer"},
    )
    card = {
        "format": CARD_FORMAT,
        "format_version": WORLD_VERSION,
        "model": spec.name,
        "family": spec.family,
        "description": spec.description,
        "seed": seed,
        "command": f"python -m iarmem_core train-demo --only {spec.family} --seed {seed}",
        "files": {
            "tokenizer": {"path": spec.bundled["tokenizer"], "reused": True},
            "transformer": {"path": f"{spec.name}/transformer.safetensors", "bytes": size, "dtype": "fp16"},
        },
        "architecture": {
            "tokenizer": spec.tokenizer,
            "transformer": spec.transformer,
            "transformer_params": n_params(model),
        },
        "sampling": spec.sampling,
        "train_augmentation": spec.train_augmentation,
        "training": {
            "tokenize_views_s": round(tk.wall, 1),
            "base": {"config": asdict(plan.base), **{k: v for k, v in base_stats.items()}},
            "planting": {"config": asdict(plan.plant), **{k: v for k, v in plant_stats.items() if k != "points"}},
        },
        "curve": {
            "what": "after every planting epoch: the threshold calibrated on 400 held-out images (their "
            "highest score), the attack (greedy, default prefix) on every planted item, 100 unique "
            "images, 200 held-out images and every twin; 200 samples for class accuracy and FD",
            "points": plant_stats["points"],
        },
        "checkpoint_choice": {"rule": asdict(plan.rule), "checks": checks, "chosen_epoch": chosen, "why": why},
        "pilot": PILOT,
    }
    (model_dir / "card.json").write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    return card


# ---------------------------------------------------------------------------------------------------
# 5. The positive control: canaries trained into designated units only
def designated_units(blocks: Sequence[int], n_units: int, per_block: int, seed: int = 0) -> dict[int, tuple[int, ...]]:
    """`per_block` units of every block, drawn with numpy's default_rng([seed, 31, block]) without replacement."""
    return {
        int(b): tuple(
            sorted(int(u) for u in np.random.default_rng([seed, 31, int(b)]).choice(n_units, per_block, replace=False))
        )
        for b in blocks
    }


def _unit_params(model: nn.Module, family: str, units: dict[int, tuple[int, ...]]) -> list[torch.Tensor]:
    """Make only the designated units' fc1 rows, fc1 biases and fc2 columns trainable (gradient masks)."""
    model.requires_grad_(False)
    params = []
    for b, blk in enumerate(model.blocks):
        mlp = blk.ffn if family == "var" else blk.mlp
        rows = torch.zeros(mlp.fc1.out_features, 1)
        rows[list(units.get(b, ()))] = 1.0
        for p, mask in ((mlp.fc1.weight, rows), (mlp.fc1.bias, rows[:, 0]), (mlp.fc2.weight, rows.T)):
            p.requires_grad_(True)
            p.register_hook(lambda g, m=mask: g * m)
            params.append(p)
    return params


def build_control(
    out_dir: Path,
    work_dir: Path,
    cfg: ControlConfig = ControlConfig(),
    seed: int = 0,
    log: Log = _stderr_log,
    bundle_dir=None,
) -> dict:
    """demo-var-ctl from the shipped demo-var; writes its transformer and a draft card (with the designated units)."""
    spec, base_spec = get_spec("demo-var-ctl"), get_spec("demo-var")
    out_dir = Path(out_dir)
    base = adapter_class("var").load(
        base_spec,
        transformer_path=out_dir / "demo-var" / "transformer.safetensors",
        tokenizer_path=ASSETS.parent / base_spec.bundled["tokenizer"],
        device="cpu",
    )
    ref = base.transformer  # frozen: the distillation target
    model = build_transformer_for_training(spec, seed + 1)
    model.load_state_dict(ref.state_dict())
    model.cond_drop_rate = 0.0
    blocks = [s.block for s in base.unit_sites()]
    units = designated_units(blocks, base.n_units, cfg.per_block, seed)
    params = _unit_params(model, "var", units)
    opt = torch.optim.Adam(params, lr=cfg.lr)  # no weight decay: the masked entries never move
    train = data.load_demo("train", bundle_dir)
    ctl = data.load_demo("control", bundle_dir)
    unique = np.flatnonzero(train.meta["role"] == "unique")
    tok_u = tokens_with_mirrors(base, train.images(unique))
    lab_u = train.labels_tensor(unique).repeat_interleave(2)
    tok_c = tokens_with_mirrors(base, ctl.images())
    lab_c = ctl.labels_tensor().repeat_interleave(2)
    slices = base.scale_slices
    # the canaries are learnt from the attack's prefix on (its continuation), so the class-conditional
    # distribution of the first scales, where sampling starts, stays demo-var's (the pilot's version learnt
    # every token and the samples' class accuracy fell to ~0.6)
    start = extraction.default_prefix(base) if cfg.from_prefix else 0
    gen = torch.Generator().manual_seed(seed + 3)
    rng = np.random.default_rng([seed, 41])
    sets = EvalSets.build(seed, bundle_dir=bundle_dir)
    ctl_twins = data.load_demo("control_twins", bundle_dir)
    store = ResultStore(Path(work_dir) / "demo-var-ctl" / "store")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve, losses = [], []

    def ctl_eval(step: int) -> dict:
        model.eval()
        ad = make_adapter(spec, base.tokenizer, model, f"ctl{step}")
        cal = extraction.calibrate(ad, sets.calibration, extraction.ExtractionConfig(seed=seed), store=store)
        cand = data.concat([ctl, sets.candidates])
        res = extraction.run_extraction(
            ad,
            cand,
            extraction.ExtractionConfig(candidate_ids=tuple(cand.ids), seed=seed),
            heldout_set=data.concat([sets.null, ctl_twins]),
            store=store,
        )
        meta = {k: group_of(s.meta, i) for s in (cand, sets.null, ctl_twins) for i, k in enumerate(s.ids)}
        by = extraction_by_group(res, meta)
        q = intervention.quality(ad, None, n_samples=200, seed=seed, store=store, reference_set=sets.reference)
        model.train()
        return {
            "step": step,
            "threshold": cal["thresholds"][res.similarity][str(res.meta["prefix_tokens"][0])],
            "extracted": {g: list(v) for g, v in by.items()},
            "class_acc": q["class_acc"],
            "fd": q["fd"],
            "loss_last": round(float(np.mean(losses[-cfg.eval_every :])), 4) if losses else None,
        }

    clock = Clock()
    with clock:
        model.train()
        for step in range(1, cfg.steps + 1):
            ci = torch.from_numpy(rng.integers(0, len(ctl), cfg.canaries_per_step))
            ri = torch.from_numpy(rng.integers(0, len(unique), cfg.replay_per_step))
            vc = ci * 2 + torch.randint(0, 2, ci.shape, generator=gen)
            vr = ri * 2 + torch.randint(0, 2, ri.shape, generator=gen)
            loss = _transformer_loss(
                model, base.tokenizer, "var", tok_c[vc], lab_c[vc], slices, cfg.label_dropout, gen, from_token=start
            )
            # keep the outputs on ordinary images (conditional and with the null label): KL to demo-var
            toks_r = tok_u[vr]
            labs_r = torch.cat([lab_u[vr], torch.full_like(lab_u[vr], model.num_classes)])
            x = base.tokenizer.quantize.idxBl_to_var_input([toks_r[:, s] for s in slices])
            x = torch.cat([x, x])
            with torch.no_grad():
                p_ref = F.log_softmax(ref(labs_r, x).float(), -1)
            p_new = F.log_softmax(model(labs_r, x).float(), -1)
            kl = F.kl_div(p_new, p_ref, log_target=True, reduction="batchmean") / p_new.shape[1]
            total = loss + cfg.distill * kl
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(loss.item())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                p = ctl_eval(step)
                p["kl_last"] = round(float(kl.item()), 5)
                curve.append(p)
                log(f"[demo-var-ctl] {json.dumps(_json_safe(p))}")
    model.eval().requires_grad_(False)
    moved = 0
    for k, v in model.state_dict().items():
        d = before[k] != v
        if ".ffn.fc1." in k or ".ffn.fc2.weight" in k:
            b = int(k.split(".")[1])
            keep = torch.ones(base.n_units, dtype=torch.bool)
            keep[list(units[b])] = False
            d = d[keep] if ".fc1." in k else d[:, keep]
        moved += int(d.sum())
    model_dir = out_dir / "demo-var-ctl"
    size = save_weights(
        model,
        model_dir / "transformer.safetensors",
        {"format": CARD_FORMAT, "model": spec.name, "seed": seed, "component": "transformer"},
    )
    n_des = sum(len(u) for u in units.values())
    card = {
        "format": CARD_FORMAT,
        "format_version": WORLD_VERSION,
        "model": spec.name,
        "family": "var",
        "description": spec.description,
        "seed": seed,
        "command": f"python -m iarmem_core train-demo --only ctl --seed {seed}",
        "files": {
            "tokenizer": {"path": spec.bundled["tokenizer"], "reused": True},
            "transformer": {"path": "demo-var-ctl/transformer.safetensors", "bytes": size, "dtype": "fp16"},
        },
        "designated_units": {str(b): list(u) for b, u in units.items()},
        "pilot": PILOT,
        "n_designated": n_des,
        "designated_share": round(n_des / (len(blocks) * base.n_units), 4),
        "training": {
            "config": asdict(cfg),
            "from": "the shipped demo-var (fp16 weights)",
            "trainable": "the designated units' fc1 weight rows and biases and fc2 weight columns; every "
            "other weight frozen (checked: entries moved outside them = "
            f"{moved})",
            "objective": "cross entropy on the control canaries (flips, 10% label dropout) + distill x "
            "KL(demo-var || model) per token on replay images, with their labels and with the "
            "null label",
            "moved_outside_designated": moved,
            "timing": clock.to_dict(),
        },
        "curve": curve,
        "sampling": spec.sampling,
        "train_augmentation": spec.train_augmentation,
    }
    (model_dir / "card.json").write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    return card


# ---------------------------------------------------------------------------------------------------
# 6. Thresholds into the card
def calibrate_card(name: str, out_dir: Path, store: ResultStore, seed: int = 0, log: Log = _stderr_log) -> dict:
    """Calibrate the shipped model's thresholds on the 800 calibration images of the held-out split (every
    measure, every prefix of the attack's default set) and write them into its card."""
    from iarmem_core.adapters import load_adapter

    spec = get_spec(name)
    ad = load_adapter(name, device="cpu")
    _, cal_set = extraction.demo_heldout_sets(200, seed)
    prefixes = tuple(p for p in ad.prefix_choices if 0 < p < ad.n_tokens)
    if len(ad.token_grids) == 1:
        prefixes = (4, 8, 16, 24, 32)
    planted = data.load_demo("control" if "control" in spec.trained_splits else "planted")
    cal = extraction.calibrate(
        ad, cal_set, extraction.ExtractionConfig(prefix_tokens=prefixes, seed=seed), store=store, planted_set=planted
    )
    card_path = Path(out_dir) / name / "card.json"
    card = json.loads(card_path.read_text())
    card["extraction_calibration"] = {
        "weights": ad.identity["transformer"],
        "measure": cal["measure"],
        "thresholds": cal["thresholds"],
        "how": cal["how"] + ", rounded up to 4 decimals",
        "command": f"python -m iarmem_core extract --model {name} --calibrate --prefix {','.join(map(str, prefixes))}",
    }
    for m, per in card["extraction_calibration"]["thresholds"].items():
        card["extraction_calibration"]["thresholds"][m] = {p: math.ceil(float(v) * 1e4) / 1e4 for p, v in per.items()}
    card_path.write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    log(f"[{name}] thresholds: {json.dumps(card['extraction_calibration']['thresholds'].get(cal['measure']))}")
    return card


__all__ = [
    "BaseConfig",
    "ChoiceRule",
    "ControlConfig",
    "EvalSets",
    "PlantConfig",
    "WorldPlan",
    "build_control",
    "build_model",
    "calibrate_card",
    "default_plans",
    "designated_units",
    "evaluate_world",
    "plant_streams",
]
