"""COCO class names for the official 90-id label map (1-based class ids, COCO's id gaps kept).

The official COCO models predict ``num_classes = 90`` classes whose 1-based class id IS the COCO
category id (official ``label_util.coco``). The 80 names below are the ``categories`` of the
public COCO 2017 annotation files (``instances_val2017.json``); the 10 ids COCO leaves unused
(12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are named by their id, as is any id outside 1..90.
"""
from __future__ import annotations

__all__ = ["COCO_CATEGORIES", "COCO_UNUSED_IDS", "coco_class_name", "label_map"]

#: COCO category id → name (the 80 used ids of the 90-id label map).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

#: The ids of the 90-id label map that COCO does not use.
COCO_UNUSED_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in COCO_CATEGORIES)


def coco_class_name(class_id: int | float) -> str:
    """The COCO name of a 1-based official class id (float ids from detection rows are rounded);
    unused or unknown ids are named by their id."""
    i = int(round(float(class_id)))
    return COCO_CATEGORIES.get(i, str(i))


def label_map(num_classes: int = 90) -> dict[int, str]:
    """``{id: name}`` for ids ``1..num_classes`` (COCO names where the id has one)."""
    return {i: coco_class_name(i) for i in range(1, num_classes + 1)}
