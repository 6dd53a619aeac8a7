"""Anchor target assignment (official ``anchors.AnchorLabeler.label_anchors``).

Facts reproduced (official ``tf2/anchors.py`` + ``object_detection`` matcher/coder):
- similarity: IoU of every (gt, anchor) pair in float32, ``union = (area_gt + area_anchor) - inter``,
  IoU 0 where the intersection is 0;
- ArgMaxMatcher(matched 0.5, unmatched 0.5): each anchor takes its best gt (first gt on ties) when
  IoU ≥ 0.5, else it is unmatched — no ignore band (``-2`` never occurs);
- force match: every gt also takes its best anchor (first anchor on ties); when two gts pick the same
  anchor the lower gt index wins; force matches overrule the threshold match;
- FasterRcnnBoxCoder with unit scale factors: centres ``min + size / 2``, ``1e-8`` added to every
  size, ``(ty, tx, th, tw) = ((yc - yca)/ha, (xc - xca)/wa, log(h/ha), log(w/wa))``; 0 for unmatched;
- ``cls_targets = class - 1`` for matched anchors, ``-1`` for every other anchor;
- ``num_positives`` = matched anchors (incl. force matches).

Layout: ours is flat over anchors in the official anchor order (level → row-major (y, x) → anchor),
``cls [N]``, ``box [N, 4]``, the order of :func:`effdet_torch.anchors.generate_anchors` and of the
flattened head outputs (:func:`flatten_head_outputs`). The official per-level NHWC tensors are
``cls.reshape(H_l, W_l, A)`` and ``box.reshape(H_l, W_l, A * 4)`` of each level's slice
(:func:`to_official_levels`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnchorTargets", "assign_targets", "batch_targets", "box_iou_tf", "encode_boxes",
           "flatten_head_outputs", "level_slices", "to_official_levels"]

MATCH_THRESHOLD = 0.5  # official AnchorLabeler: match_threshold = unmatched_threshold = 0.5
_CODER_EPS = 1e-8  # official faster_rcnn_box_coder EPSILON, added to every height/width


@dataclass
class AnchorTargets:
    """Targets of one image (flat anchor order) or a batch (leading ``B``)."""

    cls: Tensor  # [(B,) N] int64: class - 1, or -1
    box: Tensor  # [(B,) N, 4] (ty, tx, th, tw), 0 where unmatched
    matches: Tensor  # [(B,) N] int64: matched gt row, -1 unmatched
    num_positives: Tensor  # [(B,)] float32


def box_iou_tf(gt: Tensor, anchors: Tensor) -> Tensor:
    """``[G, 4] × [N, 4] → [G, N]`` IoU, float ops in the official order (``IouSimilarity``)."""
    gy0, gx0, gy1, gx1 = gt.unbind(-1)
    ay0, ax0, ay1, ax1 = anchors.unbind(-1)
    ih = (torch.minimum(gy1[:, None], ay1[None]) - torch.maximum(gy0[:, None], ay0[None])).clamp(min=0)
    iw = (torch.minimum(gx1[:, None], ax1[None]) - torch.maximum(gx0[:, None], ax0[None])).clamp(min=0)
    inter = ih * iw
    union = (((gy1 - gy0) * (gx1 - gx0))[:, None] + ((ay1 - ay0) * (ax1 - ax0))[None]) - inter
    return torch.where(inter == 0, torch.zeros_like(inter), inter / union)


def _centers(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y0, x0, y1, x1 = boxes.unbind(-1)
    h, w = y1 - y0, x1 - x0
    return y0 + h / 2.0, x0 + w / 2.0, h, w


def encode_boxes(boxes: Tensor, anchors: Tensor) -> Tensor:
    """FasterRcnnBoxCoder (unit scales): ``[N, 4]`` boxes against ``[N, 4]`` anchors → ``[N, 4]`` codes."""
    yc, xc, h, w = _centers(boxes)
    yca, xca, ha, wa = _centers(anchors)
    ha, wa, h, w = ha + _CODER_EPS, wa + _CODER_EPS, h + _CODER_EPS, w + _CODER_EPS
    return torch.stack([(yc - yca) / ha, (xc - xca) / wa, torch.log(h / ha), torch.log(w / wa)], dim=-1)


def assign_targets(boxes: Tensor, classes: Tensor, anchors: Tensor) -> AnchorTargets:
    """Targets of one image. ``boxes [G, 4]`` (ymin, xmin, ymax, xmax) network-input pixels,
    ``classes [G]`` 1-based (only real rows: drop padding first), ``anchors [N, 4]``."""
    n = anchors.shape[0]
    dev = anchors.device
    if boxes.shape[0] == 0:
        matches = torch.full((n,), -1, dtype=torch.long, device=dev)
    else:
        iou = box_iou_tf(boxes.to(anchors.dtype), anchors)  # [G, N]
        best_val, matches = iou.max(dim=0)  # first gt on ties
        matches = torch.where(best_val >= MATCH_THRESHOLD, matches, torch.full_like(matches, -1))
        best_anchor = iou.argmax(dim=1)  # [G], first anchor on ties
        g = boxes.shape[0]
        forced = torch.full((n,), g, dtype=torch.long, device=dev)
        # lower gt index wins when several gts pick the same anchor
        forced.scatter_reduce_(0, best_anchor, torch.arange(g, device=dev), reduce="amin")
        matches = torch.where(forced < g, forced, matches)
    pos = matches >= 0
    idx = matches.clamp(min=0)
    if boxes.shape[0] == 0:
        cls = torch.full((n,), -1, dtype=torch.long, device=dev)
        box = torch.zeros((n, 4), dtype=anchors.dtype, device=dev)
    else:
        cls = torch.where(pos, classes.to(torch.long)[idx] - 1, torch.full_like(matches, -1))
        codes = encode_boxes(boxes.to(anchors.dtype)[idx], anchors)
        box = torch.where(pos[:, None], codes, torch.zeros_like(codes))
    return AnchorTargets(cls, box, matches, pos.sum().to(torch.float32))


def batch_targets(boxes: Tensor, classes: Tensor, anchors: Tensor) -> AnchorTargets:
    """Targets of a padded batch: ``boxes [B, M, 4]``, ``classes [B, M]`` with padding rows of
    class ``-1`` (``dataloader.pad_to_fixed_size``) → stacked :class:`AnchorTargets`."""
    per = []
    for b in range(boxes.shape[0]):
        keep = classes[b] > 0
        per.append(assign_targets(boxes[b][keep], classes[b][keep], anchors))
    return AnchorTargets(*(torch.stack([getattr(t, f) for t in per]) for f in ("cls", "box", "matches",
                                                                                 "num_positives")))


def level_slices(level_sizes: list[tuple[int, int]], num_anchors: int) -> list[slice]:
    """The flat-anchor slice of each level."""
    out, start = [], 0
    for h, w in level_sizes:
        out.append(slice(start, start + h * w * num_anchors))
        start += h * w * num_anchors
    return out


def to_official_levels(flat: Tensor, level_sizes: list[tuple[int, int]], num_anchors: int) -> list[Tensor]:
    """``[B, N(, k)]`` flat targets → per level ``[B, H_l, W_l, A·k]`` (the official NHWC keys)."""
    b = flat.shape[0]
    return [flat[:, s].reshape(b, h, w, -1) for s, (h, w) in zip(level_slices(level_sizes, num_anchors), level_sizes)]


def flatten_head_outputs(outputs: list[Tensor], per_anchor: int) -> Tensor:
    """Head outputs ``[B, A·k, H_l, W_l]`` per level → ``[B, N, k]`` in the flat anchor order."""
    b = outputs[0].shape[0]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1, per_anchor) for o in outputs], dim=1)
