"""Record goldens from the live official model, in the format of ``shared/golden``.

``write_golden(out_dir, run, meta)`` writes ``tensors.npz`` (only the golden keys, so that
``effdet-parity golden`` compares every one of them without TensorFlow) and ``meta.json``
(provenance, versions, load report, conventions, shapes); with ``detailed`` also
``tensors_detailed.npz`` (every backbone block, BiFPN node and head repeat) for
``effdet-parity compare --golden DIR/tensors.npz --golden DIR/tensors_detailed.npz``.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from effdet_torch.files import sha256_array, write_json

__all__ = ["CONVENTIONS", "is_golden_key", "write_golden"]

_GOLDEN_TAP = re.compile(
    r"[^/]+/(image_scale|backbone/level\d+|resample/level\d+|fpn/cell\d+/level\d+|class_net/level\d+"
    r"|box_net/level\d+|pre_nms/(boxes|scores|classes0))"
)

CONVENTIONS = {
    "layout": "NHWC (channels_last) for every feature map",
    "class_net": "[1,H,W,num_anchors*num_classes]; channel = anchor*num_classes + class0 (0-based); logits (pre-sigmoid)",
    "box_net": "[1,H,W,num_anchors*4]; channel = anchor*4 + k, k in (ty,tx,th,tw)",
    "anchor_order": "levels min..max; within level row-major (y, x); then anchor = octave*len(aspect_ratios) + aspect",
    "anchors": "[N,4] ymin,xmin,ymax,xmax in network-input pixels",
    "boxes": "ymin,xmin,ymax,xmax; detections/*/boxes are clipped to the network input THEN multiplied by image_scale "
             "(no scale for the random case); eval_detections/*/boxes are scaled, not clipped",
    "classes": "detections/*/classes are 1-based float32; pre_nms/classes0 are 0-based",
    "pre_nms": "postprocess.pre_nms with max_nms_inputs=0: per-anchor max over classes, every anchor decoded, "
               "scores = sigmoid(max logit)",
    "detections": "postprocess_global (one class-agnostic soft-NMS, 100 rows, padded); valid_len = valid rows",
    "eval_detections": "postprocess_per_class with max_nms_inputs=5000 (COCO-eval path); generate_detections rows "
                       "[image_id, xmin, ymin, xmax, ymax, score, class]; image_scales [1.0] for the random case",
    "inputs": "input/random: default_rng(seed).standard_normal((1,H,W,3)).astype(float32) fed as an already "
              "normalised image; input/<img>_raw_uint8: tf.io.decode_image(channels=3) of the file; "
              "input/<img>_preprocessed and <img>/image_scale: EfficientDetModel._preprocessing",
    "fpn_keys": "fpn/cell{i}/level{l} = output of BiFPN cell i for level l (the last node of that level)",
    "backbone_keys": "backbone/level{l} = reduction_{l} endpoint; resample/level{l} (l>=6) = resample_p{l} output",
    "detailed_keys": "tensors_detailed.npz: backbone/stem, backbone/block{i} (MBConv block outputs), "
                     "fpn/cell{i}/fnode{j} (each BiFPN node's new feature), {class,box}_net/repeat{r}/level{l} "
                     "(conv->BN->act of head repeat r on level l)",
}


def is_golden_key(key: str) -> bool:
    """True for the keys of the ``shared/golden`` format (what ``effdet-parity golden`` compares)."""
    if key == "anchors" or key.startswith(("input/", "detections/", "eval_detections/")):
        return True
    return bool(_GOLDEN_TAP.fullmatch(key))


def write_golden(out_dir: str | os.PathLike, run: Mapping[str, np.ndarray], meta: Mapping,
                 detailed: bool = False, extra_meta: Mapping | None = None) -> dict[str, Path]:
    """Write ``tensors.npz`` + ``meta.json`` (+ ``tensors_detailed.npz``) into ``out_dir``.

    ``run``: the official run (key scheme of ``shared/golden/README.md`` plus detailed taps);
    ``meta``: the official worker's provenance (variant, versions, config, load report, …).
    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    golden = {k: np.asarray(v) for k, v in run.items() if is_golden_key(k)}
    rest = {k: np.asarray(v) for k, v in run.items() if not is_golden_key(k)}
    paths = {"tensors": out / "tensors.npz", "meta": out / "meta.json"}
    np.savez(paths["tensors"], **golden)
    if detailed and rest:
        paths["detailed"] = out / "tensors_detailed.npz"
        np.savez(paths["detailed"], **rest)
    cases = sorted({k.split("/")[1] for k in golden if k.startswith("detections/")})
    m = {
        "variant": meta.get("variant"),
        "recorded_by": "effdet-parity record",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "official_repo": meta.get("official_repo", "google/automl"),
        "official_commit": meta.get("official_commit"),
        "official_files_sha256": meta.get("official_files_sha256"),
        "versions": meta.get("versions"),
        "patches": meta.get("patches", ["none"]),
        "config_overrides": meta.get("config_overrides"),
        "image_size": meta.get("image_size"),
        "batch": 1,
        "num_classes": meta.get("num_classes"),
        "checkpoint": meta.get("ckpt"),
        "load_report": meta.get("load_report"),
        "inputs": meta.get("cases"),
        "conventions": CONVENTIONS,
        "nms_configs": meta.get("nms_configs"),
        "mean_rgb": meta.get("mean_rgb"),
        "stddev_rgb": meta.get("stddev_rgb"),
        "cases": cases,
        "sha256_of_input_arrays": {k: sha256_array(v) for k, v in golden.items() if k.startswith("input/")},
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in golden.items()},
        "detailed_tensors": ({k: [list(v.shape), str(v.dtype)] for k, v in rest.items()} if detailed else {}),
        "npz_bytes": paths["tensors"].stat().st_size,
        "secs": meta.get("secs"),
        "check_with": f"effdet-parity golden --variant {meta.get('variant')} --ckpt CKPT --golden {paths['tensors']}",
    }
    if extra_meta:
        m.update(extra_meta)
    write_json(paths["meta"], m)
    return paths
