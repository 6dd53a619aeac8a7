"""``tf.raw_ops.NonMaxSuppressionV5`` semantics, soft (Gaussian) and hard, in float32.

The official post-processing calls NMSV5 with ``soft_nms_sigma = sigma / 2``; its result depends on
details a generic soft-NMS does not share, so this module reproduces the op's contract exactly:
- candidates are the boxes with ``score > score_threshold``, visited best first (ties: lower index);
- a visited candidate is compared with the boxes selected since it was last compared, newest first,
  and its score is multiplied by ``exp(-0.5 / sigma · iou²)`` for each; in soft mode there is NO hard
  cut at ``iou_threshold``; in hard mode (sigma 0) ``iou > iou_threshold`` removes it;
- comparison stops as soon as the score drops to ``<= score_threshold`` (the candidate is dropped);
- an unchanged score means the candidate is selected; a lowered one goes back into the queue;
- IoU uses the min/max of each box's corners and is 0 when either area is ``<= 0``;
- the arithmetic runs in TF's CPU float environment, denormals flushed to zero
  (:mod:`effdet_torch.float_env`): a score decayed below ``FLT_MIN`` is 0, so with a score threshold
  of 0 it is dropped, and a given one reads as 0 (not a candidate). Tested against TF for thresholds
  ``>= 0``; with any threshold ``>= FLT_MIN`` (the official 0.001) flushing changes nothing. Left
  alone: *given* scores below ``FLT_MIN`` with a negative threshold, which TF's kernel returns raw or
  as 0 depending on whether its loop happened to multiply them (by a decay, or by 1.0 in hard mode).
"""
from __future__ import annotations

import ctypes
import heapq

import numpy as np

from .float_env import flush_denormals

__all__ = ["expf", "iou_one_to_many", "non_max_suppression_v5"]


def _load_expf():
    """The C library's scalar ``expf``: the function TF's NMS kernel calls for the soft-NMS decay.

    numpy's vectorised float32 ``exp`` differs from it in ~40 % of inputs by an ulp, and even
    ``exp`` in float64 rounded to float32 differs in ~0.05 % (glibc's ``expf`` is not correctly
    rounded) — enough to flip which of two tied boxes is selected. Where no C library is found,
    the float64 fallback is used.
    """
    fn = None
    for lib in ("libm.so.6", None):  # glibc's libm; else the symbols already loaded (libSystem on macOS)
        try:
            fn = ctypes.CDLL(lib).expf
            break
        except (OSError, AttributeError):
            continue
    if fn is None:
        return lambda a: np.exp(np.asarray(a, np.float64)).astype(np.float32)
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_float]
    vec = np.frompyfunc(fn, 1, 1)
    return lambda a: vec(np.asarray(a, np.float32)).astype(np.float32)


#: float32 ``exp`` bit-identical to the C library's ``expf`` (vectorised over numpy arrays).
expf = _load_expf()


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[4]`` box with ``[M, 4]`` boxes, float32, NMSV5 conventions.

    Non-finite boxes (decoded codes whose exp overflowed) give NaN/0 as in the kernel, silently.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _iou_one_to_many(box, boxes)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    y1 = np.minimum(box[0], box[2]); x1 = np.minimum(box[1], box[3])
    y2 = np.maximum(box[0], box[2]); x2 = np.maximum(box[1], box[3])
    ys1 = np.minimum(boxes[:, 0], boxes[:, 2]); xs1 = np.minimum(boxes[:, 1], boxes[:, 3])
    ys2 = np.maximum(boxes[:, 0], boxes[:, 2]); xs2 = np.maximum(boxes[:, 1], boxes[:, 3])
    area = (y2 - y1) * (x2 - x1)
    areas = (ys2 - ys1) * (xs2 - xs1)
    ih = np.maximum(np.minimum(y2, ys2) - np.maximum(y1, ys1), np.float32(0))
    iw = np.maximum(np.minimum(x2, xs2) - np.maximum(x1, xs1), np.float32(0))
    inter = ih * iw
    iou = inter / (area + areas - inter)
    return np.where((area <= 0) | (areas <= 0), np.float32(0), iou).astype(np.float32)


def non_max_suppression_v5(boxes: np.ndarray, scores: np.ndarray, max_output_size: int,
                           iou_threshold: float = 0.5, score_threshold: float = float("-inf"),
                           soft_nms_sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Selected indices ``[K]`` (int64) and their (decayed) scores ``[K]`` (float32), ``K <= max``.

    ``boxes [N, 4]``, ``scores [N]``; padding to ``max_output_size`` is the caller's business.
    """
    with flush_denormals():
        return _nms_v5(boxes, scores, max_output_size, iou_threshold, score_threshold, soft_nms_sigma)


def _nms_v5(boxes: np.ndarray, scores: np.ndarray, max_output_size: int, iou_threshold: float,
            score_threshold: float, soft_nms_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.ascontiguousarray(boxes, dtype=np.float32)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if iou_threshold < 0 or iou_threshold > 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    soft = soft_nms_sigma > 0.0
    scale = np.float32(-0.5) / np.float32(soft_nms_sigma) if soft else np.float32(0)
    thr = np.float32(score_threshold)
    iou_thr = np.float32(iou_threshold)
    # Heap of (-score, index, suppress_begin): best score first, ties by lower index (TF's queue order).
    idx = np.nonzero(scores > thr)[0]
    heap = [(-float(scores[i]), int(i), 0) for i in idx]
    heapq.heapify(heap)
    selected: list[int] = []
    selected_scores: list[np.float32] = []
    sel_boxes = np.empty((max(max_output_size, 0), 4), dtype=np.float32)
    while len(selected) < max_output_size and heap:
        neg, i, begin = heapq.heappop(heap)
        original = np.float32(-neg)
        score = original
        n = len(selected)
        if n > begin:
            ious = iou_one_to_many(boxes[i], sel_boxes[begin:n])[::-1]  # newest selection first
            if soft:
                weights = expf((scale * ious) * ious)  # float32 products, as the kernel
                running = np.multiply.accumulate(np.concatenate([[original], weights]).astype(np.float32))[1:]
                below = np.nonzero(running <= thr)[0]
                score = running[below[0]] if len(below) else running[-1]
            else:
                if np.any(ious > iou_thr):
                    continue  # hard suppression
        if score == original:
            sel_boxes[n] = boxes[i]
            selected.append(i)
            selected_scores.append(score)
        elif score > thr:
            heapq.heappush(heap, (-float(score), i, n))
    return np.asarray(selected, dtype=np.int64), np.asarray(selected_scores, dtype=np.float32)
