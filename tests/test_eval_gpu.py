"""The eval path on CUDA agrees with the CPU run (skipped without CUDA).

Prints the agreement (run ``pytest -m gpu -s tests/test_eval_gpu.py`` to see it): detections
paired with the core tolerance, ties at the cut-off (one synthetic image saturates: all 100 scores
1.0), bad rows, max |Δscore|, and ΔAP on a ground truth derived from the CPU detections. Measured
on an H100 (torch 2.11): of 400 rows 352 matched, 48 + 48 tie rows (CPU + CUDA side), 0 bad, max |Δscore| 1.6e-7, AP 0.4103 on both, ΔAP 0.0000 on all 12 numbers.
``benchmarks/gpu_eval_check.py`` is the larger, standalone version.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.coco import CocoEvalImages, category_mapping, evaluate_coco, load_annotations
from evaluation.evaluate import detection_agreement, run_eval
from fixtures.synthetic_coco import annotations_from_detections, make_synthetic_coco

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"),
]


def test_eval_path_on_cuda_agrees_with_cpu(tmp_path, synth_ckpt_dir, capsys):
    from effdet_torch.model import create_model

    ann = make_synthetic_coco(tmp_path / "data", num_images=4, seed=5, max_size=320)
    model = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=256)
    cfg = model.config
    doc = load_annotations(ann)
    ds = CocoEvalImages(doc, tmp_path / "data" / "images", cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb)
    kw = dict(batch_size=2, num_workers=0, post_workers=0, progress=False)
    cpu = run_eval(model, ds, device="cpu", **kw)
    gpu = run_eval(model, ds, device="cuda", **kw)
    agree = detection_agreement(cpu.per_image, gpu.per_image)
    pseudo = annotations_from_detections(doc, cpu.per_image, category_mapping(doc["categories"], 90),
                                         clip=False)
    cmap = category_mapping(pseudo["categories"], 90)
    s_cpu, _ = evaluate_coco(pseudo, cpu.rows, cmap, cpu.image_ids, verbose=False)
    s_gpu, _ = evaluate_coco(pseudo, gpu.rows, cmap, gpu.image_ids, verbose=False)
    d_ap = np.abs(s_gpu - s_cpu)
    with capsys.disabled():
        print(f"\n[eval CUDA vs CPU] {torch.cuda.get_device_name(0)}: of "
              f"{max(agree['rows_ref'], agree['rows_ours'])} rows {agree['pairs']} matched, {agree['ties']} ties "
              f"at the cut-off, {agree['bad']} bad; max |Δscore| {agree['max_abs_dscore']:.2e}, "
              f"max |Δbox| {agree['max_abs_dbox']:.2e} px, AP CPU {s_cpu[0]:.4f} CUDA {s_gpu[0]:.4f}, "
              f"max |ΔAP| over 12 numbers {d_ap.max():.4f}")
    assert set(gpu.per_image) == set(cpu.per_image)
    assert agree["agreeing_fraction"] >= 0.99, agree
    assert s_cpu[0] > 0.2
    assert d_ap.max() <= 0.005, (s_cpu, s_gpu)
