"""Train the bundled FeatureNet on the full Fashion-MNIST train set and print one JSON object.

Needs Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). Reports test accuracy per
epoch, wall and CPU time, torch threads and the load average, so `train-demo` can pick the epochs, and the
training's model FLOPs (3 x the counted forward per image and epoch) against the measured fp32 peak.

    PYTHONPATH=. python bench/feature_net_fashion.py --epochs 2 [--batch-size 128] [--out net.safetensors]

Measured 2026-11-29 on the project machine (2 cores shared with other jobs, load average 3-6), batch 128,
seed 0, test accuracy on the 10k test set:
    --threads 1: 1 epoch 0.892 (37 s wall), 2 epochs 0.905 (71 s), 3 epochs 0.911 (96 s CPU, 169 s wall)
    --threads 2: 1 epoch 0.891 in 261 s wall: OpenMP threads on an oversubscribed machine are far slower
    than one thread; on a busy machine use --threads 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch

from iarmem_core.demo.features import train_feature_net
from iarmem_core.metrics import class_accuracy, fashion_to_input, save_feature_net
from iarmem_core.metrics.featurenet import prepare_images

DATA = Path("/usr/share/datasets/fashion-mnist")


def load_split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of the 'train' or 't10k' split."""
    x = np.frombuffer(gzip.open(DATA / f"{prefix}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(DATA / f"{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.from_numpy(x.reshape(-1, 28, 28).copy()), torch.from_numpy(y.astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also save the net here (.safetensors)")
    ap.add_argument("--device", default="cpu", help="cpu only: the trainer (iarmem_core.demo.features) runs on CPU")
    args = ap.parse_args()
    if args.device != "cpu":
        print(json.dumps({"skipped": f"--device {args.device}: the FeatureNet trainer runs on CPU only"}))
        return
    torch.set_num_threads(args.threads)
    from iarmem_core import flops
    from iarmem_core.metrics import FeatureNet

    peak = flops.measure_peak("cpu")
    with torch.device("meta"):
        meta_net = FeatureNet()
    fwd_per_image = flops.count(meta_net, torch.zeros(1, 3, 32, 32, device="meta"))
    xtr, ytr = load_split("train")
    xte, yte = load_split("t10k")
    xtr, xte = fashion_to_input(xtr), fashion_to_input(xte)  # uint8 [N, 1, 32, 32]
    load0 = os.getloadavg()[0]
    net, stats = train_feature_net(
        xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, val=(xte, yte)
    )
    test_acc = class_accuracy(net, prepare_images(xte, 32), yte)
    out = {
        "test_acc": test_acc,
        "val_acc_per_epoch": stats["val_acc_per_epoch"],
        "loss_per_epoch": stats["loss_per_epoch"],
        "train_seconds": round(stats["seconds"], 1),
        "train_cpu_seconds": round(stats["cpu_seconds"], 1),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "torch_threads": stats["torch_threads"],
        "n_train": stats["n_train"],
        "loadavg_1min_before": load0,
        "loadavg_1min_after": os.getloadavg()[0],
    }
    # training = forward + backward, about 3x the forward's FLOPs per image and epoch (default FeatureNet config)
    work = 3 * fwd_per_image * stats["n_train"] * args.epochs
    peak = flops.best_peak(peak, flops.measure_peak("cpu"))  # start and end: the better of the two
    out["flops"] = {
        **flops.fraction(work, stats["seconds"], peak),
        "what": "3 x forward FLOPs (counted on meta) x images x epochs",
    }
    if args.out:
        save_feature_net(
            net,
            args.out,
            card={
                "data": "fashion-mnist train (60k)",
                "test_acc": test_acc,
                "train": {k: v for k, v in stats.items() if k != "config"},
            },
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
