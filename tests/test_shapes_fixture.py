"""fixtures/shapes.py: the synthetic shapes project in the seed's layout is deterministic, COCO-valid and
its boxes are the drawn shapes' extents (checked from the pixels: the shape colour differs from the
texture inside the box and the box edges touch the shape)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from fixtures.shapes import SHAPE_CLASSES, make_shapes_project
from training.project import load_project


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_in_the_seed_layout(tmp_path):
    a, b = make_shapes_project(tmp_path / "a", seed=5), make_shapes_project(tmp_path / "b", seed=5)
    assert _digest(a) == _digest(b)
    assert _digest(make_shapes_project(tmp_path / "c", seed=6)) != _digest(a)
    proj = load_project(a / "projects" / "shapes.yml")
    assert proj["obj_list"] == list(SHAPE_CLASSES) and proj["train_set"] == "train" and proj["val_set"] == "val"
    for split, n in (("train", 8), ("val", 4)):
        doc = json.loads((a / "datasets" / "shapes" / "annotations" / f"instances_{split}.json").read_text())
        assert len(doc["images"]) == n and {c["id"] for c in doc["categories"]} == {1, 2, 3}
        assert len({i["id"] for i in doc["images"]}) == n
        for im in doc["images"]:
            assert (a / "datasets" / "shapes" / split / im["file_name"]).is_file()


def test_boxes_are_the_drawn_shapes(tmp_path):
    root = make_shapes_project(tmp_path, num_train=6, num_val=1, seed=1)
    doc = json.loads((root / "datasets" / "shapes" / "annotations" / "instances_train.json").read_text())
    assert doc["annotations"], "no objects drawn"
    by_id = {im["id"]: im for im in doc["images"]}
    for ann in doc["annotations"]:
        im = by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w > 8 and h > 8
        assert ann["category_id"] in (1, 2, 3) and ann["area"] == w * h
        # a rectangle fills its box: the box's inner pixels are one colour (up to JPEG error)
        if ann["category_id"] == 1:
            px = np.asarray(Image.open(root / "datasets" / "shapes" / "train" / im["file_name"]).convert("RGB"), float)
            inner = px[int(y) + 3:int(y + h) - 3, int(x) + 3:int(x + w) - 3]
            assert inner.std(axis=(0, 1)).max() < 6.0
