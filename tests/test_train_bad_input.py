"""Bad input to ``effdet-train`` (issue 10 item 7): each a clear one-line error (exit 1) or warning,
and nothing lost. d0 at 64 px on 4 synthetic images; most cases fail before the first step."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import training.step
from effdet_cli.train import main
from tests.test_train_cli import make_seed_layout


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_seed_layout(tmp_path_factory.mktemp("bad"), num_images=4)[0]


@pytest.fixture
def root(base, tmp_path):
    shutil.copytree(base, tmp_path / "r")
    return tmp_path / "r"


def _ann(root):
    return root / "datasets" / "shape" / "annotations" / "instances_train.json"


def _edit(root, fn):
    doc = json.loads(_ann(root).read_text())
    fn(doc)
    _ann(root).write_text(json.dumps(doc))


def _args(root, *extra):
    return ["-c", "0", "-p", "shape", "--projects-dir", str(root / "projects"), "--data-path", str(root / "datasets"),
            "--image-size", "64", "--batch-size", "2", "--workers", "0", "-o", str(root / "logs"),
            "--val-interval", "0", *extra]


def _one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("effdet-train: error: ") and err.count("\n") == 1, err
    for p in parts:
        assert p in err, (p, err)
    return err


def test_malformed_json(root, capsys):
    _ann(root).write_text('{"images": [{"id": 1,')
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "instances_train.json", "malformed annotation JSON")


def test_malformed_annotation_entry(root, capsys):
    _edit(root, lambda d: d["annotations"][0].pop("bbox"))
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "instances_train.json: annotations[0]: 'bbox' must be [x, y, width, height], got None")


def test_category_id_not_in_categories(root, capsys):
    _edit(root, lambda d: d["annotations"][0].update(category_id=999))
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "category_id 999", "not in obj_list")


def test_missing_image_file(root, capsys):
    victim = sorted((root / "datasets" / "shape" / "train").iterdir())[0]
    victim.unlink()
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "1 image file(s) missing", victim.name)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_truncated_image_file(root, capsys, workers):
    """Read in this process or in a loader worker (whose exception message carries its traceback): one
    line naming the image."""
    victim = sorted((root / "datasets" / "shape" / "train").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    args = _args(root, "--max-steps", "2")
    args[args.index("--workers") + 1] = workers
    assert main(args) == 1
    _one_line_error(capsys, f"{victim}: cannot decode the image", "truncated or corrupt?")


@pytest.mark.parametrize("key, value, fault", [
    ("mean", 0.5, "mean: must be three numbers (RGB), got 0.5"),
    ("std", [0.2, 0.2, 0], "std: must be three numbers (RGB), each > 0, got [0.2, 0.2, 0]"),
    ("num_gpus", "two", "num_gpus: must be a whole number >= 0 (the seed's 0: no GPU), got 'two'"),
    ("obj_list", ["cat", "cat"], "obj_list: names a class twice"),
    ("train_set", "../elsewhere", "train_set: must be a plain folder name, got '../elsewhere'"),
    ("anchors_scales", 2, "anchors_scales: must be a list of positive numbers, got 2"),
    ("anchors_ratios", "[(1.0, 1.0), (2.0,)]", "anchors_ratios: must be a list of (width, height) pairs"),
    ("anchor_scale", "big", "anchor_scale: must be a positive number (or one per level), got 'big'"),
])
def test_bad_project_field(root, capsys, key, value, fault):
    """A project file (projects/NAME.yml) field of the wrong type or value: one line naming the file
    (the fuzz of these fields found TypeError tracebacks and messages naming neither file nor key)."""
    import yaml

    yml = root / "projects" / "shape.yml"
    doc = yaml.safe_load(yml.read_text())
    doc[key] = value
    yml.write_text(yaml.safe_dump(doc))
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "shape.yml", fault)


def test_official_anchor_ratio_spellings_both_train(root, capsys):
    """(1.4, 0.7) is the seed's spelling of the official aspect ratio 2 (sqrt(2), 1/sqrt(2)): both
    spellings train with the official anchors, recorded as such in the weights."""
    import yaml

    from effdet_torch.checkpoint import load_weights_file
    from effdet_torch.config import get_config

    yml = root / "projects" / "shape.yml"
    doc = yaml.safe_load(yml.read_text())
    doc["anchors_ratios"] = "[(1.0, 1.0), (2 ** 0.5, 2 ** -0.5), (2 ** -0.5, 2 ** 0.5)]"
    yml.write_text(yaml.safe_dump(doc))
    assert main(_args(root, "--max-steps", "1")) == 0
    (pth,) = (root / "logs" / "shape").glob("efficientdet-d0_*.pth")
    assert load_weights_file(pth).record["anchors"] == get_config("d0").anchors


def test_bad_boxes_dropped_and_counted(root, capsys):
    def add(doc):
        im = doc["images"][0]
        w, h = im["width"], im["height"]
        extra = [[5, 5, 0, 10],  # zero width: dropped
                 [w + 10, 5, 8, 8],  # entirely right of the image: dropped
                 [-4, -4, 2, 2],  # entirely above-left: dropped
                 [w - 4, h - 4, 10, 10]]  # reaches outside: clipped, kept
        for i, b in enumerate(extra):
            doc["annotations"].append({"id": 9000 + i, "image_id": im["id"], "category_id": 1, "bbox": b,
                                       "area": 1.0, "iscrowd": 0})

    _edit(root, add)
    assert main(_args(root, "--max-steps", "1")) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("effdet-train: warning: "), err
    assert "3 zero-area, non-finite or out-of-image box(es) dropped" in lines[0] and "1 clipped" in lines[0]


def test_images_without_boxes_are_negatives(root, capsys):
    _edit(root, lambda d: d.update(annotations=[]))
    assert main(_args(root, "--max-steps", "1")) == 0
    assert "error" not in capsys.readouterr().err
    ckpt = torch.load(root / "logs" / "shape" / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 1
    import csv

    with open(root / "logs" / "shape" / "train_log.csv", newline="") as f:
        row = next(csv.DictReader(f))
    # no positives anywhere: the box loss is an empty masked sum, exactly 0; the class loss is finite
    assert float(row["box_loss"]) == 0.0 and math.isfinite(float(row["cls_loss"]))


def test_non_finite_loss_names_step_part_and_last_checkpoint(root, capsys, monkeypatch):
    real = training.step.detection_loss
    calls = []

    def nan_at_second(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            out["cls_loss"] = out["cls_loss"] * float("nan")
            out["det_loss"] = out["cls_loss"] + out["box_loss"]
        return out

    monkeypatch.setattr(training.step, "detection_loss", nan_at_second)
    assert main(_args(root, "--max-steps", "5", "--save-interval", "1")) == 1
    last = root / "logs" / "shape" / "last.ckpt"
    _one_line_error(capsys, "non-finite loss at step 2", "cls_loss", f"last good checkpoint: {last} (step 1)")
    assert torch.load(last, weights_only=True)["step"] == 1  # the good state of step 1 was kept


def test_unwritable_output(root, capsys):
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    args = _args(root, "--max-steps", "1")
    args[args.index("-o") + 1] = str(blocker / "logs")
    assert main(args) == 1
    _one_line_error(capsys, "a_file", "cannot write there")


def test_existing_run_needs_resume_or_force(root, capsys):
    assert main(_args(root, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(_args(root, "--max-steps", "1")) == 1
    _one_line_error(capsys, "already holds a run", "--weights last", "--force")
    assert main(_args(root, "--max-steps", "1", "--force")) == 0


def test_resume_without_checkpoint_and_batch_too_large(root, capsys):
    assert main(_args(root, "--weights", "last", "--max-steps", "1")) == 1
    _one_line_error(capsys, "no checkpoint to resume")
    assert main(_args(root, "--max-steps", "1", "--batch-size", "8")) == 1
    _one_line_error(capsys, "batch size 8 is larger than the 4 training image(s)")


def test_other_class_count_resets_the_head_in_one_warning_line(root, tmp_path, capsys):
    from effdet_torch.config import get_config
    from effdet_torch.model import EfficientDet

    other = tmp_path / "three_classes.pth"
    torch.save(EfficientDet(get_config("d0", image_size=64, num_classes=3)).state_dict(), other)
    assert main(_args(root, "--max-steps", "1", "--weights", str(other))) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("effdet-train: warning: ") and "class predictor" in lines[0], lines
