"""How well anchors fit a data set, and anchors that fit it better (``effdet-anchors``).

The official target assignment (``anchors.AnchorLabeler``, :mod:`training.targets`) makes an anchor a
positive of the box it overlaps most when their IoU reaches 0.5; a box no anchor reaches 0.5 with is
only force-matched to its single best anchor, so its class and box losses rest on one anchor of the
wrong shape. What decides it is each box's *best IoU over all anchors*: the share of boxes whose best
IoU reaches 0.5 is the coverage this module reports (overall, per COCO size bucket and per aspect
bucket, after the official letterbox scaling to the network input — no jitter), with the positives
per box of the official matcher.

The best IoU of a box over a level's anchors of one shape is reached at the grid centre nearest to
the box centre in each axis (each axis' overlap never grows with its offset, and the union grows as
the intersection shrinks), so it is computed there without the ``boxes × anchors`` matrix
(:func:`best_ious`). It equals the matrix's maximum to an ulp: where one box holds the other along an
axis the overlap is the same at several centres, and the matrix's maximum then picks the centre
whose float32 subtraction happens to round up (a test checks the ulp).

The suggestion (:func:`suggest_anchors`) keeps the official form — official octave scales, float
aspect ratios (an anchor of ratio ``r`` is ``√r`` wide, ``1/√r`` high, as the official code builds
it), one ``anchor_scale`` — so the official scripts can take it as an ``--hparams`` string. It
maximises the coverage (ties: the mean best IoU) in three steps:

1. aspect ratios: the boxes' ``log(w/h)`` clustered by 1-D k-means into as many ratios as asked,
   the cluster centres as ``exp`` (the ratio a box of that log-aspect would need);
2. ``anchor_scale``: the best of a grid from 1 to 8 in steps of 0.25, with those ratios;
3. coordinate refinement: each ratio × (0.8, 0.9, 1.1, 1.25) and the scale ± 0.25, accepting any
   gain, until a round gains nothing (at most 5 rounds).

The search runs on at most ``max_boxes`` boxes (a seeded sample); the report covers them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from effdet_torch.config import AnchorConfig, EfficientDetConfig, octave_scales

from .targets import assign_targets

__all__ = ["ASPECT_BUCKETS", "Coverage", "GroundTruth", "SIZE_BUCKETS", "best_ious", "coverage", "letterboxed",
           "suggest_anchors"]

MATCH_IOU = 0.5  # official AnchorLabeler match threshold
SIZE_BUCKETS = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, math.inf))
ASPECT_BUCKETS = (("w/h < 1/4", 0.0, 0.25), ("1/4 - 1/2", 0.25, 0.5), ("1/2 - 1", 0.5, 1.0), ("1 - 2", 1.0, 2.0),
                  ("2 - 4", 2.0, 4.0), ("w/h >= 4", 4.0, math.inf))


@dataclass
class GroundTruth:
    """Ground-truth boxes in network-input pixels: ``boxes [G, 4]`` (ymin, xmin, ymax, xmax), the image
    of each ``image [G]`` (indices into ``num_images``)."""

    boxes: np.ndarray
    image: np.ndarray
    num_images: int


def letterboxed(items: Sequence[tuple[float, float, np.ndarray]], image_size: tuple[int, int]) -> GroundTruth:
    """Boxes after the official letterbox scaling (``scale = min(H/h, W/w)``, image at the top left):
    ``items`` of ``(image height, image width, boxes [K, 4] normalised (ymin, xmin, ymax, xmax))``."""
    out, owner = [], []
    for i, (h, w, norm) in enumerate(items):
        s = min(image_size[0] / h, image_size[1] / w)
        if len(norm):
            out.append(np.asarray(norm, np.float64) * np.array([h * s, w * s, h * s, w * s]))
            owner.append(np.full(len(norm), i))
    boxes = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 4), np.float32)
    return GroundTruth(boxes, np.concatenate(owner) if owner else np.zeros((0,), np.int64), len(items))


def _iou(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of broadcast boxes (…, 4), the official float32 operations (training.targets)."""
    ih = (torch.minimum(b[..., 2], a[..., 2]) - torch.maximum(b[..., 0], a[..., 0])).clamp(min=0)
    iw = (torch.minimum(b[..., 3], a[..., 3]) - torch.maximum(b[..., 1], a[..., 1])).clamp(min=0)
    inter = ih * iw
    union = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) + (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])) - inter
    return torch.where(inter == 0, torch.zeros_like(inter), inter / union)


