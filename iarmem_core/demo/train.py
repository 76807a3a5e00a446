"""Re-create the demo world: the feature network and the trained demo-var / demo-rar with planted memorization.

    python -m iarmem_core train-demo [--only var|rar|features] [--out assets] [--threads 2] [--seed 0]

Everything is trained on CPU, seeded, from the bundled Fashion-MNIST subset (assets/demo_data: 4000 unique
training images, 30 of them planted 4x/16x/64x in the training stream, 1000 held-out images):

1. features: the FeatureNet classifier of `iarmem_core.metrics` (offline class accuracy, Frechet distance,
   feature cosine), trained on Debian's full Fashion-MNIST train file when it is installed, else on the
   bundled training split; images pixel-identical to a held-out image are removed either way.
2. per model (demo-var, demo-rar; architectures from the registry):
   a. the tokenizer (VAR's multi-scale VQVAE / RAR's MaskGIT-VQGAN) on the 4000 unique training images,
      each once per epoch (a tokenizer is not where the demo plants memorization), MSE + VQ loss, dead
      codes re-seeded from encoder outputs;
   b. the transformer on the training stream with the planted duplicates (`demo_training_indices`),
      teacher forcing with 10% label dropout (for CFG), horizontal flips, constant learning rate after a
      warm-up, so that the checkpoint after epoch e of a longer run *is* the e-epoch model: the
      memorization curve measured after every epoch (stored in the card) is the curve of the choice;
   c. weights written as fp16 .safetensors, reloaded through the registry's adapter, and measured
      (`measure_demo_model`: the numbers of bench/demo_memorization.py); a model card JSON beside them.

Example:
    >>> from iarmem_core.demo.train import train_demo
    >>> report = train_demo("assets", only=("var",))      # writes assets/demo-var/*
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iarmem_core import data
from iarmem_core.adapters import adapter_class
from iarmem_core.adapters.base import IARAdapter
from iarmem_core.demo import bundle as demo_bundle
from iarmem_core.metrics.spaces import DEMO_FEATURE_NET_FILE
from iarmem_core.registry import ASSETS, ModelSpec, get_spec

CARD_FORMAT = "iarmem-demo-model-card"
FEATURE_NET_FILE = DEMO_FEATURE_NET_FILE  # the file iarmem_core.metrics reads from assets/
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# 1. Configs
@dataclass(frozen=True)
class TokenizerTrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3  # peak; cosine decay to lr_min_ratio * lr after a linear warm-up
    lr_min_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.0
    augmentation: str = "flip"
    revive_every: int = 25  # steps between dead-code checks (unused codes get encoder outputs)
    revive_until: float = 0.7  # fraction of the steps after which the codebook is left alone
    probe_images: int = 512  # images tokenized to count code usage


@dataclass(frozen=True)
class TransformerTrainConfig:
    epochs: int = 12  # passes over the training stream (4810 images incl. planted copies)
    batch_size: int = 64
    lr: float = 1e-3  # constant after the warm-up (see the module docstring for why)
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    label_dropout: float = 0.1
    augmentation: str = "flip"  # applied to the tokens: each exposure picks the image or its mirror
    eval_every: int = 1  # epochs between memorization-curve points (0: none)


@dataclass(frozen=True)
class FeatureNetTrainConfig:
    epochs: int = 2
    batch_size: int = 128
    source: str = "auto"  # "auto" (Debian full train file if present), "debian" or "bundle"


@dataclass(frozen=True)
class MeasureConfig:
    """What `measure_demo_model` evaluates (also the curve during training, with smaller sets)."""

    n_unique: int | None = 1000  # unique training images (class-stratified sample); None: all 3970
    n_heldout: int | None = None  # held-out images; None: all 1000
    samples_per_class: int = 100  # class-conditional CFG samples for class accuracy and Frechet distance
    copy_false_rate: float = 0.01  # calibrates the SSIM threshold, see `copy_threshold`
    seed: int = 0
    batch_size: int = 200


@dataclass(frozen=True)
class DemoPlan:
    """How one demo model is trained: its registry spec plus the two training configs."""

    spec: ModelSpec
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    transformer: TransformerTrainConfig = field(default_factory=TransformerTrainConfig)
    prefixes: tuple[int, ...] = ()  # flat prefix lengths reported for reproduction
    main_prefix: int = 0  # the one behind `reproduced`
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    curve_measure: MeasureConfig = field(
        default_factory=lambda: MeasureConfig(n_unique=100, n_heldout=100, samples_per_class=10)
    )
    train_subset: int | None = None  # quick runs (tests): the planted images plus this many unique ones
    choice: str = ""  # why this many epochs (goes into the model card)


# What a 20-epoch pilot of each plan showed on the curve sets (10 images per planted count, 100 unique, 100
# held-out), reproduced at the main prefix; the learning rate is constant, so its epoch-e point is the e-epoch model.
_VAR_CHOICE = (
    "Pilot curve (4-scale prefix): 64x copies reproduced 0.6 after epoch 6, 0.9 after 7-9 and 1.0 "
    "from epoch 10 on; 16x 0.3-0.6 over epochs 10-14, 0.6-1.0 after; 4x at most 0.2; unique and held-out 0-0.01 "
    "throughout. Epoch 12 has the full dose-response (64x all, 16x about half, 4x rarely, unique never) at "
    "the lowest cost; from 1-3 scales reproduction needs more epochs (see by_prefix)."
)
_RAR_CHOICE = (
    "Pilot curve (16-token prefix): 64x copies reproduced 1.0 from epoch 4 on; 16x 0.3 after "
    "epoch 6, 0.8 after 10, 1.0 by 20; 4x 0-0.1 up to epoch 13, 0.2 after 14; unique and held-out at most "
    "0.02 even after 20 epochs (0.10 / 0.06 from a 32-token prefix, half the image). Epoch 10 shows the "
    "dose-response with 4x still rarely reproduced."
)


def default_plans() -> dict[str, DemoPlan]:
    """The plans behind the shipped assets (epochs chosen from the memorization curve; see the cards)."""
    var = get_spec("demo-var")
    rar = get_spec("demo-rar")
    var_prefixes = tuple(sum(p * p for p in var.tokenizer["v_patch_nums"][:k]) for k in (1, 2, 3, 4))
    return {
        # VAR: 4 scales (30 tokens) as in the paper's attack (4 scales of VAR-256); 1-3 scales reported too
        "demo-var": DemoPlan(
            var,
            TokenizerTrainConfig(),
            TransformerTrainConfig(epochs=12),
            prefixes=var_prefixes,
            main_prefix=var_prefixes[3],
            choice=_VAR_CHOICE,
        ),
        # RAR: 16 tokens = the first two token rows, the first row that reaches into most objects
        "demo-rar": DemoPlan(
            rar,
            TokenizerTrainConfig(),
            TransformerTrainConfig(epochs=10),
            prefixes=(8, 16, 24, 32),
            main_prefix=16,
            choice=_RAR_CHOICE,
        ),
    }


# ---------------------------------------------------------------------------------------------------
# 2. Small helpers
class Clock:
    """Wall and CPU seconds of a block, with the 1-minute load average around it (the machine is shared)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.load = (0.0, 0.0)

    def __enter__(self) -> Clock:
        self._w, self._c, self._l = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c
        self.load = (round(self._l, 2), round(os.getloadavg()[0], 2))

    def elapsed(self) -> float:
        """Seconds since the block started (for progress lines)."""
        return time.perf_counter() - self._w

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1), "loadavg_1min": list(self.load)}


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _lr_at(step: int, warmup: int, total: int | None, lr: float, min_ratio: float = 1.0) -> float:
    """Linear warm-up, then cosine decay to min_ratio * lr over `total` steps (constant when total is None)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total is None or min_ratio >= 1.0:
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_weights(module: nn.Module, path: Path, meta: dict | None = None, fp16: bool = True) -> int:
    """Write the state dict as .safetensors (floating tensors in fp16); returns the file size in bytes."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        sd[k] = (v.half() if fp16 and v.is_floating_point() else v).contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)
    return path.stat().st_size


