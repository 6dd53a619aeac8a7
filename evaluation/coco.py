"""COCO-format data for the official COCO-eval path: images, category ids, results, scoring.

Official facts followed here (google/automl ``efficientdet/``; see ``golden/README.md``):
- ``tf2/eval.py`` turns each image's ``[100, 7]`` ``generate_detections`` rows
  ``[source_id, xmin, ymin, xmax, ymax, score, class]`` into ``[image_id, x, y, w, h, score, class]``
  (``postprocess.transform_detections``: ``w = xmax - xmin``, ``h = ymax - ymin``, float32), and
  ``coco_metric.EvaluationMetric`` scores the stacked float32 array with pycocotools:
  ``coco_gt.loadRes(array)``, ``COCOeval(gt, dt, 'bbox')`` with ``params.imgIds`` = the evaluated
  image ids, then ``evaluate/accumulate/summarize`` → the 12 ``stats``.
- For COCO the 1-based class IS the category id (the 90-class label map keeps COCO's id gaps).
- Images are decoded to uint8 RGB (the official decoder is ``tf.io.decode_image(channels=3)``; PNG
  decodes identically, JPEG can differ from PIL by a few levels) and EXIF orientation is ignored,
  as TF does.

A custom dataset (a checkpoint whose class count is not 90, or ``category_map='sorted'``) maps the
model's 1-based class ``i`` to the ``i``-th category id of the annotation file sorted by id; classes
beyond the file's categories produce no results.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from effdet_torch.preprocess import preprocess_image

__all__ = [
    "COCO_METRIC_NAMES",
    "CocoEvalImages",
    "CocoScores",
    "ap_per_class",
    "format_per_class",
    "category_mapping",
    "check_annotations",
    "check_scorable",
    "coco_results",
    "evaluate_coco",
    "format_metrics",
    "load_annotations",
    "ImageDecodeError",
    "read_image_rgb",
    "rows_to_array",
]

#: The 12 ``COCOeval.stats`` in order (official ``coco_metric.EvaluationMetric.metric_names``).
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl")
COCO_NUM_CLASSES = 90


def load_annotations(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO ``instances_*.json`` (or ``image_info_*.json``) as a dict, its structure checked
    (:func:`check_annotations`): every way of being unusable is a ``ValueError`` naming the file and
    the entry, a missing file a ``FileNotFoundError``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed annotation JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({e.reason})") from None
    check_annotations(doc, str(path))
    return doc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_annotations(doc: Any, src: str) -> None:
    """The structure evaluation and training read: ``images`` (integer ``id``, unique; ``file_name``),
    optional ``categories`` (integer ``id``, ``name``) and ``annotations`` (integer ``image_id`` and
    ``category_id``, ``bbox`` four numbers; ``id``/``area``/``iscrowd`` typed where present). Raises
    ``ValueError`` naming ``src`` and the first bad entry. Box values are not judged here (training
    drops empty or non-finite boxes and counts them)."""
    def bad(where: str, what: str) -> None:
        raise ValueError(f"{src}: {where}: {what}")

    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{src}: not a COCO annotation file (no 'images' list)")
    for key in ("annotations", "categories"):
        if key in doc and not isinstance(doc[key], list):
            bad(key, f"must be a list, got {type(doc[key]).__name__}")
    ids: set[int] = set()
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            bad(f"images[{i}]", f"not an object: {str(im)[:60]}")
        if not _is_int(im.get("id")):
            bad(f"images[{i}]", f"'id' must be an integer, got {im.get('id')!r}")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            bad(f"images[{i}]", f"'file_name' must be a file name, got {im.get('file_name')!r}")
        if im["id"] in ids:
            bad(f"images[{i}]", f"duplicate image id {im['id']}")
        ids.add(im["id"])
    for i, c in enumerate(doc.get("categories", [])):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            bad(f"categories[{i}]", f"needs an integer 'id' and a 'name', got {str(c)[:80]}")
    for i, a in enumerate(doc.get("annotations", [])):
        if not isinstance(a, dict):
            bad(f"annotations[{i}]", f"not an object: {str(a)[:60]}")
        for key in ("image_id", "category_id"):
            if not _is_int(a.get(key)):
                bad(f"annotations[{i}]", f"{key!r} must be an integer, got {a.get(key)!r}")
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            bad(f"annotations[{i}]", f"'bbox' must be [x, y, width, height], got {box!r}")
        if "id" in a and not _is_int(a["id"]):
            bad(f"annotations[{i}]", f"'id' must be an integer, got {a['id']!r}")
        if "area" in a and not _is_number(a["area"]):
            bad(f"annotations[{i}]", f"'area' must be a number, got {a['area']!r}")
        if "iscrowd" in a and a["iscrowd"] not in (0, 1):
            bad(f"annotations[{i}]", f"'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")


def check_scorable(doc: dict[str, Any], src: str) -> None:
    """What pycocotools needs beyond :func:`check_annotations` to score: a ``categories`` list, and
    every annotation has an ``id`` (unique), an ``area`` (its area ranges) and ``iscrowd``. Checked
    before a long evaluation, so a file that cannot be scored fails at once."""
    if "annotations" not in doc:
        raise ValueError(f"{src}: no 'annotations' (an image-info file): nothing to score")
    if "categories" not in doc:
        raise ValueError(f"{src}: no 'categories', which COCO scoring reads (pycocotools)")
    seen: set[int] = set()
    for i, a in enumerate(doc["annotations"]):
        missing = [k for k in ("id", "area", "iscrowd") if k not in a]
        if missing:
            raise ValueError(f"{src}: annotations[{i}]: lacks {', '.join(map(repr, missing))}, which COCO scoring "
                             "reads (pycocotools)")
        if a["id"] in seen:
            raise ValueError(f"{src}: annotations[{i}]: duplicate annotation id {a['id']}")
        seen.add(a["id"])


def category_mapping(categories: Sequence[dict], num_classes: int, mode: str = "auto",
                     class_names: Sequence[str] | None = None) -> np.ndarray:
    """``int64 [num_classes + 1]``: model class (1-based) → category id, ``-1`` = no category.

    ``mode``: ``'names'`` — class ``i`` → the category named ``class_names[i - 1]`` (the names a model
    trained here records with its weights); ``'coco'`` — class == category id (the official 90-class
    COCO label map); ``'sorted'`` — class ``i`` → the ``i``-th category id of the file sorted by id;
    ``'auto'`` — ``'names'`` when the model has class names and the file names every one of them,
    else ``'coco'`` for a 90-class model on a file whose ids all lie in 1..90, otherwise
    ``'sorted'`` (for contiguous ids ``1..K`` the last two agree).
    """
    ids = sorted(int(c["id"]) for c in categories)
    by_name = {str(c.get("name")): int(c["id"]) for c in categories}
    if mode == "auto":
        if class_names is not None and len(class_names) == num_classes and all(n in by_name for n in class_names):
            mode = "names"
        else:
            mode = "coco" if num_classes == COCO_NUM_CLASSES and all(1 <= i <= COCO_NUM_CLASSES for i in ids) else "sorted"
    table = np.full((num_classes + 1,), -1, np.int64)
    if mode == "names":
        if class_names is None or len(class_names) != num_classes:
            raise ValueError(f"category map 'names': the model records no names for its {num_classes} classes")
        table[1:] = [by_name.get(str(n), -1) for n in class_names]
    elif mode == "coco":
        table[1:] = np.arange(1, num_classes + 1)
    elif mode == "sorted":
        n = min(num_classes, len(ids))
        table[1: n + 1] = ids[:n]
    else:
        raise ValueError(f"unknown category map {mode!r} (auto, names, coco, sorted)")
    return table


class ImageDecodeError(ValueError):
    """An image file cannot be decoded; the message names the file and the fault (a ValueError: the
    commands report it as bad input)."""


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """``[h, w, 3]`` uint8 RGB (grayscale/palette/alpha converted; EXIF orientation ignored as TF does).

    A file Pillow cannot identify or decode (truncated, corrupt, a decompression bomb) raises
    :class:`ImageDecodeError` naming it; a missing file stays a ``FileNotFoundError``.
    """
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not an image (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{path}: refused, too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageDecodeError(f"{path}: cannot decode the image ({what}; truncated or corrupt?)") from None


@dataclass(frozen=True)
class _Item:
    index: int
    image_id: int
    path: Path


class CocoEvalImages(Dataset):
    """The images of a COCO file in id order, preprocessed as the official eval input pipeline.

    ``ds[k]`` → ``(k, image_id, x [3, H, W] float32, image_scale float32)``: normalised, resized and
    zero-padded to ``image_size`` (official ``InputProcessor``; :func:`preprocess_image`). Runs on
    the CPU, so it can live in DataLoader worker processes.
    """

    def __init__(self, annotations: dict[str, Any] | str | os.PathLike, images_dir: str | os.PathLike,
                 image_size: tuple[int, int], mean_rgb, stddev_rgb, max_images: int | None = None) -> None:
        doc = annotations if isinstance(annotations, dict) else load_annotations(annotations)
        images = sorted(doc["images"], key=lambda im: im["id"])
        if max_images is not None:
            images = images[: max(0, int(max_images))]
        root = Path(images_dir)
        self.items = [_Item(k, int(im["id"]), root / im["file_name"]) for k, im in enumerate(images)]
        missing = [str(it.path) for it in self.items if not it.path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) listed in the annotations are missing "
                                    f"under {root}, e.g. {missing[:3]}")
        self.image_size = tuple(image_size)
        self.mean_rgb = tuple(float(v) for v in mean_rgb)
        self.stddev_rgb = tuple(float(v) for v in stddev_rgb)

    @property
    def image_ids(self) -> list[int]:
        return [it.image_id for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        it = self.items[k]
        x, scale = preprocess_image(read_image_rgb(it.path), self.image_size, self.mean_rgb, self.stddev_rgb)
        return it.index, it.image_id, x[0], torch.tensor(float(scale), dtype=torch.float32)


def empty_rows() -> np.ndarray:
    """No detections: official eval rows ``float32 [0, 7]``."""
    return np.zeros((0, 7), np.float32)


def rows_to_array(image_id: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One image's valid detections → official eval rows ``float32 [K, 7]``
    ``[image_id, x, y, w, h, score, class]`` (``transform_detections`` of ``generate_detections``).

    ``boxes``: ``[K, 4]`` ``(ymin, xmin, ymax, xmax)`` in original-image pixels, as the official
    eval path leaves them (×image_scale, not clipped).
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = np.empty((len(b), 7), np.float32)
    out[:, 0] = np.float32(image_id)
    out[:, 1] = b[:, 1]
    out[:, 2] = b[:, 0]
    out[:, 3] = b[:, 3] - b[:, 1]  # float32 subtraction, as tf.stack of float32 tensors
    out[:, 4] = b[:, 2] - b[:, 0]
    out[:, 5] = np.asarray(scores, np.float32)
    out[:, 6] = np.asarray(classes, np.float32)
    return out


def _image_id_column(rows: np.ndarray, image_ids: np.ndarray | None) -> np.ndarray:
    return image_ids if image_ids is not None else rows[:, 0].astype(np.int64)


def coco_results(rows: np.ndarray, cat_map: np.ndarray, image_ids: np.ndarray | None = None) -> list[dict]:
    """Eval rows ``[N, 7]`` → COCO results ``[{image_id, category_id, bbox, score}]`` (JSON-ready).

    Floats keep the exact float32 values (as doubles); rows whose class maps to no category are
    dropped. ``image_ids`` (int64 ``[N]``) overrides the float32 id column (ids above 2^24).
    """
    rows = np.asarray(rows, np.float32)
    ids = _image_id_column(rows, image_ids)
    cls = rows[:, 6].astype(np.int64)
    ok = (cls >= 1) & (cls < len(cat_map))
    cats = np.full(len(rows), -1, np.int64)
    cats[ok] = cat_map[cls[ok]]
    out = []
    for i in np.nonzero(cats >= 0)[0]:
        r = rows[i]
        out.append({"image_id": int(ids[i]), "category_id": int(cats[i]),
                    "bbox": [float(r[1]), float(r[2]), float(r[3]), float(r[4])], "score": float(r[5])})
    return out


class CocoScores(NamedTuple):
    """What :func:`evaluate_coco` measures."""

    stats: np.ndarray  # [12]: COCO_METRIC_NAMES
    text: str  # pycocotools' printed summary
    per_class: dict[int, float]  # category id -> AP (the official per-class rule; -1: nothing to score)


def evaluate_coco(gt: dict[str, Any] | str | os.PathLike, rows: np.ndarray, cat_map: np.ndarray,
                  image_ids: Sequence[int], row_image_ids: np.ndarray | None = None,
                  verbose: bool = True) -> CocoScores:
    """pycocotools bbox evaluation as the official ``coco_metric.EvaluationMetric`` does it.

    ``rows``: eval rows ``[N, 7]`` (class column = the model's 1-based class, mapped with
    ``cat_map``); ``image_ids``: every evaluated image (``params.imgIds``; an image without
    detections still counts its ground truth). Returns the 12 numbers, pycocotools' printed
    summary and the AP of every category of the file, as the official evaluation computes it when
    it has a label map (``coco_metric.py``: ``precision[:, :, k, area all, maxDets 100]``, the mean
    of the entries ``> -1``, ``-1`` when there are none). The detection array handed to
    ``loadRes`` is float32 like the official one (so box areas are float32 products), unless an id
    does not fit float32 exactly.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = gt if isinstance(gt, dict) else load_annotations(gt)
    check_scorable(doc, "the annotation file" if isinstance(gt, dict) else str(gt))
    rows = np.asarray(rows, np.float32).reshape(-1, 7)
    ids = _image_id_column(rows, row_image_ids)
    cls = rows[:, 6].astype(np.int64)
    ok = (cls >= 1) & (cls < len(cat_map))
    cats = np.full(len(rows), -1, np.int64)
    cats[ok] = cat_map[cls[ok]]
    keep = cats >= 0
    big = len(ids) and int(np.abs(ids).max()) >= 2 ** 24
    dets = np.array(rows[keep], np.float64 if big else np.float32)
    dets[:, 0] = ids[keep]
    dets[:, 6] = cats[keep]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = doc
        coco_gt.createIndex()
        if len(dets):
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty array: an empty result set scores 0 (or -1 without GT)
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(doc["images"]), "annotations": [],
                               "categories": list(doc.get("categories", []))}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    text = summary.getvalue()
    if verbose:
        print(text, end="")
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall points, categories]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[int(cat)] = float(np.mean(p)) if p.size else -1.0
    return CocoScores(np.asarray(ev.stats, np.float64), text, per_class)


