"""Training the bundled feature network (the demo factory's; `iarmem_core.metrics.featurenet` defines it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

from iarmem_core.metrics.featurenet import FeatureNet, FeatureNetConfig, prepare_images
from iarmem_core.metrics.quality import class_accuracy

ProgressFn = Callable[[int, int, dict], None]


def train_feature_net(
    images_B3HW: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 2,
    batch_size: int = 128,
    seed: int = 0,
    progress: ProgressFn | None = None,
    *,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    hflip: bool = True,
    config: FeatureNetConfig | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet on CPU; returns (net in eval mode, stats dict).

    `images_B3HW`: float in [0, 1] or uint8, 1 or 3 channels (uint8 [B, 1, 32, 32] keeps 60k images at
    61 MB instead of 737 MB as float RGB; conversion happens per batch). AdamW with a one-cycle schedule,
    random horizontal flips (clothes are roughly mirror-symmetric). Seeded: the same inputs and seed give
    the same weights. `progress(step, total_steps, info)` is called every 20 steps and at the end; raise
    from it to cancel. `val=(images, labels)` adds the accuracy on that set to the stats after each epoch.
    """
    if images_B3HW.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_B3HW.shape[0]} images but {labels.shape[0]} labels")
    if images_B3HW.shape[0] < 2:
        raise ValueError(f"training needs at least 2 images, got {images_B3HW.shape[0]}")
    labels = labels.long()
    cfg = config or FeatureNetConfig()
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.n_classes):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {cfg.n_classes}); found {lo}..{hi}")
    n = images_B3HW.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size  # drop the last partial batch: BN dislikes tiny batches
    total = epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        net = FeatureNet(**asdict(cfg))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1))
    stats: dict = {
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total,
        "lr": lr,
        "seed": seed,
        "weight_decay": weight_decay,
        "hflip": hflip,
        "n_train": n,
        "config": asdict(cfg),
        "loss_per_epoch": [],
        "train_acc_per_epoch": [],
        "val_acc_per_epoch": [],
        "torch_threads": torch.get_num_threads(),
    }
    t0, c0 = time.perf_counter(), time.process_time()
    step, val_seconds, val_cpu = 0, 0.0, 0.0
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = prepare_images(images_B3HW[idx], cfg.in_size)
            if hflip:
                flip_B = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip_B[:, None, None, None], x.flip(-1), x)
            logits_BK = net(x)
            loss = F.cross_entropy(logits_BK, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits_BK.argmax(1) == labels[idx]).sum())
            if progress is not None and (step % 20 == 0 or step == total):
                progress(step, total, {"loss": loss.item()})
        seen = max(steps_per_epoch * batch_size, 1)
        stats["loss_per_epoch"].append(loss_sum / seen)
        stats["train_acc_per_epoch"].append(correct / seen)  # running accuracy in train mode (flips, BN)
        net.eval()
        if val is not None:
            tv, cv = time.perf_counter(), time.process_time()
            acc = class_accuracy(net, prepare_images(val[0], cfg.in_size), val[1])
            stats["val_acc_per_epoch"].append(acc)
            val_seconds, val_cpu = val_seconds + time.perf_counter() - tv, val_cpu + time.process_time() - cv
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    stats["seconds"] = time.perf_counter() - t0 - val_seconds  # training only
    stats["val_seconds"] = val_seconds
    stats["cpu_seconds"] = time.process_time() - c0 - val_cpu  # all threads; steadier on a shared machine
    return net, stats
