"""Does batching pay? End-to-end time per image at batch B vs batch 1, interleaved in one process.

    python benchmarks/bench_batching.py [--variant d0] [--batch 8] [--rounds 10] [--device cpu]

Each round runs the same B VGA-sized uint8 images once as B single-image calls and once as one
batch-B call of ``Detector`` (the default path: fused model, official pre- and post-processing),
alternating which goes first, so drift on a shared machine hits both alike. Prints the median time
per image of each and their ratio (batch ÷ single: ≤ 1 means batching pays), with the spread of
the per-round ratios. Random weights from seed 0, as ``effdet-bench``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="d0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    from effdet_torch import Detector, create_model

    torch.manual_seed(0)
    det = Detector(create_model(args.variant).fuse_for_inference().to(args.device))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.batch)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def single() -> None:
        for img in images:
            det([img])

    def batched() -> None:
        det(images)

    for fn in (single, batched):  # warm-up: kernels, caches, anchors
        fn()
    per_image: dict[str, list[float]] = {"single": [], "batched": []}
    for r in range(args.rounds):
        order = (("single", single), ("batched", batched)) if r % 2 == 0 else (("batched", batched), ("single", single))
        for name, fn in order:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            per_image[name].append((time.perf_counter() - t) * 1000 / args.batch)
    ratios = [b / s for b, s in zip(per_image["batched"], per_image["single"])]
    s_med, b_med = statistics.median(per_image["single"]), statistics.median(per_image["batched"])
    print(f"{det.config.name} {det.image_size[0]}x{det.image_size[1]}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print(f"batch 1: {s_med:.1f} ms per image   batch {args.batch}: {b_med:.1f} ms per image   "
          f"ratio {b_med / s_med:.3f} (per round: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
