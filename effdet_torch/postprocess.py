"""Official post-processing: the inference path (global soft-NMS) and the COCO-eval path.

Facts (official ``tf2/postprocess.py``, measured in ``golden/README.md``):
- inference (``postprocess_global``): per anchor the max class logit and its argmax, boxes decoded
  for every anchor, ``sigmoid``; ONE class-agnostic NMSV5 (Gaussian, ``soft_nms_sigma = sigma/2``,
  ``iou 0.5``, ``score > 0.001``, 100 rows, padded with index 0 and score 0); boxes clipped to the
  padded network input per axis, then × ``image_scale``; classes ``argmax + 1``.
- COCO eval (``generate_detections`` with ``per_class_nms``): the top 5000 (anchor, class) logits;
  per class the same NMSV5, unpadded; concatenated in class order, top 100 by score; boxes ×
  ``image_scale`` and NOT clipped; padding rows are zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .anchors import decode_boxes
from .config import EfficientDetConfig
from .nms import non_max_suppression_v5

__all__ = ["Detections", "flatten_outputs", "postprocess_global", "postprocess_per_class", "pre_nms_global",
           "reduce_candidates"]


@dataclass
class Detections:
    """Fixed-size detections of a batch: ``boxes [B, K, 4]`` (ymin, xmin, ymax, xmax),
    ``scores [B, K]``, ``classes [B, K]`` (1-based, float32 as the official output) and
    ``valid_len [B]`` (rows past it are padding)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    valid_len: Tensor

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        """The valid rows of image ``b`` as numpy arrays."""
        n = int(self.valid_len[b])
        return {
            "boxes": self.boxes[b, :n].cpu().numpy(),
            "scores": self.scores[b, :n].cpu().numpy(),
            "classes": self.classes[b, :n].cpu().numpy().astype(np.int64),
        }