def ap_per_class(scores: CocoScores, cat_map: np.ndarray, class_names: Sequence[str] | None,
                 categories: Sequence[dict]) -> dict[str, float]:
    """``{"AP_/<name>": AP}`` for every model class (1-based ``i``) mapped to a category of the file,
    named as the model names it (its recorded class names), else by the file's category name; the
    official metric names (``coco_metric.py``: ``AP_/<class name>``)."""
    file_names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    out = {}
    for i in range(1, len(cat_map)):
        cat = int(cat_map[i])
        if cat < 0 or cat not in scores.per_class:
            continue
        name = class_names[i - 1] if class_names is not None else file_names.get(cat, str(cat))
        out[f"AP_/{name}"] = scores.per_class[cat]
    return out


def format_per_class(per_class: dict[str, float]) -> str:
    """A table of per-class AP in percent, best first (``n/a``: no ground truth of that class)."""
    if not per_class:
        return "AP per class: no class of the model maps to a category of the annotation file"
    w = max(len(k) - 4 for k in per_class)
    rows = sorted(per_class.items(), key=lambda kv: -kv[1])
    lines = [f"{'class':<{w}}  {'AP':>7}"]
    lines += [f"{k[4:]:<{w}}  {100 * v:>7.3f}" if v >= 0 else f"{k[4:]:<{w}}  {'n/a':>7}" for k, v in rows]
    return "\n".join(lines)


def format_metrics(stats: Sequence[float]) -> str:
    """A compact two-line table of the 12 numbers in percent (as the official README reports AP);
    ``n/a`` where pycocotools gives -1 (no ground truth in that area range)."""
    head = " ".join(f"{n:>8}" for n in COCO_METRIC_NAMES)
    vals = " ".join(f"{100 * float(v):>8.3f}" if float(v) >= 0 else f"{'n/a':>8}" for v in stats)
    return head + "\n" + vals
