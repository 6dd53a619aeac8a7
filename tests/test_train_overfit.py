"""It learns: ``effdet-train`` overfits a handful of generated images to COCO AP ≥ 0.8 on them, and
the weights it writes score the same through ``effdet-eval``.

d0 from scratch at 96 px on 4 shapes images (``fixtures.shapes``; the seed's layout and project
file with ``val_set: train``), batch 4, AdamW lr 2e-3 (the seed's optimiser; from scratch the
official SGD lr needs far more steps), flips only (``--jitter 1 1``), 1000 steps: about 3 minutes on
2 cores. Why 1000 steps: the AP is scored in eval mode, on BN moving averages (TF momentum 0.99,
a ~100-step memory) that trail weights moving fast from scratch; measured on the same run: AP 0.13
at step 100, 0.35 at 500, 0.77 at 700, 0.87 at 800, 0.91 at 1000 (with BN statistics recomputed on
the 4 images, 0.92 already at step 300). 0.8 is the issue's bar; an untrained or broken trainer
scores ~0.
"""
from __future__ import annotations

import json

import pytest

from fixtures.shapes import make_shapes_project
from effdet_cli.evaluate import main as eval_main
from effdet_cli.train import main as train_main

pytestmark = pytest.mark.slow


def test_overfits_four_images(tmp_path):
    root = make_shapes_project(tmp_path, num_train=4, num_val=0, size=96, seed=0)
    yml = root / "projects" / "shapes.yml"
    yml.write_text(yml.read_text().replace("val_set: val", "val_set: train"))
    args = ["-c", "0", "-p", "shapes", "--projects-dir", str(root / "projects"), "--data-path", str(root / "datasets"),
            "--image-size", "96", "--batch-size", "4", "--optim", "adamw", "--lr", "2e-3", "--jitter", "1", "1",
            "--num-epochs", "1000", "--val-interval", "1000", "--save-interval", "1000000", "--workers", "0",
            "-o", str(root / "logs")]
    assert train_main(args) == 0
    out = root / "logs" / "shapes"
    rows = [r for r in (out / "train_log.csv").read_text().splitlines()[1:] if r.split(",")[9]]
    assert len(rows) == 1, "one evaluation, after the last step"
    ap = float(rows[0].split(",")[9])
    assert ap >= 0.8, f"COCO AP {ap:.3f} on the 4 training images after 1000 steps"

    # the best weights through the evaluation CLI: the same AP
    data = root / "datasets" / "shapes"
    metrics = tmp_path / "metrics.json"
    assert eval_main(["--variant", "d0", "--weights", str(out / "best.pth"), "--image-size", "96",
                      "--images", str(data / "train"), "--annotations", str(data / "annotations" / "instances_train.json"),
                      "--batch-size", "4", "--workers", "0", "--no-progress", "--out", str(tmp_path / "dets.json"),
                      "--metrics-out", str(metrics)]) == 0
    got = json.loads(metrics.read_text())["metrics"]
    assert abs(list(got.values())[0] - ap) < 1e-9, (got, ap)
