"""A deterministic synthetic COCO-format detection dataset (images with shapes + ``instances_*.json``).

Used to test ``effdet-eval`` end to end without COCO. The same ``(num_images, seed, ...)`` always
gives byte-identical PNG files and JSON (numpy ``default_rng`` + Pillow drawing + PNG, lossless, so
every decoder reads the same pixels). What it exercises on purpose:

- image sizes vary (landscape and portrait, never square by default), so ``image_scale`` varies;
- image ids are NOT ``0..n-1`` (``1000 + 7·i``) and the ``images`` list is written in reverse id
  order, so code that confuses list positions and ids fails;
- every 4th image is written as grayscale (``L``) PNG: loaders must convert to RGB;
- categories are real COCO ids and names by default (``person`` 1, ``car`` 3, ``dog`` 18,
  ``bottle`` 44, ``chair`` 62: the 90-class checkpoints' 1-based class == category id), or, with
  ``custom_categories``, arbitrary sparse ids (``101, 205, 307``) that a model's classes map to
  by rank (class i → i-th category sorted by id);
- shapes are rectangles (bbox exact), ellipses and triangles, with polygon ``segmentation``,
  ``area`` of the drawn shape, ``iscrowd`` 0; one image has no object at all.

CLI: ``python -m effdet_torch.synthetic_coco OUT --num-images N [--seed S]`` writes
``OUT/images/*.png`` and ``OUT/annotations/instances_synthetic.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COCO_CATEGORIES", "CUSTOM_CATEGORIES", "annotations_from_detections", "make_synthetic_coco", "main"]

#: A few real COCO categories (id, name, supercategory): the 90-class checkpoints' class == id.
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (3, "car", "vehicle"),
    (18, "dog", "animal"),
    (44, "bottle", "kitchen"),
    (62, "chair", "furniture"),
)
#: Sparse ids of a "custom" dataset: a model's 1-based class i maps to the i-th id in sorted order.
CUSTOM_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (205, "triangle", "shape"),
    (101, "box", "shape"),
    (307, "blob", "shape"),
)

ANNOTATION_NAME = "instances_synthetic.json"


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2.0)


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> dict:
    """Draw one random shape; return its COCO ``bbox``/``area``/``segmentation``."""
    kind = int(rng.integers(0, 3))
    bw = int(rng.integers(max(4, w // 10), max(5, w * 2 // 3)))
    bh = int(rng.integers(max(4, h // 10), max(5, h * 2 // 3)))
    x0 = int(rng.integers(0, max(1, w - bw)))
    y0 = int(rng.integers(0, max(1, h - bh)))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    outline = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == 0:  # rectangle covering pixels x0..x0+bw-1 → bbox [x0, y0, bw, bh]
        draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=fill, outline=outline)
        poly = np.array([[x0, y0], [x0 + bw, y0], [x0 + bw, y0 + bh], [x0, y0 + bh]], np.float64)
        area = float(bw * bh)
    elif kind == 1:  # ellipse inscribed in the box
        draw.ellipse([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=fill, outline=outline)
        t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        poly = np.stack([x0 + bw / 2 * (1 + np.cos(t)), y0 + bh / 2 * (1 + np.sin(t))], 1)
        area = math.pi * bw * bh / 4.0
    else:  # triangle: apex on the top edge, base on the bottom edge
        apex = x0 + int(rng.integers(0, bw))
        poly = np.array([[apex, y0], [x0 + bw, y0 + bh], [x0, y0 + bh]], np.float64)
        draw.polygon([tuple(p) for p in poly.tolist()], fill=fill, outline=outline)
        area = _polygon_area(poly)
    return {
        "bbox": [float(x0), float(y0), float(bw), float(bh)],
        "area": round(area, 2),
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
        "iscrowd": 0,
    }


def make_synthetic_coco(out_dir: str | os.PathLike, num_images: int = 8, seed: int = 0,
                        min_size: int = 64, max_size: int = 256, max_objects: int = 4,
                        custom_categories: bool = False,
                        categories: Sequence[tuple[int, str, str]] | None = None) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations/instances_synthetic.json``.

    Returns the annotation file's path. Deterministic in all arguments (see the module docstring).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    cats = list(categories or (CUSTOM_CATEGORIES if custom_categories else COCO_CATEGORIES))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        image_id = 1000 + 7 * i
        a, b = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
        if a == b:  # keep every image non-square so the padding side is exercised
            b = a - 1 if a > min_size else a + 1
        w, h = (max(a, b), min(a, b)) if i % 2 == 0 else (min(a, b), max(a, b))
        # a smooth random background gradient plus noise
        base = rng.integers(0, 256, 3).astype(np.float64)
        grad = rng.normal(0, 40, (2, 3))
        yy, xx = np.mgrid[0:h, 0:w]
        bg = base + grad[0] * (yy[..., None] / h) + grad[1] * (xx[..., None] / w)
        bg = bg + rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        n_obj = 0 if i == 1 else int(rng.integers(1, max_objects + 1))  # image 1 has no object
        for _ in range(n_obj):
            obj = _draw_object(draw, rng, w, h)
            cat = cats[int(rng.integers(0, len(cats)))]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat[0], **obj})
            ann_id += 1
        if i % 4 == 3:
            img = img.convert("L")
        name = f"{image_id:012d}.png"
        img.save(out / "images" / name, format="PNG", optimize=False, compress_level=6)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    doc = {
        "info": {"description": f"effdet-parity synthetic COCO-format set (seed {seed})", "version": "1.0",
                 "year": 2026},
        "licenses": [],
        "images": images[::-1],
        "annotations": annotations,
        "categories": [{"id": c[0], "name": c[1], "supercategory": c[2]} for c in cats],
    }
    path = out / "annotations" / ANNOTATION_NAME
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return path


#: Ranks of the detections that become ground truth, and how far each is shifted (× its size):
#: spread over the score ranking and over IoU 0.5..0.95, so AP depends on every detail of both.
_PSEUDO_RANKS = (0, 1, 3, 6, 10, 15, 24, 40, 60)
_PSEUDO_SHIFTS = (0.0, 0.02, 0.05, 0.08, 0.12, 0.0, 0.15, 0.03, 0.2)


def annotations_from_detections(doc: dict, per_image_rows: dict[int, np.ndarray], cat_map: np.ndarray,
                                clip: bool = True) -> dict:
    """A copy of ``doc`` whose annotations are derived from detections (a "pseudo ground truth").

    With synthetic weights the real annotations give AP ≈ 0, which would not notice a changed
    score or box; this makes AP sensitive to both. Per image, the detections at ranks
    ``0, 1, 3, 6, 10, ...`` (rows ``[id, x, y, w, h, score, class]`` best first) are clipped to the
    image (unless ``clip`` is False), shifted by ``0..20 %`` of their size and kept as ground truth
    of the class's category.
    Deterministic in its inputs.
    """
    sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in doc["images"]}
    anns, ann_id = [], 1
    for image_id in sorted(per_image_rows):
        rows = np.asarray(per_image_rows[image_id], np.float64)
        if image_id not in sizes or not len(rows):
            continue
        w_img, h_img = sizes[image_id] if clip else (np.inf, np.inf)
        lo = 0.0 if clip else -np.inf
        order = np.argsort(-rows[:, 5], kind="stable")
        for rank, shift in zip(_PSEUDO_RANKS, _PSEUDO_SHIFTS):
            if rank >= len(order):
                break
            _, x, y, w, h, _, cls = rows[order[rank]]
            if not np.isfinite([x, y, w, h]).all():  # synthetic weights can overflow exp() in decoding
                continue
            x0, y0 = min(max(x, lo), w_img), min(max(y, lo), h_img)
            x1, y1 = min(max(x + w, lo), w_img), min(max(y + h, lo), h_img)
            bw, bh = x1 - x0, y1 - y0
            cat = int(cat_map[int(cls)]) if 0 < int(cls) < len(cat_map) else -1
            if bw < 1 or bh < 1 or cat < 0:
                continue
            bx = [round(x0 + shift * bw, 3), round(y0 + shift * bh, 3), round(bw, 3), round(bh, 3)]
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bx,
                         "area": round(bx[2] * bx[3], 3), "iscrowd": 0,
                         "segmentation": [[bx[0], bx[1], bx[0] + bx[2], bx[1], bx[0] + bx[2], bx[1] + bx[3],
                                           bx[0], bx[1] + bx[3]]]})
            ann_id += 1
    used = {a["category_id"] for a in anns}
    cats = {int(c["id"]): c for c in doc.get("categories", [])}
    for cid in sorted(used - set(cats)):
        cats[cid] = {"id": cid, "name": f"class{cid}", "supercategory": "pseudo"}
    out = dict(doc)
    out["annotations"] = anns
    out["categories"] = [cats[c] for c in sorted(cats)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m effdet_torch.synthetic_coco",
                                description="Write a deterministic synthetic COCO-format detection dataset.")
    p.add_argument("out", help="output folder (images/ and annotations/ are created in it)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=64, help="smallest image side (pixels)")
    p.add_argument("--max-size", type=int, default=256, help="largest image side (pixels)")
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--custom-categories", action="store_true",
                   help="sparse non-COCO category ids (101, 205, 307) instead of real COCO ones")
    a = p.parse_args(argv)
    path = make_synthetic_coco(a.out, a.num_images, a.seed, a.min_size, a.max_size, a.max_objects,
                               a.custom_categories)
    print(f"wrote {a.num_images} images to {Path(a.out) / 'images'} and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
