"""``effdet-anchors`` and its measure (training/anchor_fit.py): the best IoU per box against the full
IoU matrix of the official matcher's arithmetic, the coverage of the elongated-shapes set under the
official anchors and under the suggestion, the command's output and errors, and the suggestion pasted
into the project file carrying through training, resuming and every command that loads the weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from effdet_cli.anchors import main as anchors_main
from effdet_torch.anchors import generate_anchors
from effdet_torch.config import AnchorConfig, get_config
from fixtures.shapes import make_shapes_project
from training.anchor_fit import best_ious, coverage, letterboxed, suggest_anchors
from training.targets import assign_targets, box_iou_tf


@pytest.mark.parametrize("variant, hw", [("d0", (256, 256)), ("d0", (192, 320)), ("lite0", (77, 131))])
def test_best_iou_is_the_matrix_maximum(variant, hw):
    """Within an ulp of the maximum over the full [boxes x anchors] IoU matrix (where a box holds an
    anchor along an axis the overlap is flat over several centres and the matrix's maximum picks the
    centre whose float32 subtraction rounds up): 2.4e-7 is 2 ulps of 1.0."""
    g = np.random.default_rng(0)
    cfg = get_config(variant, anchors=AnchorConfig(3.5, (1.0, 1.3), (1.0, (3.0, 0.4), 0.2)))
    n = 400
    y0, x0 = g.uniform(-10, hw[0], n), g.uniform(-10, hw[1], n)
    boxes = np.stack([y0, x0, y0 + g.uniform(1, hw[0] * 0.7, n), x0 + g.uniform(1, hw[1] * 0.7, n)], 1).astype(np.float32)
    full = box_iou_tf(torch.from_numpy(boxes), torch.from_numpy(generate_anchors(cfg, hw))).max(1).values.numpy()
    fast = best_ious(cfg, boxes, hw)
    assert np.abs(fast - full).max() <= 2.4e-7
    assert ((fast >= 0.5) == (full >= 0.5))[np.abs(full - 0.5) > 1e-6].all()


def test_positives_per_box_are_the_official_matcher():
    """The count per box equals assign_targets' matches (threshold + force match), image by image."""
    cfg = get_config("d0", image_size=128)
    items = [(100.0, 200.0, np.array([[0.1, 0.1, 0.6, 0.3], [0.2, 0.5, 0.9, 0.95]])), (50.0, 50.0, np.zeros((0, 4))),
             (128.0, 128.0, np.array([[0.0, 0.0, 0.05, 0.9]]))]
    gt = letterboxed(items, (128, 128))
    assert gt.num_images == 3 and len(gt.boxes) == 3 and list(gt.image) == [0, 0, 2]
    s = 128 / 200  # the first image is 200 wide: scale min(128/100, 128/200)
    np.testing.assert_allclose(gt.boxes[0], np.array([0.1 * 100, 0.1 * 200, 0.6 * 100, 0.3 * 200]) * s, rtol=1e-6)
    cov = coverage(cfg, gt, (128, 128))
    anchors = torch.from_numpy(generate_anchors(cfg, (128, 128)))
    t = assign_targets(torch.from_numpy(gt.boxes[:2]), torch.ones(2), anchors)
    assert list(cov.positives[:2]) == list(np.bincount(t.matches[t.matches >= 0].numpy(), minlength=2))
    assert cov.positives[2] == 1, "a thin box no anchor reaches: force-matched to one"


@pytest.fixture(scope="module")
def elongated(tmp_path_factory) -> Path:
    # 256 px: the thinnest objects are 8 px wide, what a stride-8 grid of thin anchors can still centre on
    # (at 128 px, 4 px wide bars fall between the grid centres: measured 78 % at best)
    return make_shapes_project(tmp_path_factory.mktemp("elong"), num_train=24, num_val=6, size=256, seed=1,
                               project="elongated", kind="elongated")


def test_elongated_boxes_escape_the_official_anchors_and_the_suggestion_covers_them(elongated):
    """Measured on this set (24 images, 50 boxes, d0 at 256): the official anchors bring no box to IoU
    0.5, the suggestion 49 of 50 (the issue's 'most below' / 'nearly all')."""
    from training.data import CocoTrainDataset

    ds = CocoTrainDataset(elongated / "datasets" / "elongated" / "annotations" / "instances_train.json",
                          elongated / "datasets" / "elongated" / "train", ["pole", "cable"], (256, 256), (0,) * 3, (1,) * 3)
    gt = letterboxed([(h, w, arr[:, :4]) for (_, arr), (h, w) in zip(ds.items, ds.sizes)], (256, 256))
    cfg = get_config("d0", image_size=256)
    before = coverage(cfg, gt, (256, 256))
    suggested = suggest_anchors(cfg, gt, (256, 256))
    after = coverage(get_config("d0", image_size=256, anchors=suggested), gt, (256, 256))
    assert len(gt.boxes) >= 40 and before.share <= 0.1 and after.share >= 0.9, (before.share, after.share)
    assert after.positives_per_box > 3 * before.positives_per_box
    assert suggested.official_scales and all(isinstance(r, float) for r in suggested.aspect_ratios)
    assert min(suggested.aspect_ratios) < 0.25 and max(suggested.aspect_ratios) > 4  # poles and cables


