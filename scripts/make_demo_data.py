"""Re-create the bundled demo data (assets/demo_data) from Debian's dataset-fashion-mnist."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iarmem_core.data import DEMO_DIR
from iarmem_core.demo.bundle import DEBIAN_FASHION_DIR, build_demo_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(DEMO_DIR), help="output folder (default: assets/demo_data)")
    ap.add_argument(
        "--source", default=str(DEBIAN_FASHION_DIR), help="folder with the four Fashion-MNIST idx .gz files"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    split = build_demo_bundle(args.out, source_dir=args.source, seed=args.seed)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir()) / 2**20
    print(
        json.dumps(
            {
                "out": args.out,
                "mb": round(size, 2),
                "n_train": split["n_train_unique_images"],
                "n_heldout": split["n_heldout"],
                "n_planted": split["n_planted"],
                "training_stream_length": split["training_stream_length"],
                "arrays_sha256": split["arrays_sha256"],
            }
        )
    )


if __name__ == "__main__":
    main()
