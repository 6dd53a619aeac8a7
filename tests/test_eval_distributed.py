"""``torchrun --nproc-per-node 2 effdet-eval`` (gloo, CPU) gives the same detections and the same 12
numbers as one process.

Both runs use one thread per process (torchrun's default OMP_NUM_THREADS=1; the single run is
given the same), and the batches are sharded whole, so every batch holds the same images in both
runs: the detections are then bit-identical, not merely close. The metrics are scored on a ground
truth derived from the detections themselves, so AP is far from 0 and would notice a lost image.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.coco import category_mapping, load_annotations
from fixtures.synthetic_coco import annotations_from_detections, make_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
# Synthetic weights overflow exp() in box decoding on some anchors: numpy and pycocotools warn about
# the resulting inf boxes (the official code would produce the same); that noise is not the subject.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
    return p


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_eval_equals_one_process(tmp_path, synth_ckpt_dir):
    from evaluation.coco import CocoEvalImages, coco_results, evaluate_coco
    from evaluation.evaluate import run_eval
    from effdet_torch.model import create_model

    ann = make_synthetic_coco(tmp_path / "data", num_images=3, seed=11, max_size=128)
    model = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=128)
    weights = tmp_path / "d0.pth"
    torch.save(model.state_dict(), weights)
    model.fuse_for_inference()  # as effdet-eval runs it
    doc = load_annotations(ann)
    cfg = model.config

    # one process, in this one, with one thread as each torchrun process has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds = CocoEvalImages(doc, tmp_path / "data" / "images", cfg.image_size, cfg.mean_rgb, cfg.stddev_rgb)
        one = run_eval(model, ds, batch_size=1, num_workers=0, post_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    cat_map = category_mapping(doc["categories"], 90)
    # a ground truth derived from these detections: AP well above 0, so a lost image would show
    pseudo = annotations_from_detections(doc, one.per_image, cat_map)
    pseudo_ann = tmp_path / "pseudo.json"
    pseudo_ann.write_text(json.dumps(pseudo))
    stats, _, _ = evaluate_coco(pseudo, one.rows, category_mapping(pseudo["categories"], 90), one.image_ids,
                             verbose=False)
    assert stats[0] > 0.2, stats

    out, metrics = tmp_path / "dist.json", tmp_path / "m.json"
    p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port()), "-m", "effdet_cli.evaluate",
              "--variant", "d0", "--weights", str(weights), "--images", str(tmp_path / "data" / "images"),
              "--annotations", str(pseudo_ann), "--image-size", "128", "--batch-size", "1", "--workers", "1",
              "--post-workers", "0", "--no-progress", "--out", str(out), "--metrics-out", str(metrics)])
    assert "2 processes" in p.stdout
    assert p.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1, "only rank 0 scores"

    got = json.loads(out.read_text())
    assert len({r["image_id"] for r in got}) == 3
    assert got == coco_results(one.rows, cat_map, one.row_image_ids), \
        "sharded detections must be bit-identical to one process"
    m = json.loads(metrics.read_text())
    assert m["world_size"] == 2 and m["images"] == 3
    assert list(m["metrics"].values()) == [float(v) for v in stats]