def test_cli_report_json_and_errors(elongated, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(elongated)
    out = tmp_path / "a.json"
    assert anchors_main(["-c", "0", "-p", "elongated", "--image-size", "256", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for line in ("best IoU >= 0.5", "positives per box", "aspect w/h < 1/4", "size small", "anchors_scales: '[2 ** 0",
                 "anchors_ratios: '[", "--hparams=\"anchor_scale="):
        assert line in text, text
    rep = json.loads(out.read_text())
    assert rep["current"]["share_iou_0_5"] <= 0.1 and rep["suggested"]["share_iou_0_5"] >= 0.9
    assert anchors_main(["-c", "0", "-p", "elongated", "--image-size", "256", "-o", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert anchors_main(["-c", "0", "-p", "elongated", "--annotations", "x.json"]) == 2
    capsys.readouterr()
    empty = tmp_path / "empty.json"  # a valid file without boxes
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "000001.jpg", "width": 128, "height": 128}],
                                 "annotations": [], "categories": [{"id": 1, "name": "pole"}]}))
    assert anchors_main(["--variant", "d0", "--annotations", str(empty), "--images",
                         str(elongated / "datasets" / "elongated" / "train")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("effdet-anchors: error: ") and "no boxes" in err and err.count("\n") == 1
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1}], "annotations": [')
    assert anchors_main(["--variant", "d0", "--annotations", str(broken), "--images", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"effdet-anchors: error: {broken}") and err.count("\n") == 1


@pytest.mark.slow
def test_suggested_anchors_train_resume_and_run_everywhere(elongated, tmp_path, capsys, monkeypatch):
    """The suggestion pasted into the project file: effdet-train trains with it from the official-format
    d0 checkpoint (the class predictor reset for 2 classes; the box regressions start from the official
    anchors', the same count), resumes
    with last, and its weights run in effdet-infer, effdet-eval and effdet-export onnx with no anchor
    flag (the ONNX file records the anchors)."""
    from effdet_cli.evaluate import main as eval_main
    from effdet_cli.export import main as export_main
    from effdet_cli.infer import main as infer_main
    from effdet_cli.parity import main as parity_main
    from effdet_cli.train import main as train_main
    from effdet_torch.checkpoint import load_weights_file

    ck = tmp_path / "d0"
    assert parity_main(["synth-ckpt", "--variant", "d0", "--bn-stats", "auto", "-o", str(ck), "-q"]) == 0
    monkeypatch.chdir(elongated)
    assert anchors_main(["-c", "0", "-p", "elongated", "--image-size", "256", "--no-progress"]) == 0
    lines = capsys.readouterr().out.split("paste into projects/NAME.yml):\n")[1].splitlines()[:3]
    yml = elongated / "projects" / "elongated.yml"
    text = "".join(l + "\n" for l in yml.read_text().splitlines() if not l.startswith("anchors_"))
    yml.write_text(text + "\n".join(l for l in lines if not l.startswith("#")) + "\n")
    args = ["-c", "0", "-p", "elongated", "--image-size", "256", "--batch-size", "4", "--workers", "0",
            "-o", str(tmp_path / "logs"), "--num-epochs", "2"]
    assert train_main(args + ["--weights", str(ck), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err  # 3 scales x 3 ratios: the box predictor keeps its shape; 90 -> 2 classes
    assert "class predictor (class_net.predict) is reset" in err and "box predictor" not in err
    assert "trained with anchors anchor_scale 4" in err, err
    assert train_main(args + ["--weights", "last", "--max-steps", "3"]) == 0
    assert "resumed" in capsys.readouterr().out
    (pth,) = (tmp_path / "logs" / "elongated").glob("efficientdet-d0_*_3.pth")
    rec = load_weights_file(pth).record
    suggested = rec["anchors"]
    assert suggested != get_config("d0").anchors and rec["class_names"] == ("pole", "cable")
    assert rec["image_size"] == (256, 256)
    val = elongated / "datasets" / "elongated"
    assert eval_main(["--variant", "d0", "--weights", str(pth), "--images", str(val / "val"), "--annotations",
                      str(val / "annotations" / "instances_val.json"), "--workers", "0", "--no-progress",
                      "--metrics-out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["image_size"] == [256, 256] and set(m["per_class"]) == {"AP_/pole", "AP_/cable"}
    img = next((val / "val").iterdir())
    assert infer_main([str(img), "--variant", "d0", "--weights", str(pth), "-o", str(tmp_path / "inf"),
                       "--threshold", "0"]) == 0
    dets = json.loads(next((tmp_path / "inf").glob("*.json")).read_text())
    assert {d["class_name"] for d in dets["detections"]} <= {"pole", "cable"}
    onnx_path = tmp_path / "m.onnx"
    assert export_main(["onnx", "--variant", "d0", "--weights", str(pth), "-o", str(onnx_path), "--decode"]) == 0
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["effdet"])["anchors"] == suggested.to_dict()