def best_ious(cfg: EfficientDetConfig, boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """``[G]``: each box's best IoU over all anchors of ``cfg`` at ``image_size`` (float32, as the
    official matcher computes IoU), from the two grid centres nearest the box centre in each axis,
    every level and anchor shape (to an ulp: the module docstring)."""
    b = torch.from_numpy(np.asarray(boxes, np.float32))
    if not len(b):
        return np.zeros((0,), np.float32)
    a = cfg.anchors
    sizes = cfg.feature_sizes(image_size)
    factors = a.axis_factors()
    best = torch.zeros(len(b))
    b64 = b.double()
    cy, cx = (b64[:, 0] + b64[:, 2]) / 2, (b64[:, 1] + b64[:, 3]) / 2  # anchors in float64, then float32 as official
    for lvl, anchor_scale in zip(cfg.levels, a.level_scales(len(cfg.levels))):
        fh, fw = sizes[lvl]
        sy, sx = image_size[0] / float(fh), image_size[1] / float(fw)
        iy = torch.floor((cy - sy / 2) / sy).clamp(0, fh - 1)
        ix = torch.floor((cx - sx / 2) / sx).clamp(0, fw - 1)
        ys = torch.stack([iy, (iy + 1).clamp(max=fh - 1)], 1) * sy + sy / 2  # [G, 2] candidate centres
        xs = torch.stack([ix, (ix + 1).clamp(max=fw - 1)], 1) * sx + sx / 2
        for k in a.scales:
            for fx, fy in factors:
                hy, hx = anchor_scale * sy * k * fy / 2.0, anchor_scale * sx * k * fx / 2.0
                yy, xx = ys[:, :, None], xs[:, None, :]  # [G, 2, 2]
                anchor = torch.stack(torch.broadcast_tensors(yy - hy, xx - hx, yy + hy, xx + hx), -1).float()
                best = torch.maximum(best, _iou(b[:, None, None, :], anchor).amax(dim=(1, 2)))
    return best.numpy()


@dataclass
class Coverage:
    """How ``anchors`` fit ``GroundTruth``: per box the best IoU and the positives of the official
    matcher; shares overall and per bucket (``(name, boxes, share)``)."""

    anchors: AnchorConfig
    best_iou: np.ndarray
    positives: np.ndarray | None
    share: float = 0.0
    mean_best_iou: float = 0.0
    by_size: list[tuple[str, int, float]] = field(default_factory=list)
    by_aspect: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def positives_per_box(self) -> float | None:
        return None if self.positives is None or not len(self.positives) else float(self.positives.mean())

    def to_json(self) -> dict:
        return {"anchors": self.anchors.to_dict(), "boxes": int(len(self.best_iou)), "share_iou_0_5": self.share,
                "mean_best_iou": self.mean_best_iou, "positives_per_box": self.positives_per_box,
                "by_size": [{"bucket": n, "boxes": c, "share": s} for n, c, s in self.by_size],
                "by_aspect": [{"bucket": n, "boxes": c, "share": s} for n, c, s in self.by_aspect]}


def _buckets(values: np.ndarray, ok: np.ndarray, spec) -> list[tuple[str, int, float]]:
    out = []
    for name, lo, hi in spec:
        m = (values >= lo) & (values < hi)
        out.append((name, int(m.sum()), float(ok[m].mean()) if m.any() else float("nan")))
    return out


def positives_per_box(cfg: EfficientDetConfig, gt: GroundTruth, image_size: tuple[int, int],
                      progress: Callable | None = None) -> np.ndarray:
    """``[G]``: the anchors the official matcher gives each box (threshold matches and the force
    match; :func:`training.targets.assign_targets`, image by image)."""
    from effdet_torch.anchors import generate_anchors

    anchors = torch.from_numpy(generate_anchors(cfg, image_size))
    out = np.zeros(len(gt.boxes), np.int64)
    order = np.argsort(gt.image, kind="stable")
    starts = np.searchsorted(gt.image[order], np.arange(gt.num_images + 1))
    for i in range(gt.num_images):
        idx = order[starts[i]:starts[i + 1]]
        if len(idx):
            t = assign_targets(torch.from_numpy(gt.boxes[idx]), torch.ones(len(idx)), anchors)
            out[idx] = np.bincount(t.matches[t.matches >= 0].numpy(), minlength=len(idx))
        if progress is not None:
            progress(1)
    return out


def coverage(cfg: EfficientDetConfig, gt: GroundTruth, image_size: tuple[int, int], with_positives: bool = True,
             progress: Callable | None = None) -> Coverage:
    """The :class:`Coverage` of ``cfg``'s anchors on ``gt``."""
    best = best_ious(cfg, gt.boxes, image_size)
    ok = best >= MATCH_IOU
    b = gt.boxes.astype(np.float64)
    h, w = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    pos = positives_per_box(cfg, gt, image_size, progress) if with_positives else None
    return Coverage(cfg.anchors, best, pos, float(ok.mean()) if len(ok) else float("nan"),
                    float(best.mean()) if len(best) else float("nan"),
                    _buckets(h * w, ok, SIZE_BUCKETS), _buckets(w / np.maximum(h, 1e-9), ok, ASPECT_BUCKETS))


def _kmeans_1d(x: np.ndarray, k: int, iters: int = 50) -> np.ndarray:
    """Centres of 1-D k-means (initialised at quantiles; deterministic)."""
    c = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        lab = np.abs(x[:, None] - c[None]).argmin(1)
        new = np.array([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def suggest_anchors(cfg: EfficientDetConfig, gt: GroundTruth, image_size: tuple[int, int], num_ratios: int | None = None,
                    max_boxes: int = 5000, seed: int = 0, progress: Callable | None = None) -> AnchorConfig:
    """Anchors of the official form that fit ``gt`` better (the module docstring's method); the scales
    stay the official octaves of ``cfg``'s count."""
    boxes = gt.boxes
    if len(boxes) > max_boxes:
        boxes = boxes[np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False)]
    if not len(boxes):
        raise ValueError("no boxes to fit anchors to")
    k = num_ratios or len(cfg.anchors.aspect_ratios)
    n = cfg.anchors.num_scales

    def score(a: AnchorConfig) -> tuple[float, float]:
        best = best_ious(replace(cfg, anchors=a), boxes, image_size)
        if progress is not None:
            progress(1)
        return float((best >= MATCH_IOU).mean()), float(best.mean())

    b = boxes.astype(np.float64)
    log_aspect = np.log((b[:, 3] - b[:, 1]) / np.maximum(b[:, 2] - b[:, 0], 1e-9))
    ratios = [round(float(math.exp(c)), 4) for c in _kmeans_1d(log_aspect, min(k, len(boxes)))]
    while len(ratios) < k:  # fewer boxes than ratios: keep the count the head was asked for
        ratios.append(ratios[-1] * 2)
    make = lambda s, rs: AnchorConfig(anchor_scale=s, scales=octave_scales(n), aspect_ratios=tuple(rs))  # noqa: E731
    grid = [1.0 + 0.25 * i for i in range(29)]
    best_s = max(grid, key=lambda s: score(make(s, ratios)))
    current = (best_s, list(ratios))
    best = score(make(*current))
    for _ in range(5):
        improved = False
        trials = [(current[0], current[1][:j] + [round(current[1][j] * f, 4)] + current[1][j + 1:])
                  for j in range(k) for f in (0.8, 0.9, 1.1, 1.25)]
        trials += [(current[0] + d, current[1]) for d in (-0.25, 0.25) if current[0] + d > 0]
        for trial in trials:
            s = score(make(*trial))
            if s > best:
                best, current, improved = s, trial, True
        if not improved:
            break
    return make(current[0], current[1])
