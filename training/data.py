"""COCO-format training data in the seed's layout, through the official training input pipeline.

``datasets/NAME/{train_set}/*.jpg`` + ``datasets/NAME/annotations/instances_{train_set}.json``.
Each sample: COCO ``bbox [x, y, w, h]`` (pixels) → normalised ``(ymin, xmin, ymax, xmax)`` clipped
to the image (counted), zero-area/non-finite/out-of-image boxes dropped (counted), images
without boxes kept (negatives), crowd boxes kept for the pipeline to skip, then
:func:`training.augment.train_transform` with per-sample draws from ``(seed, epoch, index)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from evaluation.coco import check_annotations, load_annotations, read_image_rgb

from .augment import AugmentDraws, train_transform

__all__ = ["CocoTrainDataset", "collate"]


class CocoTrainDataset(Dataset):
    """``ds[k]`` → ``(image [3, H, W] float32, boxes [K, 4] output pixels, classes [K] 1-based)``.

    ``obj_list`` names the classes in model order (class ``i + 1`` = ``obj_list[i]``); annotation
    categories are matched by name. A category id without a class is an error naming it.
    """

    def __init__(self, annotations: dict[str, Any] | str | os.PathLike, images_dir: str | os.PathLike,
                 obj_list: Sequence[str], image_size: tuple[int, int], mean_rgb, stddev_rgb,
                 jitter: tuple[float, float] = (0.1, 2.0), hflip: bool = True, seed: int = 0) -> None:
        src = str(annotations) if not isinstance(annotations, dict) else "<annotations>"
        if isinstance(annotations, dict):
            doc = annotations
            check_annotations(doc, src)
        else:
            doc = load_annotations(annotations)
        names = {c["id"]: c["name"] for c in doc.get("categories", [])}
        cls_of_name = {n: i + 1 for i, n in enumerate(obj_list)}
        root = Path(images_dir)
        by_image: dict[int, list[dict]] = {}
        image_ids = set()
        for i, im in enumerate(doc["images"]):
            if not all(isinstance(im.get(k), (int, float)) and im[k] > 0 for k in ("width", "height")):
                raise ValueError(f"{src}: images[{i}]: training needs its 'width' and 'height' (positive numbers), "
                                 f"got {im.get('width')!r} x {im.get('height')!r}")
            image_ids.add(im["id"])
        self.orphans = 0  # annotations of an image id that is not in 'images'
        for a in doc.get("annotations", []):
            if a["image_id"] not in image_ids:
                self.orphans += 1
                continue
            by_image.setdefault(a["image_id"], []).append(a)
        self.items = []
        self.sizes = []  # (height, width) of each item's image, as the annotation file gives it
        self.dropped = 0  # zero-area, non-finite or entirely out-of-image boxes
        self.clipped = 0  # boxes reaching outside the image, clipped to it
        self.negatives = 0  # images without any (kept) box: allowed, pure background
        missing = []
        for im in sorted(doc["images"], key=lambda im: im["id"]):
            path = root / im["file_name"]
            if not path.is_file():
                missing.append(str(path))
                continue
            w, h = float(im["width"]), float(im["height"])
            rows = []
            for a in by_image.get(im["id"], []):
                cid = a["category_id"]
                if names.get(cid) not in cls_of_name:
                    raise ValueError(f"{src}: annotation {a.get('id')} has category_id {cid} "
                                     f"({names.get(cid, 'not in categories')!r}), which is not in obj_list {list(obj_list)}")
                x, y, bw, bh = (float(v) for v in a["bbox"])
                raw = np.array([y / h, x / w, (y + bh) / h, (x + bw) / w], np.float64)
                if not np.isfinite(raw).all():
                    self.dropped += 1
                    continue
                box = np.clip(raw, 0.0, 1.0)
                if box[2] <= box[0] or box[3] <= box[1]:
                    self.dropped += 1
                    continue
                if not np.array_equal(box, raw):
                    self.clipped += 1
                rows.append((*box, cls_of_name[names[cid]], int(a.get("iscrowd", 0))))
            arr = np.asarray(rows, np.float32).reshape(-1, 6)
            self.negatives += int(not len(arr))
            self.items.append((path, arr))
            self.sizes.append((h, w))
        if missing:
            raise FileNotFoundError(f"{src}: {len(missing)} image file(s) missing under {root}, e.g. {missing[0]}")
        if not self.items:
            raise ValueError(f"{src}: no images")
        self.image_size = tuple(image_size)
        self.mean_rgb, self.stddev_rgb = tuple(mean_rgb), tuple(stddev_rgb)
        self.jitter, self.hflip, self.seed = tuple(jitter), hflip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        path, arr = self.items[k]
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, k)) & 0x7FFFFFFF)
        draws = AugmentDraws.sample(g, self.jitter)
        s = train_transform(read_image_rgb(path), arr[:, :4], arr[:, 4], arr[:, 5], self.image_size,
                            self.mean_rgb, self.stddev_rgb, draws, hflip=self.hflip)
        return s.image, s.boxes, s.classes


def collate(batch):
    """Images stacked; boxes/classes padded with -1 rows (``[B, M, 4]``, ``[B, M]``)."""
    images = torch.stack([b[0] for b in batch])
    m = max(1, max(len(b[2]) for b in batch))
    boxes = torch.full((len(batch), m, 4), -1.0)
    classes = torch.full((len(batch), m), -1.0)
    for i, (_, bx, cl) in enumerate(batch):
        boxes[i, : len(cl)] = bx
        classes[i, : len(cl)] = cl
    return images, boxes, classes
