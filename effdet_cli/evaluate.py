"""``effdet-eval``: COCO evaluation with the official COCO-eval path, optionally checked against the
official val2017 AP.

    effdet-eval --variant d0 --weights efficientdet-d0/ --images val2017 \\
        --annotations annotations/instances_val2017.json --device cuda --out results.json --expect-official
    torchrun --nproc-per-node 4 -m effdet_cli.evaluate --variant d0 ...     # sharded over 4 processes

Pipeline (see :mod:`evaluation.evaluate`): images decoded and preprocessed as the official input
pipeline in DataLoader workers → batched network → top-5000 (anchor, class) pairs → per-class
Gaussian soft-NMS → top 100 per image, boxes × image_scale (unclipped) → COCO results → pycocotools
(the official ``coco_metric``'s calls). Prints pycocotools' 12-line summary and a compact table.

Exit status: 0 ok; 1 ``--expect-official`` failed (``|ΔAP| > 0.1``); 2 usage errors, including
``--expect-official`` on anything but the full val2017 set at the variant's own image size.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from effdet_torch.config import get_config, resolve_variant_name
from effdet_torch.files import write_json
from effdet_torch.model import compile_network, create_model
from evaluation.coco import (
    COCO_METRIC_NAMES,
    CocoEvalImages,
    ImageDecodeError,
    ap_per_class,
    category_mapping,
    check_scorable,
    coco_results,
    evaluate_coco,
    format_metrics,
    format_per_class,
    load_annotations,
)
from evaluation.evaluate import broadcast_from_rank0, init_distributed, run_eval

from .common import (EXIT_FAILED, EXIT_USAGE, add_compile, add_device, add_output, add_variant, add_weights,
                     count_or_auto, error, keep_freed_memory, parse_args, worker_message)

PROG = "effdet-eval"

__all__ = ["OFFICIAL_VAL_AP", "OFFICIAL_AP_TOLERANCE", "check_official", "main"]

#: Official COCO AP per variant, in percent.
#: d0-d7x: the "AP^val" column (COCO val2017) of the checkpoint table in google/automl
#: efficientdet/README.md, section "2. Pretrained EfficientDet Checkpoints", at commit
#: 6a54c8741e7c3265d4547c4f35f47a0391122dc5 (the commit the goldens were recorded from).
#: lite0-lite4: the "mAP (float)" column of the lite table right below it in the same README
#: ("We have also provided a list of mobile-size lite models"); that table does not name the split,
#: the official eval (tf2/eval.py) is the val2017 evaluation used here.
OFFICIAL_VAL_AP: dict[str, float] = {
    "efficientdet-d0": 34.3,
    "efficientdet-d1": 40.2,
    "efficientdet-d2": 43.5,
    "efficientdet-d3": 46.8,
    "efficientdet-d4": 49.3,
    "efficientdet-d5": 51.2,
    "efficientdet-d6": 52.1,
    "efficientdet-d7": 53.4,
    "efficientdet-d7x": 54.4,
    "efficientdet-lite0": 26.41,
    "efficientdet-lite1": 31.50,
    "efficientdet-lite2": 35.06,
    "efficientdet-lite3": 38.77,
    "efficientdet-lite3x": 42.64,
    "efficientdet-lite4": 43.18,
}
OFFICIAL_AP_TOLERANCE = 0.1  # percent points
VAL2017_NUM_IMAGES = 5000


def check_official(variant: str, ap: float, tolerance: float = OFFICIAL_AP_TOLERANCE) -> tuple[bool, str]:
    """``ap`` (a fraction, as pycocotools' ``stats[0]``) vs the official val2017 AP of ``variant``."""
    name = resolve_variant_name(variant)
    ref = OFFICIAL_VAL_AP[name]
    ours = 100.0 * float(ap)
    delta = ours - ref
    ok = abs(delta) <= tolerance + 1e-9
    msg = (f"official check: AP {ours:.2f} vs official {name} val2017 AP {ref:.2f}: ΔAP {delta:+.2f} "
           f"({'within' if ok else 'OUTSIDE'} ±{tolerance})")
    return ok, msg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="COCO evaluation of an EfficientDet with the official COCO-eval path "
                    "(top-5000 pairs, per-class Gaussian soft-NMS, top 100 per image).")
    add_variant(p)
    add_weights(p)
    p.add_argument("--images", required=True, help="folder the annotation file's file_name entries are in")
    p.add_argument("--annotations", required=True, help="COCO instances_*.json")
    add_device(p, help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    add_compile(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None, help="only the first N images (by id)")
    p.add_argument("--image-size", default=None, help="network input size: N or the official 'WxH' (default: the variant's)")
    add_output(p, help="write the COCO-format detections (results JSON) here")
    p.add_argument("--metrics-out", default=None, help="write the 12 numbers and the run's facts as JSON here")
    p.add_argument("--workers", type=count_or_auto, default="auto",
                   help="DataLoader worker processes for decoding/preprocessing (0: in the main process; auto: "
                        "up to 4 of the CPUs the network leaves free — on --device cpu its threads take every "
                        "core, so none by default)")
    p.add_argument("--post-workers", type=count_or_auto, default="auto",
                   help="processes for the soft-NMS (0: in the main process; auto: from 32 images on, half "
                        "the CPUs the network leaves free)")
    p.add_argument("--category-map", choices=("auto", "names", "coco", "sorted"), default="auto",
                   help="class→category id: names = by the class names the weights record (models trained here), "
                        "coco = identity (official 90-class ids), sorted = i-th category of the annotation file by "
                        "id; auto = names when the file names every recorded class, else coco for 90-class models "
                        "on ids within 1..90, else sorted")
    p.add_argument("--expect-official", action="store_true",
                   help=f"fail unless |AP - official val2017 AP| <= {OFFICIAL_AP_TOLERANCE} (full val2017 only)")
    p.add_argument("--allow-tf32", action="store_true",
                   help="let CUDA use TF32 matmul/conv (faster, not fp32: off by default for parity)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    keep_freed_memory()
    import torch


    def fail(msg: str, code: int = EXIT_FAILED) -> int:
        return error(PROG, msg, code)

    variant = resolve_variant_name(args.variant)
    if args.batch_size < 1:
        return fail("--batch-size must be >= 1", EXIT_USAGE)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        return fail("--device cuda but CUDA is not available")
    dist = init_distributed(device)
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    main_rank = dist.is_main

    def log(msg: str) -> None:
        if main_rank:
            print(msg, flush=True)

    try:
        doc = load_annotations(args.annotations)
        if "annotations" in doc:  # scored at the end: fail now, not after the whole evaluation
            check_scorable(doc, str(args.annotations))
        model = create_model(variant, checkpoint=args.weights, image_size=args.image_size).fuse_for_inference()
        if args.compile:
            compile_network(model)
    except (OSError, ValueError, KeyError) as e:
        return fail(str(e))
    cfg = model.config
    default_size = get_config(variant).image_size
    n_total = len(doc["images"])
    n_eval = n_total if args.max_images is None else min(n_total, max(0, args.max_images))
    if args.expect_official:
        why = []
        if n_eval != VAL2017_NUM_IMAGES or n_total != VAL2017_NUM_IMAGES:
            why.append(f"the official AP is for the full val2017 set ({VAL2017_NUM_IMAGES} images); "
                       f"this run evaluates {n_eval} of {n_total}")
        if tuple(cfg.image_size) != tuple(default_size):
            why.append(f"the official AP is at {variant}'s image size {default_size}, not {cfg.image_size}")
        if cfg.num_classes != 90:
            why.append(f"the official AP is for the 90-class COCO checkpoint, not {cfg.num_classes} classes")
        if why:
            return fail("--expect-official: " + "; ".join(why), EXIT_USAGE)
    try:
        cat_map = category_mapping(doc.get("categories", []), cfg.num_classes, args.category_map, cfg.class_names)
    except ValueError as e:
        return fail(str(e), EXIT_USAGE)
    try:
        ds = CocoEvalImages(doc, args.images, cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb, args.max_images)
    except FileNotFoundError as e:
        return fail(str(e))
    log(f"effdet-eval: {variant} at {cfg.image_size[1]}x{cfg.image_size[0]} (WxH), {cfg.num_classes} classes, "
        f"{len(ds)} images, device {device}, batch {args.batch_size}"
        + (f", {dist.world_size} processes" if dist.enabled else ""))
    t0 = time.perf_counter()
    try:
        out = run_eval(model, ds, device=device, batch_size=args.batch_size, num_workers=args.workers,
                       post_workers=args.post_workers, progress=not args.no_progress, dist=dist,
                       allow_tf32=args.allow_tf32)
    except ImageDecodeError as e:  # from a loader worker too: one line naming the image
        return fail(worker_message(e))
    code = 0
    if main_rank:
        wall = time.perf_counter() - t0
        log(f"evaluated {len(out.image_ids)} images in {wall:.1f} s ({len(out.image_ids) / max(wall, 1e-9):.2f} images/s)")
        if args.output:
            res = coco_results(out.rows, cat_map, out.row_image_ids)
            write_json(args.output, res, indent=None)
            log(f"wrote {len(res)} detections to {args.output}")
        stats, per_class = None, {}
        if "annotations" in doc:
            scores = evaluate_coco(doc, out.rows, cat_map, out.image_ids, out.row_image_ids, verbose=True)
            stats = scores.stats
            per_class = ap_per_class(scores, cat_map, cfg.class_names, doc.get("categories", []))
            log(format_metrics(stats))
            log(format_per_class(per_class))
        else:
            log("the annotation file has no 'annotations': detections written, nothing scored")
        if args.expect_official:
            ok, msg = check_official(variant, stats[0] if stats is not None else float("nan"))
            log(msg)
            code = 0 if ok else 1
        if args.metrics_out:
            facts = {
                "variant": variant, "image_size": list(cfg.image_size), "images": len(out.image_ids),
                "detections": int(len(out.rows)), "device": str(device), "world_size": dist.world_size,
                "batch_size": args.batch_size, "seconds": wall,
                "metrics": None if stats is None else dict(zip(COCO_METRIC_NAMES, [float(v) for v in stats])),
                "per_class": per_class or None,
            }
            write_json(args.metrics_out, facts)
    code = broadcast_from_rank0(code) if dist.enabled else code
    if dist.enabled:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