def _tokenize_all(adapter: IARAdapter, images_B3HW: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Flat tokens [B, N] of the images, tokenized in batches."""
    out = [adapter.flatten(adapter.tokenize(x)).cpu() for x in images_B3HW.split(batch)]
    return torch.cat(out)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else round(obj, 6)
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


# ---------------------------------------------------------------------------------------------------
# 3. Tokenizers: family-specific pieces (training loss, code usage, candidate vectors for dead codes)
def build_tokenizer_for_training(spec: ModelSpec) -> nn.Module:
    """A freshly initialised tokenizer of `spec` in train mode."""
    if spec.family == "var":
        from iarmem_core.models.vqvae_ms import VQVAE

        return VQVAE(**spec.tokenizer, test_mode=False).train()
    if spec.family == "rar":
        from iarmem_core.models.maskgit_vqgan import MaskGITVQGAN

        return MaskGITVQGAN(**spec.tokenizer).train()
    raise ValueError(f"train-demo trains VAR and RAR tokenizers, not {spec.family!r} ({spec.name})")


def _tokenizer_loss(tok: nn.Module, family: str, x01_B3HW: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Training loss: reconstruction MSE (in the tokenizer's pixel range) + the VQ loss."""
    if family == "var":
        x = x01_B3HW * 2 - 1  # the VQVAE works in [-1, 1]
        recon, vq = tok(x)
        rec = F.mse_loss(recon, x) / 4  # /4: the same scale as an MSE in [0, 1]
    else:
        recon, vq = tok(x01_B3HW)
        rec = F.mse_loss(recon, x01_B3HW)
    return rec + vq, {"rec": rec.item(), "vq": vq.item()}


@torch.no_grad()
def _codes_and_pool(tok: nn.Module, family: str, x01_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code ids used by these images, flat [M]; candidate code vectors [M', C]: what quantisation sees).

    VAR: the area-downsampled residuals at every scale (the vectors each scale's codes must fit); RAR: the
    encoder outputs.
    """
    if family == "var":
        q = tok.quantize
        f = tok.img_to_f(x01_B3HW * 2 - 1)
        B, C, H, W = f.shape
        f_rest = f.clone()
        ids, pool = [], []
        SN = len(q.v_patch_nums)
        for si, pn in enumerate(q.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx = q.nearest(z_NC)
            ids.append(idx)
            pool.append(z_NC)
            f_rest.sub_(q._up(q.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2), si, SN, H, W))
        return torch.cat(ids), torch.cat(pool)
    z = tok.encoder(x01_B3HW)
    _, idx = tok.quantize(z)
    return idx.reshape(-1), z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _codebook(tok: nn.Module) -> nn.Embedding:
    return tok.quantize.embedding


@torch.no_grad()
def _revive_dead_codes(
    tok: nn.Module, family: str, probe_B3HW: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator
) -> int:
    """Give every code no probe image uses a random candidate vector (plus 1% noise); returns how many."""
    ids, pool = _codes_and_pool(tok, family, probe_B3HW)
    emb = _codebook(tok).weight
    used = torch.bincount(ids, minlength=emb.shape[0]) > 0
    dead = torch.nonzero(~used).flatten()
    if len(dead) == 0:
        return 0
    pick = torch.randint(0, pool.shape[0], (len(dead),), generator=gen)
    new = pool[pick]
    new = new + 0.01 * new.std() * torch.randn(new.shape, generator=gen)
    emb[dead] = new
    st = opt.state.get(emb, {})
    for k in ("exp_avg", "exp_avg_sq"):
        if k in st:
            st[k][dead] = 0  # stale moments would throw the fresh codes straight back
    return len(dead)


def train_tokenizer(
    spec: ModelSpec, cfg: TokenizerTrainConfig, images_B3HW: torch.Tensor, seed: int, log: Log = _stderr_log
) -> tuple[nn.Module, dict]:
    """Train the tokenizer of `spec` on images [N, 3, H, W] in [0, 1]; returns (tokenizer in eval mode, stats)."""
    torch.manual_seed(seed)
    tok = build_tokenizer_for_training(spec)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    N = images_B3HW.shape[0]
    probe = images_B3HW[torch.randperm(N, generator=gen)[: cfg.probe_images]]
    order = torch.cat([torch.randperm(N, generator=gen) for _ in range(cfg.steps * cfg.batch_size // N + 1)])
    losses, revived = [], []
    clock = Clock()
    with clock:
        for step in range(cfg.steps):
            if cfg.revive_every and step % cfg.revive_every == 0 and step < cfg.revive_until * cfg.steps:
                tok.eval()
                n_dead = _revive_dead_codes(tok, spec.family, probe, opt, gen)
                tok.train()
                if n_dead:
                    revived.append([step, n_dead])
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.lr_min_ratio)
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = data.augment(images_B3HW[idx], cfg.augmentation, gen)
            loss, parts = _tokenizer_loss(tok, spec.family, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append([loss.item(), parts["rec"], parts["vq"]])
            if step % 50 == 0 or step == cfg.steps - 1:
                log(
                    f"[{spec.name} tokenizer] step {step + 1}/{cfg.steps} loss {loss.item():.4f} "
                    f"(rec {parts['rec']:.4f}, vq {parts['vq']:.4f}) {clock.elapsed():.0f}s"
                )
    tok.eval().requires_grad_(False)
    ids, _ = _codes_and_pool(tok, spec.family, probe)
    usage = int((torch.bincount(ids, minlength=_codebook(tok).weight.shape[0]) > 0).sum())
    every = max(1, cfg.steps // 50)
    stats = {
        "config": asdict(cfg),
        "seed": seed,
        "n_train_images": N,
        "steps": cfg.steps,
        "epochs": round(cfg.steps * cfg.batch_size / N, 2),
        "params": n_params(tok),
        "loss_curve": {
            "every_steps": every,
            "total_rec_vq": [
                [round(v, 5) for v in np.mean(losses[i : i + every], axis=0)] for i in range(0, len(losses), every)
            ],
        },
        "final_loss": round(float(np.mean([x[0] for x in losses[-20:]])), 5),
        "dead_codes_revived": revived,
        "codes_used_on_probe": usage,
        "timing": clock.to_dict(),
    }
    return tok, stats


# ---------------------------------------------------------------------------------------------------
# 4. Transformers
def build_transformer_for_training(spec: ModelSpec, seed: int) -> nn.Module:
    """A freshly initialised transformer of `spec` (the official init of each family) in train mode."""
    torch.manual_seed(seed)
    if spec.family == "var":
        from iarmem_core.models.var import VAR

        tok = spec.tokenizer
        m = VAR(vocab_size=tok["vocab_size"], Cvae=tok["z_channels"], **spec.transformer)
        m.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
        return m.train()
    if spec.family == "rar":
        from iarmem_core.models.rar import RAR

        return RAR(**spec.transformer).train()
    raise ValueError(f"train-demo trains VAR and RAR transformers, not {spec.family!r} ({spec.name})")


def _transformer_loss(
    model: nn.Module,
    tok: nn.Module,
    family: str,
    flat_BN: torch.Tensor,
    labels_B: torch.Tensor,
    scale_slices: Sequence[slice],
    label_dropout: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Teacher-forced cross entropy over all tokens, with label dropout to the null class."""
    if family == "var":
        with torch.no_grad():
            x_BLCv = tok.quantize.idxBl_to_var_input([flat_BN[:, s] for s in scale_slices])
        drop = torch.rand(labels_B.shape, generator=gen) < label_dropout
        labels_B = torch.where(drop, model.num_classes, labels_B)
        logits_BLV = model(labels_B, x_BLCv)  # (VAR's own label dropout is off: cond_drop_rate set to 0 below)
        return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), flat_BN.reshape(-1))
    labels_B = torch.where(torch.rand(labels_B.shape, generator=gen) < label_dropout, -1, labels_B)
    logits_BNV, targets_BN = model(flat_BN, labels_B)
    return F.cross_entropy(logits_BNV.reshape(-1, logits_BNV.shape[-1]), targets_BN.reshape(-1))


def make_adapter(spec: ModelSpec, tok: nn.Module, transformer: nn.Module) -> IARAdapter:
    """An adapter over in-memory modules (eval copies are not made: callers switch modes themselves)."""
    return adapter_class(spec.family)(spec, tok, transformer, torch.device("cpu"))


def train_transformer(
    spec: ModelSpec,
    cfg: TransformerTrainConfig,
    tok: nn.Module,
    tokens_VN: torch.Tensor,
    labels_V: torch.Tensor,
    n_views: int,
    stream: np.ndarray,
    seed: int,
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
    log: Log = _stderr_log,
    checkpoint_dir: Path | None = None,
) -> tuple[nn.Module, dict]:
    """Train the transformer of `spec` on pre-tokenized views; returns (model in eval mode, stats).

    `tokens_VN` holds `n_views` token rows per training image (view v of image i at row i * n_views + v;
    view 0 is the image itself, view 1 its mirror); `stream` is one epoch of image indices with the
    planted duplicates (`demo_training_indices`), reshuffled per epoch with the same seed. `on_epoch(e,
    model)` runs after every `eval_every` epochs and its dict joins the curve. With `checkpoint_dir` the
    fp32 weights after every epoch are kept there (epoch_{e}.safetensors), for exploring the curve.
    """
    model = build_transformer_for_training(spec, seed + 1)
    if spec.family == "var":
        model.cond_drop_rate = 0.0  # label dropout is drawn from our seeded generator instead
    gen = torch.Generator().manual_seed(seed + 2)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n and "pos" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n and "pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    adapter = make_adapter(spec, tok, model)
    slices = adapter.scale_slices
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(stream) // cfg.batch_size
    curve, loss_epochs, step = [], [], 0
    clock = Clock()
    with clock:
        for epoch in range(cfg.epochs):
            model.train()
            perm = rng.permutation(stream)
            ep_losses = []
            for i in range(steps_per_epoch):
                img = torch.from_numpy(perm[i * cfg.batch_size : (i + 1) * cfg.batch_size])
                view = (
                    torch.randint(0, n_views, img.shape, generator=gen)
                    if cfg.augmentation == "flip"
                    else torch.zeros_like(img)
                )
                rows = img * n_views + view
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, cfg.warmup_steps, None, cfg.lr)
                loss = _transformer_loss(
                    model, tok, spec.family, tokens_VN[rows], labels_V[rows], slices, cfg.label_dropout, gen
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                ep_losses.append(loss.item())
            loss_epochs.append(round(float(np.mean(ep_losses)), 5))
            log(
                f"[{spec.name} transformer] epoch {epoch + 1}/{cfg.epochs} loss {loss_epochs[-1]:.4f} "
                f"{clock.elapsed():.0f}s"
            )
            if checkpoint_dir is not None:
                save_weights(model, Path(checkpoint_dir) / f"epoch_{epoch + 1}.safetensors", fp16=False)
            if (
                on_epoch is not None
                and cfg.eval_every
                and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
            ):
                model.eval()
                t0 = time.perf_counter()
                point = {"epoch": epoch + 1, "train_loss": loss_epochs[-1], **on_epoch(epoch + 1, model)}
                point["eval_s"] = round(time.perf_counter() - t0, 1)
                curve.append(point)
                log(f"[{spec.name} curve] {json.dumps(_json_safe(point))}")
    model.eval().requires_grad_(False)
    eval_s = sum(p["eval_s"] for p in curve)
    stats = {
        "config": asdict(cfg),
        "seed": seed,
        "params": n_params(model),
        "steps": step,
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "stream_length": int(len(stream)),
        "n_views": n_views,
        "loss_per_epoch": loss_epochs,
        "timing": {
            **clock.to_dict(),
            "curve_eval_wall_s": round(eval_s, 1),
            "train_only_wall_s": round(clock.wall - eval_s, 1),
        },
        "curve": curve,
    }
    return model, stats


# ---------------------------------------------------------------------------------------------------
# 5. Measurements (the numbers of bench/demo_memorization.py and the model cards)
@torch.no_grad()
def copy_threshold(
    adapter: IARAdapter, train_B3HW: torch.Tensor, max_false_rate: float = 0.01, n_query: int = 500, seed: int = 0
) -> dict:
    """SSIM threshold above which a generation counts as a copy, calibrated on known *different* pairs.

    For n_query training images, the most similar other training image (highest SSIM among the 5 nearest
    by pixel distance) is found and both are reconstructed by the tokenizer; the threshold is the value
    that at most `max_false_rate` of these nearest-distinct-neighbour pairs exceed. Fashion-MNIST has
    near-duplicates, so this is stricter than a fixed 0.9; it depends on the tokenizer only.
    """
    from iarmem_core.metrics import calibrate_threshold, ssim

    g = torch.Generator().manual_seed(seed)
    N = train_B3HW.shape[0]
    q = torch.randperm(N, generator=g)[: min(n_query, N - 1)]
    flat = train_B3HW[:, 0].reshape(N, -1)
    d_QN = torch.cdist(flat[q], flat)
    d_QN[torch.arange(len(q)), q] = float("inf")
    cand_Q5 = d_QN.topk(min(5, N - 1), largest=False).indices
    a = train_B3HW[q][:, None].expand(-1, cand_Q5.shape[1], -1, -1, -1).reshape(-1, *train_B3HW.shape[1:])
    b = train_B3HW[cand_Q5.reshape(-1)]
    s = ssim(a, b).view(len(q), -1)
    best = cand_Q5[torch.arange(len(q)), s.argmax(1)]
    ra = torch.cat([adapter.reconstruct(x).cpu() for x in train_B3HW[q].split(250)])
    rb = torch.cat([adapter.reconstruct(x).cpu() for x in train_B3HW[best].split(250)])
    scores = ssim(ra, rb)
    cal = calibrate_threshold(torch.empty(0), scores, max_false_rate=max_false_rate)
    return {
        "measure": "ssim",
        "threshold": round(cal.threshold, 4),
        "max_false_rate": max_false_rate,
        "false_rate": round(cal.false_rate, 4),
        "n_pairs": int(len(q)),
        "pixel_ssim_nearest_pairs_p50_p95_p99": [
            round(float(v), 4) for v in torch.quantile(s.max(1).values, torch.tensor([0.5, 0.95, 0.99]))
        ],
        "recon_ssim_nearest_pairs_p50_p95_p99": [
            round(float(v), 4) for v in torch.quantile(scores, torch.tensor([0.5, 0.95, 0.99]))
        ],
        "how": "SSIM between the tokenizer's reconstructions of a training image and of its most similar "
        "other training image (top-5 by pixel distance, best SSIM), for 500 training images; the "
        "threshold is exceeded by at most max_false_rate of these known-different pairs",
    }


@torch.no_grad()
def memorization_scores(
    adapter: IARAdapter,
    images_B3HW: torch.Tensor,
    labels_B: torch.Tensor,
    prefixes: Sequence[int],
    batch_size: int = 200,
) -> dict:
    """Per-image scores: teacher-forced token accuracy [B] and, per prefix P, greedy generation from the
    first P true tokens compared with the tokenizer's reconstruction (SSIM [B], token match [B] over the
    generated positions, exact [B] = every generated token equal)."""
    from iarmem_core.metrics import ssim

    tf_acc, out = [], {p: {"ssim": [], "token_match": [], "exact": []} for p in prefixes}
    for x, y in zip(images_B3HW.split(batch_size), labels_B.split(batch_size)):
        toks = adapter.tokenize(x)
        flat = adapter.flatten(toks)
        recon = adapter.decode(toks)
        logits = adapter.teacher_forced_logits(toks, y)
        tf_acc.append((logits.argmax(-1) == flat).float().mean(1))
        for p in prefixes:
            gen = adapter.flatten(adapter.generate(y, prefix=toks, n_prefix=p, cfg=0.0, top_k=1))
            same = (gen[:, p:] == flat[:, p:]).float()
            out[p]["ssim"].append(ssim(adapter.decode(gen), recon))
            out[p]["token_match"].append(same.mean(1))
            out[p]["exact"].append(same.min(1).values)
    res = {"token_acc": torch.cat(tf_acc)}
    res["prefix"] = {p: {k: torch.cat(v) for k, v in d.items()} for p, d in out.items()}
    return res


def _group_summary(scores: dict, idx: np.ndarray, threshold: float, main_prefix: int) -> dict:
    sel = torch.as_tensor(idx, dtype=torch.long)
    by_prefix = {}
    for p, d in scores["prefix"].items():
        s, tm, ex = d["ssim"][sel], d["token_match"][sel], d["exact"][sel]
        by_prefix[str(p)] = {
            "reproduced": float((s > threshold).float().mean()),
            "ssim_mean": float(s.mean()),
            "token_match_mean": float(tm.mean()),
            "exact_match": float(ex.mean()),
        }
    main = by_prefix[str(main_prefix)]
    return {
        "n": int(len(idx)),
        "token_acc": float(scores["token_acc"][sel].mean()),
        "reproduced": main["reproduced"],
        "exact_match": main["exact_match"],
        "token_match_mean": main["token_match_mean"],
        "ssim_mean": main["ssim_mean"],
        "by_prefix": by_prefix,
    }


@torch.no_grad()
def sample_quality(
    adapter: IARAdapter,
    feature_net: nn.Module | None,
    heldout_B3HW: torch.Tensor | None,
    samples_per_class: int,
    seed: int = 0,
    batch_size: int = 200,
    sampling: dict | None = None,
) -> dict:
    """Class-conditional samples with the spec's CFG settings: class accuracy of the feature net on them,
    and the Frechet distance of their features to the held-out images' (demo-fashion-cnn space)."""
    from iarmem_core.intervention import sampling_kwargs
    from iarmem_core.metrics import class_accuracy, frechet_distance

    kw = sampling_kwargs(adapter) if sampling is None else dict(sampling)
    labels = torch.arange(adapter.num_classes).repeat_interleave(samples_per_class)
    imgs = []
    for i, y in enumerate(labels.split(batch_size)):
        imgs.append(adapter.decode(adapter.generate(y, seed=seed + i, **kw)).cpu())
    x = torch.cat(imgs)
    out = {"n_samples": int(len(labels)), "sampling": kw}
    if feature_net is not None:
        out["sample_class_acc"] = class_accuracy(feature_net, x, labels)
    if feature_net is not None and heldout_B3HW is not None:
        fa = torch.cat([feature_net.features(c) for c in x.split(500)])
        fb = torch.cat([feature_net.features(c) for c in heldout_B3HW.split(500)])
        out["fd_samples_heldout"] = frechet_distance(fa, fb)
    return out


def _stratified(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded class-stratified sample of n indices (all when n is None or too large), sorted."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if c < n % len(classes) else 0) for c in range(len(classes))]
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per)]))