def flatten_outputs(class_outputs: list[Tensor], box_outputs: list[Tensor],
                    num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-level NCHW head outputs → ``[B, N, num_classes]`` logits and ``[B, N, 4]`` codes.

    Anchor order: level → row-major location → anchor, as the official NHWC reshape.
    """
    b = class_outputs[0].shape[0]
    cls = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, num_classes) for c in class_outputs], 1)
    box = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, 4) for x in box_outputs], 1)
    return cls, box


def pre_nms_global(cls: Tensor, box: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inference ``pre_nms`` (``max_nms_inputs = 0``): boxes ``[B, N, 4]``, scores ``[B, N]``
    (sigmoid of the max logit), 0-based classes ``[B, N]`` (argmax, first on ties)."""
    logits = cls.amax(dim=-1)
    classes = cls.argmax(dim=-1)
    return decode_boxes(box, anchors), torch.sigmoid(logits), classes


def _nms(cfg: EfficientDetConfig, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return non_max_suppression_v5(
        boxes, scores, cfg.max_detections, iou_threshold=cfg.nms_iou_threshold,
        score_threshold=cfg.nms_score_threshold, soft_nms_sigma=cfg.nms_sigma / 2,
    )


def _as_scales(image_scale: Tensor | float | None, batch: int) -> np.ndarray | None:
    if image_scale is None:
        return None
    s = torch.as_tensor(image_scale, dtype=torch.float32).reshape(-1).cpu().numpy()
    return np.broadcast_to(s, (batch,)).astype(np.float32)


def postprocess_global(cfg: EfficientDetConfig, cls: Tensor, box: Tensor, anchors: Tensor,
                       image_size: tuple[int, int], image_scale: Tensor | float | None = None) -> Detections:
    """The official inference path. ``cls [B, N, C]`` logits, ``box [B, N, 4]`` codes."""
    boxes_t, scores_t, classes_t = pre_nms_global(cls, box, anchors)
    boxes_np = boxes_t.detach().float().cpu().numpy()
    scores_np = scores_t.detach().float().cpu().numpy()
    classes_np = classes_t.cpu().numpy()
    b, k = cls.shape[0], cfg.max_detections
    out_boxes = np.zeros((b, k, 4), np.float32)
    out_scores = np.zeros((b, k), np.float32)
    out_classes = np.zeros((b, k), np.float32)
    valid = np.zeros((b,), np.int64)
    scales = _as_scales(image_scale, b)
    limit = np.array([image_size[0], image_size[1], image_size[0], image_size[1]], np.float32)
    for i in range(b):
        sel, sc = _nms(cfg, boxes_np[i], scores_np[i])
        idx = np.zeros((k,), np.int64)  # padded rows gather index 0, as the padded op returns
        idx[: len(sel)] = sel
        bx = np.clip(boxes_np[i][idx], 0, limit)
        if scales is not None:
            bx = bx * scales[i]
        out_boxes[i] = bx
        out_scores[i, : len(sc)] = sc
        out_classes[i] = classes_np[i][idx].astype(np.float32) + 1
        valid[i] = len(sel)
    dev = cls.device
    return Detections(torch.from_numpy(out_boxes).to(dev), torch.from_numpy(out_scores).to(dev),
                      torch.from_numpy(out_classes).to(dev), torch.from_numpy(valid).to(dev))


def _top_k_stable(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, sorted descending, ties by lower index (TF ``top_k``)."""
    k = min(k, values.shape[0])
    if k == 0:
        return np.zeros((0,), np.int64)
    kth = np.partition(values, values.shape[0] - k)[values.shape[0] - k]
    cand = np.nonzero(values >= kth)[0]
    order = np.argsort(-values[cand], kind="stable")
    return cand[order][:k]


def reduce_candidates(cls: Tensor, box: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One image's ``cls [N, C]`` logits and ``box [N, 4]`` codes → the rows of every anchor holding
    a pair ``>=`` the ``k``-th largest logit: ``(anchor_index [M], cls [M, C], box [M, 4])``.

    Exact for the top-``k`` selection (rows keep their order, so ties still go to the lower index);
    runs on ``cls``'s device, so only ``M ≪ N`` rows need to leave it.
    """
    n, c = cls.shape
    if n * c <= k:
        idx = torch.arange(n, device=cls.device)
    else:
        kth = torch.topk(cls.reshape(-1), k, sorted=False).values.min()
        idx = torch.nonzero((cls >= kth).any(dim=1)).reshape(-1)
    return idx, cls.index_select(0, idx), box.index_select(0, idx)


def postprocess_per_class(cfg: EfficientDetConfig, cls: Tensor, box: Tensor, anchors: Tensor,
                          image_scale: Tensor | float | None = None) -> Detections:
    """The official COCO-eval path (per-class soft-NMS over the top ``eval_max_nms_inputs`` pairs)."""
    b, n, c = cls.shape
    k = cfg.max_detections
    out_boxes = np.zeros((b, k, 4), np.float32)
    out_scores = np.zeros((b, k), np.float32)
    out_classes = np.zeros((b, k), np.float32)
    valid = np.zeros((b,), np.int64)
    scales = _as_scales(image_scale, b)
    for i in range(b):
        rows, cls_i, box_i = reduce_candidates(cls[i].detach(), box[i].detach(), cfg.eval_max_nms_inputs)
        cls_np = cls_i.float().cpu().numpy().reshape(-1)
        top = _top_k_stable(cls_np, cfg.eval_max_nms_inputs)
        anchor_idx, class_idx = top // c, top % c
        pick = torch.from_numpy(anchor_idx).to(box_i.device)
        dec = decode_boxes(box_i.float()[pick], anchors[rows.to(anchors.device)][pick.to(anchors.device)])
        dec = dec.detach().float().cpu().numpy()
        scores = torch.sigmoid(torch.from_numpy(cls_np[top])).numpy()
        all_boxes, all_scores, all_classes = [], [], []
        for cid in range(c):
            m = np.nonzero(class_idx == cid)[0]
            if len(m) == 0:
                continue
            sel, sc = _nms(cfg, dec[m], scores[m])
            all_boxes.append(dec[m][sel])
            all_scores.append(sc)
            all_classes.append(np.full((len(sel),), cid + 1, np.float32))
        if all_scores:
            cat_boxes = np.concatenate(all_boxes)
            cat_scores = np.concatenate(all_scores)
            cat_classes = np.concatenate(all_classes)
        else:
            cat_boxes, cat_scores, cat_classes = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
        order = _top_k_stable(cat_scores, k)
        m = len(order)
        bx = cat_boxes[order]
        if scales is not None:
            bx = bx * scales[i]
        out_boxes[i, :m] = bx
        out_scores[i, :m] = cat_scores[order]
        out_classes[i, :m] = cat_classes[order]
        valid[i] = min(k, len(cat_scores))
    dev = cls.device
    return Detections(torch.from_numpy(out_boxes).to(dev), torch.from_numpy(out_scores).to(dev),
                      torch.from_numpy(out_classes).to(dev), torch.from_numpy(valid).to(dev))
