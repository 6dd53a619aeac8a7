"""The official post-processing NMS: the default path vs the scalar reference (and, on the CPU, the
vectorised torch version that CUDA uses), in the same run, as ratios.

    python benchmarks/bench_nms.py [--repeats 5] [--device cpu]

Inputs: the official heads recorded on the chelsea image (golden/ and ../shared/golden/: d0, d1,
lite0 at 256×256, synthetic seed-1234 weights — every one of the 12 276 anchors passes the 0.001
score threshold, the hardest case for soft-NMS). Rows: the inference NMS (global, one group per
image) and the COCO-eval NMS (per class, top 5000 pairs), at batch 1 and 8 (the image repeated),
time per image; the reference runs the scalar NMSV5 group after group. Interleaved, median of N.
All give identical detections (checked here once per row). The default on the CPU is the compiled
kernel (``effdet_torch.nms_cpu``, numba; compiled before timing), on CUDA the vectorised version.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from effdet_torch.anchors import generate_anchors
from effdet_torch.config import get_config
from effdet_torch.postprocess import nms_groups, nms_groups_reference, per_class_candidates, pre_nms_global
from effdet_torch.soft_nms import batched_nms_v5

REPO = Path(__file__).resolve().parents[1]
CASES = {"efficientdet-d0": REPO / "golden/efficientdet-d0/tensors_chelsea.npz",
         "efficientdet-d1": REPO.parent / "shared/golden/efficientdet-d1/tensors_chelsea.npz",
         "efficientdet-lite0": REPO.parent / "shared/golden/efficientdet-lite0/tensors_chelsea.npz"}


def heads(variant: str, npz: Path) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recorded NHWC heads → ``cls [1, N, C]``, ``box [1, N, 4]`` (official anchor order), anchors."""
    z = np.load(npz)
    size = z["input/chelsea_preprocessed"].shape[1:3]
    cfg = get_config(variant, image_size=tuple(size))
    levels = range(cfg.min_level, cfg.max_level + 1)
    cls = torch.cat([torch.from_numpy(z[f"chelsea/class_net/level{lv}"]).reshape(1, -1, cfg.num_classes)
                     for lv in levels], 1)
    box = torch.cat([torch.from_numpy(z[f"chelsea/box_net/level{lv}"]).reshape(1, -1, 4) for lv in levels], 1)
    return cfg, cls, box, torch.from_numpy(generate_anchors(cfg, tuple(size)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}; ms per image, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'case':<34} {'reference':>10} {'vectorised':>11} {'default':>9} {'default/reference':>18}")
    for variant, npz in CASES.items():
        if not npz.exists():
            continue
        cfg, cls, box, anchors = heads(variant, npz)
        for bsz in args.batch:
            c, b = cls.expand(bsz, -1, -1), box.expand(bsz, -1, -1)
            bx, sc, _ = pre_nms_global(c, b, anchors)
            glob = (bx.reshape(-1, 4), sc.reshape(-1), torch.arange(bsz).repeat_interleave(sc.shape[1]), bsz)
            pc = per_class_candidates(cfg, c, b, anchors)
            per = (*pc[:3], bsz * cfg.num_classes)
            for name, inputs in (("global", glob), ("per-class", per)):
                on_dev = tuple(t.to(dev) if torch.is_tensor(t) else t for t in inputs)
                want = nms_groups_reference(cfg, *inputs)
                got = nms_groups(cfg, *on_dev)
                assert all(torch.equal(w, g_.cpu()) for w, g_ in zip(want, got)), f"{variant} {name}: differ"
                vec = lambda: _sync(batched_nms_v5(*on_dev, cfg.max_detections, cfg.nms_iou_threshold,  # noqa: E731
                                                   cfg.nms_score_threshold, cfg.nms_sigma / 2))
                assert all(torch.equal(w, g_.cpu()) for w, g_ in zip(want, vec())), f"{variant} {name}: vectorised differs"
                fns = {"ref": lambda: nms_groups_reference(cfg, *inputs), "vec": vec,
                       "default": lambda: _sync(nms_groups(cfg, *on_dev))}
                t = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        s = time.perf_counter()
                        fn()
                        t[k].append((time.perf_counter() - s) * 1000 / bsz)
                r, v, d = (statistics.median(t[k]) for k in ("ref", "vec", "default"))
                label = f"{variant.replace('efficientdet-', '')} {name} batch {bsz}"
                print(f"{label:<34} {r:10.1f} {v:11.1f} {d:9.2f} {d / r:18.4f}", flush=True)


def _sync(out):
    if out[0].is_cuda:
        torch.cuda.synchronize()
    return out


if __name__ == "__main__":
    main()