def demo_groups(
    n_unique: int | None, n_heldout: int | None, seed: int = 0, bundle_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Images [M, 3, 32, 32], labels [M] and {group name: indices into them, ids} for the measured groups:
    planted_<count>x per duplication count, unique (class-stratified sample) and heldout."""
    train = data.load_demo("train", bundle_dir)
    held = data.load_demo("heldout", bundle_dir)
    counts = train.meta["count"]
    groups: dict[str, np.ndarray] = {}
    for c in sorted(set(int(v) for v in counts) - {1}):
        groups[f"planted_{c}x"] = np.flatnonzero(counts == c)
    uniq = np.flatnonzero(counts == 1)
    groups["unique"] = uniq[_stratified(train.labels[uniq], n_unique, seed)]
    h = _stratified(held.labels, n_heldout, seed)
    xs, ys, out, start = [], [], {}, 0
    for name, idx in groups.items():
        xs.append(train.images(idx))
        ys.append(train.labels_tensor(idx))
        out[name] = {"rows": np.arange(start, start + len(idx)), "ids": [train.ids[i] for i in idx]}
        start += len(idx)
    xs.append(held.images(h))
    ys.append(held.labels_tensor(h))
    out["heldout"] = {"rows": np.arange(start, start + len(h)), "ids": [held.ids[i] for i in h]}
    return torch.cat(xs), torch.cat(ys), out


def measure_demo_model(
    adapter: IARAdapter,
    feature_net: nn.Module | None,
    prefixes: Sequence[int],
    main_prefix: int,
    cfg: MeasureConfig = MeasureConfig(),
    threshold: dict | None = None,
    bundle_dir: str | os.PathLike | None = None,
    quality: bool = True,
) -> dict:
    """The memorization and quality numbers of one demo model (layout of bench/demo_memorization.py).

    groups: per planted count, unique and heldout: n, teacher-forced token accuracy, `reproduced` (SSIM of
    the greedy generation from the first `main_prefix` true tokens to the reconstruction above the
    calibrated threshold), exact token match, and the same per prefix length in `by_prefix`.
    """
    t0 = time.perf_counter()
    if threshold is None:
        train = data.load_demo("unique", bundle_dir)
        threshold = copy_threshold(adapter, train.images(), cfg.copy_false_rate, seed=cfg.seed)
    x, y, groups = demo_groups(cfg.n_unique, cfg.n_heldout, cfg.seed, bundle_dir)
    scores = memorization_scores(adapter, x, y, prefixes, cfg.batch_size)
    M: dict = {
        "groups": {g: _group_summary(scores, d["rows"], threshold["threshold"], main_prefix) for g, d in groups.items()}
    }
    M["similarity"] = "ssim"
    M["threshold"] = threshold["threshold"]
    M["reproduced_definition"] = (
        f"greedy generation (top-1, no CFG, class-conditional) from the first {main_prefix} true tokens; "
        f"reproduced when SSIM(decoded generation, tokenizer reconstruction) > {threshold['threshold']}; "
        f"exact_match = every generated token equals the image's own token"
    )
    M["threshold_calibration"] = threshold
    M["main_prefix_tokens"] = main_prefix
    M["prefixes_tokens"] = list(prefixes)
    held = data.load_demo("heldout", bundle_dir).images()
    if quality:
        recon = torch.cat([adapter.reconstruct(c).cpu() for c in held.split(cfg.batch_size)])
        from iarmem_core.metrics import ssim

        M["recon_ssim_heldout"] = float(ssim(recon, held).mean())
        M["recon_mse_heldout"] = float(F.mse_loss(recon, held))
        q = sample_quality(adapter, feature_net, held, cfg.samples_per_class, cfg.seed, cfg.batch_size)
        M["sample_class_acc"] = q.get("sample_class_acc")
        M["fd_samples_heldout"] = q.get("fd_samples_heldout")
        M["fd_feature_space"] = "demo-fashion-cnn (not Inception-FID)"
        M["n_samples"] = q["n_samples"]
        M["sampling"] = q["sampling"]
    M["measure_seconds"] = round(time.perf_counter() - t0, 1)
    return _json_safe(M)


# ---------------------------------------------------------------------------------------------------
# 6. The feature network
def train_features(
    out_dir: Path,
    cfg: FeatureNetTrainConfig,
    seed: int,
    log: Log = _stderr_log,
    bundle_dir: str | os.PathLike | None = None,
) -> dict:
    """Train and save the FeatureNet (`out_dir`/demo-fashion-cnn.safetensors + .json); returns its card."""
    from iarmem_core.demo.features import train_feature_net
    from iarmem_core.metrics import class_accuracy, fashion_to_input, save_feature_net
    from iarmem_core.metrics.featurenet import prepare_images

    bundle = data.demo.load_bundle(bundle_dir)
    n_tr = int((bundle.split == "train").sum())
    held_x = bundle.images_N28[n_tr:]
    held_y = torch.from_numpy(bundle.labels[n_tr:])
    src = demo_bundle.DEBIAN_FASHION_DIR
    files = demo_bundle.SOURCE_FILES
    use_debian = cfg.source == "debian" or (
        cfg.source == "auto" and all((src / files[k]).exists() for k in ("train_images", "train_labels"))
    )
    if use_debian:
        x = demo_bundle.read_idx(src / demo_bundle.SOURCE_FILES["train_images"], 16).reshape(-1, 28, 28)
        y = demo_bundle.read_idx(src / demo_bundle.SOURCE_FILES["train_labels"], 8).astype(np.int64)
        source = f"Fashion-MNIST full train file ({src / demo_bundle.SOURCE_FILES['train_images']}, Debian)"
    else:
        x, y = bundle.images_N28[:n_tr], bundle.labels[:n_tr]
        source = "bundled demo training split (assets/demo_data, 4000 images)"
    # the held-out images come from the t10k file; drop any training image with the same pixels anyway
    held_hash = {hashlib.sha256(h.tobytes()).digest() for h in held_x}
    keep = np.array([hashlib.sha256(im.tobytes()).digest() not in held_hash for im in x])
    x, y = x[keep], y[keep]
    log(f"[features] training on {len(x)} images from {source}")
    clock = Clock()
    with clock:
        net, stats = train_feature_net(
            fashion_to_input(torch.from_numpy(x.copy())),
            torch.from_numpy(y),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=seed,
        )
    acc = class_accuracy(net, prepare_images(fashion_to_input(torch.from_numpy(held_x.copy())), 32), held_y)
    log(f"[features] held-out accuracy {acc:.4f} in {clock.wall:.0f}s")
    card = {
        "data": {
            "source": source,
            "n_train": int(len(x)),
            "removed_equal_to_heldout": int((~keep).sum()),
            "heldout_kept_out": "the bundled held-out images (t10k file) are not trained on",
        },
        "heldout_accuracy": round(acc, 4),
        "training": _json_safe(stats),
        "timing": clock.to_dict(),
        "command": "python -m iarmem_core train-demo --only features",
    }
    save_feature_net(net, out_dir / FEATURE_NET_FILE, card=card)
    return card


def load_demo_feature_net(out_dir: str | os.PathLike | None = None) -> nn.Module | None:
    """The FeatureNet in `out_dir` (default assets/), or None when it has not been trained yet."""
    from iarmem_core.metrics import load_feature_net

    p = Path(out_dir or ASSETS) / FEATURE_NET_FILE
    return load_feature_net(p) if p.is_file() else None


# ---------------------------------------------------------------------------------------------------
# 7. One demo model end to end, and the command
def _views(images_B3HW: torch.Tensor, augmentation: str) -> tuple[torch.Tensor, int]:
    """[B * V, 3, H, W] views per image (image, then its mirror with "flip") and V."""
    if augmentation == "none":
        return images_B3HW, 1
    if augmentation != "flip":
        raise ValueError(
            f"train-demo pre-tokenizes its views: augmentation must be 'none' or 'flip', got {augmentation!r}"
        )
    return torch.stack([images_B3HW, images_B3HW.flip(-1)], 1).flatten(0, 1), 2


def _data_summary(bundle_dir: str | os.PathLike | None) -> dict:
    m = data.demo_manifest(bundle_dir)
    return {
        "dataset": m["dataset"],
        "arrays_sha256": m["arrays_sha256"],
        "n_train_unique_images": m["n_train_unique_images"],
        "n_heldout": m["n_heldout"],
        "n_planted": m["n_planted"],
        "training_stream_length": m["training_stream_length"],
        "n_unique_once": m["n_train_unique_images"] - m["n_planted"],
        "planted_counts": sorted({p["count"] for p in m["planted"]}),
        "planted": [{k: p[k] for k in ("id", "label", "class_name", "count")} for p in m["planted"]],
        "counts_per_class": m["counts_per_class"],
        "source": m["source"]["package"],
        "licence": m["source"]["licence"],
    }


def train_demo_model(
    plan: DemoPlan,
    out_dir: Path,
    seed: int = 0,
    feature_net: nn.Module | None = None,
    log: Log = _stderr_log,
    bundle_dir: str | os.PathLike | None = None,
    measure: bool = True,
    checkpoint_dir: Path | None = None,
) -> dict:
    """Tokenizer, transformer, fp16 files, measurements on the files as loaded, and the card; returns it."""
    spec = plan.spec
    model_dir = out_dir / spec.name
    train = data.load_demo("train", bundle_dir)
    keep = np.arange(len(train))
    if plan.train_subset is not None:  # planted images plus a class-stratified sample of unique ones
        u = np.flatnonzero(train.meta["count"] == 1)
        keep = np.sort(
            np.concatenate(
                [np.flatnonzero(train.meta["count"] > 1), u[_stratified(train.labels[u], plan.train_subset, seed)]]
            )
        )
    images, labels = train.images(keep), train.labels_tensor(keep)
    uniq = train.meta["count"][keep] == 1

    # a. tokenizer (unique training images, each once per epoch)
    tok, tok_stats = train_tokenizer(spec, plan.tokenizer, images, seed, log)

    # b. transformer on the stream with planted copies; the tokens of every view are computed once
    views, n_views = _views(images, plan.transformer.augmentation)
    with torch.device("meta"):  # the layout (token grids) only; the weights come in train_transformer
        layout = adapter_class(spec.family).build_transformer(spec)
    adapter = make_adapter(spec, tok, layout)
    with Clock() as tk:
        tokens_VN = _tokenize_all(adapter, views)
    labels_V = labels.repeat_interleave(n_views)
    stream = data.demo_training_indices(seed, 1, bundle_dir)
    if plan.train_subset is not None:  # the stream restricted to the subset, as rows of `images`
        row_of = np.full(len(train), -1)
        row_of[keep] = np.arange(len(keep))
        stream = row_of[stream[row_of[stream] >= 0]]
    if plan.transformer.eval_every:
        threshold = copy_threshold(adapter, images[uniq], plan.curve_measure.copy_false_rate, seed=seed)
        log(f"[{spec.name}] copy threshold (SSIM) {threshold['threshold']}")
        cx, cy, cgroups = demo_groups(plan.curve_measure.n_unique, plan.curve_measure.n_heldout, seed, bundle_dir)

    def on_epoch(epoch: int, model: nn.Module) -> dict:
        a = make_adapter(spec, tok, model)
        sc = memorization_scores(a, cx, cy, plan.prefixes, plan.curve_measure.batch_size)
        point = {
            g: {
                k: v
                for k, v in _group_summary(sc, d["rows"], threshold["threshold"], plan.main_prefix).items()
                if k != "by_prefix"
            }
            for g, d in cgroups.items()
        }
        point["reproduced_by_prefix"] = {
            g: {
                p: round(
                    float(
                        (sc["prefix"][p]["ssim"][torch.as_tensor(d["rows"])] > threshold["threshold"]).float().mean()
                    ),
                    3,
                )
                for p in plan.prefixes
            }
            for g, d in cgroups.items()
        }
        if feature_net is not None:  # (no Frechet distance here: 100 samples are too few for 128-d features)
            q = sample_quality(a, feature_net, None, plan.curve_measure.samples_per_class, seed)
            point["sample_class_acc"] = q["sample_class_acc"]
        return point

    model, tr_stats = train_transformer(
        spec,
        plan.transformer,
        tok,
        tokens_VN,
        labels_V,
        n_views,
        stream,
        seed,
        on_epoch if plan.transformer.eval_every else None,
        log,
        checkpoint_dir,
    )

    # c. fp16 files, reloaded through the registry's adapter, measured as shipped
    meta = {"format": CARD_FORMAT, "model": spec.name, "seed": seed}
    size_tok = save_weights(tok, model_dir / "tokenizer.safetensors", {**meta, "component": "tokenizer"})
    size_tr = save_weights(model, model_dir / "transformer.safetensors", {**meta, "component": "transformer"})
    shipped = adapter_class(spec.family).load(
        spec,
        transformer_path=model_dir / "transformer.safetensors",
        tokenizer_path=model_dir / "tokenizer.safetensors",
        device="cpu",
    )
    card = {
        "format": CARD_FORMAT,
        "format_version": 1,
        "model": spec.name,
        "family": spec.family,
        "description": spec.description,
        "seed": seed,
        "command": f"python -m iarmem_core train-demo --only {spec.family} --seed {seed}",
        "files": {
            "tokenizer": {"path": f"{spec.name}/tokenizer.safetensors", "bytes": size_tok, "dtype": "fp16"},
            "transformer": {"path": f"{spec.name}/transformer.safetensors", "bytes": size_tr, "dtype": "fp16"},
        },
        "data": {**_data_summary(bundle_dir), "train_subset": plan.train_subset},
        "architecture": {
            "tokenizer": spec.tokenizer,
            "transformer": spec.transformer,
            **{
                k: v
                for k, v in shipped.describe().items()
                if k
                in (
                    "token_grids",
                    "n_tokens",
                    "vocab_size",
                    "blocks",
                    "units_per_block",
                    "transformer_params",
                    "tokenizer_params",
                )
            },
        },
        "sampling": spec.sampling,
        "train_augmentation": spec.train_augmentation,
        "training": {
            "tokenizer": tok_stats,
            "tokenize_views_s": round(tk.wall, 1),
            "transformer": {k: v for k, v in tr_stats.items() if k != "curve"},
            "order": "raster" if spec.family == "rar" else "next-scale",
        },
        "curve": {
            "what": f"after each epoch: curve sets of {plan.curve_measure.n_unique} unique and "
            f"{plan.curve_measure.n_heldout} held-out images, all planted; "
            f"{plan.curve_measure.samples_per_class} samples per class",
            "points": tr_stats["curve"],
        },
        "checkpoint_choice": (
            f"{plan.transformer.epochs} epochs; the learning rate is constant after the "
            f"warm-up, so this model is the last point of its curve. {plan.choice}"
        ),
    }
    if measure:
        card = remeasure(plan, out_dir, feature_net, card, log, bundle_dir)
    (model_dir / "card.json").write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    return card


def remeasure(
    plan: DemoPlan,
    out_dir: Path,
    feature_net: nn.Module | None,
    card: dict | None = None,
    log: Log = _stderr_log,
    bundle_dir: str | os.PathLike | None = None,
) -> dict:
    """Measure the shipped files of `plan` in `out_dir` and put the numbers (and the spec's current sampling
    settings) into its card; returns the card (written when it was read from disk)."""
    spec = plan.spec
    model_dir = Path(out_dir) / spec.name
    write = card is None
    if card is None:
        card = json.loads((model_dir / "card.json").read_text())
    shipped = adapter_class(spec.family).load(
        spec,
        transformer_path=model_dir / "transformer.safetensors",
        tokenizer_path=model_dir / "tokenizer.safetensors",
        device="cpu",
    )
    log(f"[{spec.name}] measuring the shipped (fp16) weights")
    with Clock() as mc:
        card["measurements"] = measure_demo_model(
            shipped, feature_net, plan.prefixes, plan.main_prefix, plan.measure, None, bundle_dir
        )
    card["measure_timing"] = {**mc.to_dict(), "torch_threads": torch.get_num_threads()}
    card["sampling"] = spec.sampling
    if write:
        (model_dir / "card.json").write_text(json.dumps(_json_safe(card), indent=1) + "\n")
    return card


def train_demo(
    out: str | os.PathLike = ASSETS,
    only: Sequence[str] = ("features", "var", "rar"),
    seed: int = 0,
    plans: dict[str, DemoPlan] | None = None,
    features_cfg: FeatureNetTrainConfig = FeatureNetTrainConfig(),
    log: Log = _stderr_log,
    bundle_dir: str | os.PathLike | None = None,
    measure: bool = True,
) -> dict:
    """Re-create the demo assets in `out` (features first: the models' measurements use it)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = plans or default_plans()
    report: dict = {"seed": seed, "torch_threads": torch.get_num_threads(), "parts": {}}
    total = Clock()
    with total:
        if "features" in only:
            with Clock() as c:
                card = train_features(out_dir, features_cfg, seed, log, bundle_dir)
            report["parts"]["features"] = {"timing": c.to_dict(), "heldout_accuracy": card["heldout_accuracy"]}
        feature_net = load_demo_feature_net(out_dir)
        if feature_net is None and measure:
            log(
                f"[train-demo] no {FEATURE_NET_FILE} in {out_dir}: class accuracy and FD are skipped "
                f"(run --only features first)"
            )
        for fam in ("var", "rar"):
            if fam not in only:
                continue
            plan = next(p for p in plans.values() if p.spec.family == fam)
            with Clock() as c:
                card = train_demo_model(plan, out_dir, seed, feature_net, log, bundle_dir, measure)
            tr = card["training"]
            report["parts"][plan.spec.name] = {
                "timing": c.to_dict(),
                "tokenizer_s": tr["tokenizer"]["timing"]["wall_s"],
                "transformer_s": tr["transformer"]["timing"]["wall_s"],
                "measure_s": card.get("measure_timing", {}).get("wall_s"),
            }
    report["timing"] = total.to_dict()
    return report


__all__ = [
    "DemoPlan",
    "FeatureNetTrainConfig",
    "MeasureConfig",
    "TokenizerTrainConfig",
    "TransformerTrainConfig",
    "copy_threshold",
    "default_plans",
    "demo_groups",
    "measure_demo_model",
    "memorization_scores",
    "sample_quality",
    "save_weights",
    "train_demo",
    "train_demo_model",
    "train_features",
    "train_tokenizer",
    "train_transformer",
]
