#!/usr/bin/env python
"""CPU vs CUDA on the official COCO-eval path: do the two devices give the same detections and AP?

Self-contained: writes a synthetic COCO-format set (``fixtures.synthetic_coco``), regenerates
the official-format d0 checkpoint from the project's ``golden/`` (``fixtures.synth_ckpt``, seed 1234,
the bundled BN side-car), runs ``run_eval`` on the CPU and twice on CUDA (TF32 off, as
``effdet-eval`` does by default), and prints

- matched / tie / bad rows: detections paired one to one per image with the core tolerance
  (``parity.golden.match_detections``: same class, |Δscore| <= 1e-5, IoU >= 0.9999 or coordinates
  within 1e-4·(1 + max|box|)); unmatched rows scored within 1e-5 of the image's last kept score are
  ties at the cut-off (synthetic weights saturate some images: all 100 scores 1.0), the rest bad;
- max |Δscore| and max |Δbox| over the pairs;
- ΔAP: the 12 COCO numbers of both runs on a ground truth derived from the CPU detections
  (synthetic weights detect nothing real, so the real annotations would give AP ≈ 0 on both;
  the derived boxes are not clipped to the image, as the detections are not);
- CUDA run-to-run: whether two CUDA runs are bit-identical; and images/s of each device.

Exit status 0 when at least 99 % of the rows agree (matched or tie) and |ΔAP| <= 0.005 on every
number, 1 otherwise, 2 without CUDA. Runs in well under 2 minutes on one GPU with a few CPU cores:

    python benchmarks/gpu_eval_check.py [--num-images 16] [--image-size 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a plain checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512, help="network input (d0's own size is 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", default="auto")
    p.add_argument("--post-workers", default="auto")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--save-rows", default=None, help="write both runs' eval rows (.npz) for a closer look")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (a dry run: cpu)")
    a = p.parse_args(argv)
    dev = a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_eval_check: CUDA is not available (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    from fixtures.synth_ckpt import write_synth_checkpoint
    from evaluation.coco import COCO_METRIC_NAMES, CocoEvalImages, category_mapping, evaluate_coco, load_annotations
    from evaluation.evaluate import detection_agreement, run_eval
    from effdet_torch.model import create_model
    from fixtures.synthetic_coco import annotations_from_detections, make_synthetic_coco

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_eval_check_") as tmp:
        tmp = Path(tmp)
        ann = make_synthetic_coco(tmp / "data", num_images=a.num_images, seed=0, min_size=160, max_size=640)
        write_synth_checkpoint("efficientdet-d0", tmp / "ckpt", seed=1234,
                               bn_stats_path=REPO / "golden" / "bn_stats" / "efficientdet-d0.npz",
                               golden_dir=REPO / "golden", progress=False)
        model = create_model("d0", checkpoint=tmp / "ckpt", image_size=a.image_size)
        cfg = model.config
        doc = load_annotations(ann)
        ds = CocoEvalImages(doc, tmp / "data" / "images", cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb)
        kw = dict(batch_size=a.batch_size, num_workers=a.workers, post_workers=a.post_workers, progress=False)

        t = time.perf_counter()
        cpu = run_eval(model, ds, device="cpu", **kw)
        t_cpu = time.perf_counter() - t
        t = time.perf_counter()
        gpu1 = run_eval(model, ds, device=dev, **kw)
        t_gpu1 = time.perf_counter() - t
        t = time.perf_counter()
        gpu = run_eval(model, ds, device=dev, **kw)
        t_gpu = time.perf_counter() - t

        agree = detection_agreement(cpu.per_image, gpu.per_image)
        if a.save_rows:
            np.savez_compressed(a.save_rows, **{f"cpu/{k}": v for k, v in cpu.per_image.items()},
                                **{f"cuda/{k}": v for k, v in gpu.per_image.items()})
        cat_map = category_mapping(doc["categories"], cfg.num_classes)
        pseudo = annotations_from_detections(doc, cpu.per_image, cat_map, clip=False)
        pmap = category_mapping(pseudo["categories"], cfg.num_classes)
        s_cpu, _, _ = evaluate_coco(pseudo, cpu.rows, pmap, cpu.image_ids, verbose=False)
        s_gpu, _, _ = evaluate_coco(pseudo, gpu.rows, pmap, gpu.image_ids, verbose=False)
        d_ap = s_gpu - s_cpu
        run_to_run = bool(np.array_equal(gpu1.rows, gpu.rows))

    ok = agree["agreeing_fraction"] >= 0.99 and float(np.abs(d_ap).max()) <= 0.005
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else dev
    print(f"device: {name}; torch {torch.__version__}; d0 at {a.image_size}, "
          f"{a.num_images} synthetic images, batch {a.batch_size}, TF32 off")
    print(f"detections: CPU {agree['rows_ref']}, CUDA {agree['rows_ours']}; matched {agree['pairs']} "
          f"({100 * agree['matched_fraction']:.2f} %), ties at the cut-off {agree['ties']}, "
          f"bad {agree['bad']} (agreeing {100 * agree['agreeing_fraction']:.2f} %)")
    print(f"max |Δscore| {agree['max_abs_dscore']:.3e}, max |Δbox| {agree['max_abs_dbox']:.3e} px (matched pairs)")
    print("COCO numbers on a ground truth derived from the CPU detections:")
    print("  " + " ".join(f"{n:>8}" for n in COCO_METRIC_NAMES))
    print("  " + " ".join(f"{v:8.4f}" for v in s_cpu) + "   (CPU)")
    print("  " + " ".join(f"{v:8.4f}" for v in s_gpu) + "   (CUDA)")
    print(f"ΔAP (CUDA - CPU): AP {d_ap[0]:+.4f}, max |Δ| over the 12 numbers {np.abs(d_ap).max():.4f}")
    print(f"CUDA run-to-run bit-identical: {run_to_run}")
    print(f"throughput: CPU {a.num_images / t_cpu:.2f} images/s, CUDA {a.num_images / t_gpu:.2f} images/s "
          f"(first CUDA run {a.num_images / t_gpu1:.2f}, with warm-up); total {time.perf_counter() - t_start:.1f} s")
    print("verdict:", "AGREE" if ok else "DISAGREE", "(agreeing >= 99 % and |ΔAP| <= 0.005)")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "device": name, "image_size": a.image_size, "num_images": a.num_images,
            "agreement": agree, "stats_cpu": s_cpu.tolist(), "stats_cuda": s_gpu.tolist(),
            "delta_ap": d_ap.tolist(), "cuda_run_to_run_identical": run_to_run,
            "images_per_s": {"cpu": a.num_images / t_cpu, "cuda": a.num_images / t_gpu}, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
