"""Evaluation during training, best checkpoint, early stopping, logs, debug pictures, AdamW and the
flags of ``effdet-train`` (issue 10 items 4 and 1). d0 at 64 px on a few synthetic images.

Expected values: the val AP is checked against ``effdet-eval`` run separately on the saved EMA
weights (the project's evaluation CLI, not the engine); learning rates against the schedule's
formula; best-checkpoint / early-stopping decisions against the rule applied by hand to the logged APs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from effdet_cli.train import build_parser, main
from effdet_torch.checkpoint import load_weights_file
from effdet_torch.config import get_config
from effdet_torch.model import EfficientDet
from evaluation.coco import CocoEvalImages, load_annotations
from evaluation.evaluate import run_eval
from fixtures.synthetic_coco import COCO_CATEGORIES, annotations_from_detections
from tests.test_train_cli import make_seed_layout
from training.engine import CSV_FIELDS, Engine, TrainConfig

NAMES = [c[1] for c in COCO_CATEGORIES]
MEAN, STD = [0.485 * 255, 0.456 * 255, 0.406 * 255], [0.229 * 255, 0.224 * 255, 0.225 * 255]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """4 train images (2 steps per epoch at batch 2) and 3 val images."""
    return make_seed_layout(tmp_path_factory.mktemp("engine"), num_images=4, val_images=3)[0]


def _cfg(root, out, **kw):
    d = root / "datasets" / "shape"
    base = dict(variant="efficientdet-d0", obj_list=NAMES, train_annotations=str(d / "annotations" / "instances_train.json"),
                train_images=str(d / "train"), val_annotations=str(d / "annotations" / "instances_val.json"),
                val_images=str(d / "val"), out_dir=str(out), image_size=64, mean_rgb=MEAN, stddev_rgb=STD,
                batch_size=2, workers=0, num_epochs=10, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _eval_cli_ap(weights, images, annotations, out):
    from effdet_cli.evaluate import main as eval_main

    assert eval_main(["--variant", "d0", "--weights", str(weights), "--images", str(images), "--annotations",
                      str(annotations), "--image-size", "64", "--batch-size", "2", "--workers", "0", "--post-workers",
                      "0", "--no-progress", "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]["AP"]


def test_val_ap_is_effdet_eval_on_the_ema_weights(layout, tmp_path):
    d = layout / "datasets" / "shape"
    run = tmp_path / "run"
    assert Engine(_cfg(layout, run, max_steps=2, val_interval=0), info=lambda m: None).fit() == "max-steps"
    # the initial weights of --seed 0 (what the engine builds), and a pseudo ground truth from their
    # detections, so that their AP is far from 0 (measured 0.044, AP50 0.23)
    torch.manual_seed(0)
    init = EfficientDet(get_config("d0", image_size=64, num_classes=len(NAMES))).to(memory_format=torch.channels_last)
    init_pth = tmp_path / "ema.pth"
    doc = load_annotations(d / "annotations" / "instances_val.json")
    det = run_eval(init, CocoEvalImages(doc, d / "val", (64, 64), MEAN, STD), batch_size=2, num_workers=0,
                   post_workers=0, progress=False)
    pseudo = tmp_path / "instances_val.json"
    cat_map = np.array([-1] + [c[0] for c in COCO_CATEGORIES])
    pseudo.write_text(json.dumps(annotations_from_detections(doc, det.per_image, cat_map)))
    eng = Engine(_cfg(layout, run, weights="last", val_annotations=str(pseudo)), info=lambda m: None)
    assert eng.step == 2
    # the EMA shadows set to the initial weights, the raw weights those of step 2: evaluate() must use the EMA
    eng.ema.shadow = {k: v.clone() for k, v in init.named_parameters()}
    with torch.no_grad():  # and raw weights far from them: a box net that outputs the anchors
        for p in eng.model.box_net.parameters():
            p.zero_()
    stats, per_class = eng.evaluate()
    ap = float(stats[0])
    assert set(per_class) == {f"AP_/{n}" for n in NAMES}
    # what the EMA .pth files hold (and effdet-infer loads): averaged parameters, the model's current
    # BN statistics (the official EMA averages trainable variables only)
    params = dict(init.named_parameters())
    ema_sd = {k: (params[k].detach() if k in params else v) for k, v in eng.model.state_dict().items()}
    torch.save(ema_sd, init_pth)
    init_ap = _eval_cli_ap(init_pth, d / "val", pseudo, tmp_path / "m.json")
    assert ap == init_ap > 0.02  # same weights, batch, layout and class->category map: the same numbers
    raw = tmp_path / "raw.pth"
    torch.save(eng.model.state_dict(), raw)
    assert _eval_cli_ap(raw, d / "val", pseudo, tmp_path / "m.json") != ap  # the check can tell EMA from raw


def test_best_checkpoint_early_stopping_and_csv(layout, tmp_path):
    # an AP gain must exceed 1.0 to count: impossible, so the 2nd evaluation stops the run
    cfg = _cfg(layout, tmp_path / "run", val_interval=1, es_patience=1, es_min_delta=1.0, save_interval=2)
    assert Engine(cfg, info=lambda m: None).fit() == "early-stopped"
    run = tmp_path / "run"
    rows = _csv(run / "train_log.csv")
    assert list(rows[0]) == list(CSV_FIELDS) + [f"AP_/{n}" for n in NAMES]  # the AP of each class
    steps = [r for r in rows if r["loss"]]
    vals = [r for r in rows if r["val_ap"]]
    assert all(-1 <= float(r[f"AP_/{n}"]) <= 1 for r in vals for n in NAMES)
    assert all(r[f"AP_/{NAMES[0]}"] == "" for r in steps)
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
    assert [(int(r["step"]), int(r["epoch"])) for r in vals] == [(2, 0), (4, 1)]  # after epochs 0 and 1
    assert all(math.isfinite(float(r[k])) for r in steps for k in ("loss", "cls_loss", "box_loss", "lr", "images_per_s"))
    # best = the first evaluation (the second did not beat it by > 1.0): best.pth == the EMA .pth of step 2
    best = load_weights_file(run / "best.pth")
    at2 = load_weights_file(run / "efficientdet-d0_0_2.pth")
    assert best.state.keys() == at2.state.keys() and all(torch.equal(best.state[k], at2.state[k]) for k in best.state)
    assert best.record == at2.record and best.record["class_names"] == tuple(cfg.obj_list)
    last = torch.load(run / "last.ckpt", weights_only=True)
    assert (last["step"], last["best_step"], last["evals_since_best"]) == (4, 2, 1)
    assert last["best_ap"] == float(vals[0]["val_ap"])
    assert not (run / "tensorboard").exists()  # tensorboard is not installed here: skipped quietly


def test_debug_pictures_and_log_path(layout, tmp_path):
    cfg = _cfg(layout, tmp_path / "run", max_steps=2, debug=True, log_path=str(tmp_path / "logs"))
    assert Engine(cfg, info=lambda m: None).fit() == "max-steps"
    pics = sorted((tmp_path / "logs" / "debug").glob("*.png"))
    assert len(pics) == 3  # one evaluation (end of epoch 1), the 3 val images
    assert (tmp_path / "logs" / "train_log.csv").is_file() and not (tmp_path / "run" / "train_log.csv").exists()
    im = np.asarray(Image.open(pics[0]).convert("RGB")).astype(int)
    green = (im[..., 1] == 255) & (im[..., 0] == 0) & (im[..., 2] == 0)
    red = (im[..., 0] == 255) & (im[..., 1] == 0) & (im[..., 2] == 0)
    assert green.any() and red.any()  # ground truth and detections drawn


def test_adamw_schedule_and_state(layout, tmp_path):
    cfg = _cfg(layout, tmp_path / "run", optim="adamw", max_steps=3, val_interval=0)
    assert Engine(cfg, info=lambda m: None).fit() == "max-steps"
    steps = [r for r in _csv(tmp_path / "run" / "train_log.csv") if r["loss"]]
    # warm-up over one epoch (2 steps) from lr/10 to lr = 1e-4, then cosine on the global step over 10 epochs
    want = [1e-5, 1e-5 + 0.5 * 9e-5, 0.5 * 1e-4 * (1 + math.cos(math.pi * 2 / 18))]
    assert [float(r["lr"]) for r in steps] == pytest.approx(want, rel=1e-6)  # float32 schedule: 6e-8 relative
    assert all(float(r["reg_l2_loss"]) == 0.0 for r in steps)  # AdamW's decoupled decay replaces the in-loss L2
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["optimizer"]["state"]
    assert "exp_avg" in next(iter(state.values()))


def test_amp_refused_on_cpu_and_help(capsys):
    assert main(["-c", "0", "--amp", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effdet-train: error:") and "CUDA" in err
    text = build_parser().format_help()
    for flag in ("--optim", "--val-interval", "--es-min-delta", "--es-patience", "--log-path", "--debug", "--amp",
                 "--weights", "--output", "--device", "--force", "--save-interval", "--head-only"):
        assert flag in text, flag
    actions = build_parser()._option_string_actions
    for hidden in ("--load-weights", "--load_weights", "--saved_path", "--saved-path"):
        assert actions[hidden].help == argparse.SUPPRESS  # accepted, not listed


def test_jitter_reaches_the_augmentation_and_is_checked(tmp_path):
    """``--jitter MIN MAX`` is the official jitter_min/jitter_max: the dataset draws its scales from it."""
    import pytest

    from effdet_cli.train import build_parser
    from training.engine import TrainConfig

    args = build_parser().parse_args(["-c", "0", "--jitter", "1", "1"])
    assert tuple(args.jitter) == (1.0, 1.0)
    assert build_parser().parse_args(["-c", "0"]).jitter == (0.1, 2.0)
    assert TrainConfig(variant="efficientdet-d0", obj_list=["a"], train_annotations="x", train_images="y",
                       out_dir=str(tmp_path)).jitter == (0.1, 2.0)
    from training.engine import Engine

    with pytest.raises(ValueError, match="jitter"):
        Engine(TrainConfig(variant="efficientdet-d0", obj_list=["a"], train_annotations="x", train_images="y",
                           out_dir=str(tmp_path), jitter=(2.0, 1.0)))
    from fixtures.shapes import SHAPE_CLASSES, make_shapes_project

    d = make_shapes_project(tmp_path / "p", num_train=2, num_val=1, size=64) / "datasets" / "shapes"
    eng = Engine(TrainConfig(variant="efficientdet-d0", obj_list=list(SHAPE_CLASSES), image_size=64,
                             train_annotations=str(d / "annotations" / "instances_train.json"),
                             train_images=str(d / "train"), out_dir=str(tmp_path / "o"), jitter=(1.0, 1.0),
                             batch_size=1))
    assert eng.train_set.jitter == (1.0, 1.0)
    _, boxes, _ = eng.train_set[0]  # scale 1 and a square image: the boxes keep their size (no zoom)
    ann = [a for a in __import__("json").loads((d / "annotations" / "instances_train.json").read_text())["annotations"]
           if a["image_id"] == 1]
    hw = sorted(float(b[2] - b[0]) for b in boxes[: len(ann)])
    assert hw == pytest.approx(sorted(a["bbox"][3] for a in ann), abs=1e-3)
