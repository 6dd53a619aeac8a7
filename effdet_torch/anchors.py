"""Anchor boxes and box decoding (official ``tf2/anchors.py``)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .config import EfficientDetConfig

__all__ = ["decode_boxes", "generate_anchors"]


def generate_anchors(cfg: EfficientDetConfig, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """All anchors of ``cfg.anchors`` (:class:`~effdet_torch.config.AnchorConfig`), ``[N, 4]`` float32
    ``(ymin, xmin, ymax, xmax)`` in network-input pixels.

    Order: level → location (row-major y, x) → anchor shape (scale-major, aspect-minor). Per level
    the stride is ``image / feature`` (float, separately for y and x); per (scale k, aspect factors
    (ax, ay)): ``base = anchor_scale_l · stride · k``, half sizes ``base·ax/2`` (x) and ``base·ay/2``
    (y); centres ``arange(stride / 2, image, stride)``. Computed in float64 in the official order of
    operations and cast once to float32, as the official numpy code does.
    """
    h, w = image_size or cfg.image_size
    sizes = cfg.feature_sizes((h, w))
    a = cfg.anchors
    # One row per anchor shape (scale-major, aspect-minor): the scale and the (x, y) aspect factors.
    factors = np.asarray(a.axis_factors(), dtype=np.float64)  # [R, (ax, ay)]
    scale = np.repeat(np.asarray(a.scales, dtype=np.float64), len(factors))  # [A]
    ax, ay = np.tile(factors[:, 0], a.num_scales), np.tile(factors[:, 1], a.num_scales)
    per_level = []
    for lvl, anchor_scale in zip(cfg.levels, a.level_scales(len(cfg.levels))):
        fh, fw = sizes[lvl]
        stride = np.array([sizes[0][0] / float(fh), sizes[0][1] / float(fw)])  # (y, x)
        yc = np.arange(stride[0] / 2, h, stride[0])
        xc = np.arange(stride[1] / 2, w, stride[1])
        if (len(yc), len(xc)) != (fh, fw):
            raise ValueError(f"anchor grid {len(yc)}x{len(xc)} != feature map {fh}x{fw} "
                             f"at level {lvl} for an image of {h}x{w}")
        base = anchor_scale * stride[None, :] * scale[:, None]  # [A, (y, x)]
        half_y = base[:, 0] * ay / 2.0  # [A]
        half_x = base[:, 1] * ax / 2.0
        cy = np.repeat(yc, fw)[:, None]  # [fh*fw, 1], row-major locations
        cx = np.tile(xc, fh)[:, None]
        grid = np.stack([cy - half_y, cx - half_x, cy + half_y, cx + half_x], axis=-1)  # [fh*fw, A, 4]
        per_level.append(grid.reshape(-1, 4))
    return np.concatenate(per_level, axis=0).astype(np.float32)


def decode_boxes(codes: Tensor, anchors: Tensor) -> Tensor:
    """Official ``decode_box_outputs``: ``[..., 4] (ty, tx, th, tw)`` → ``(ymin, xmin, ymax, xmax)``.

    ``yc = ty·ha + yca``, ``h = exp(th)·ha`` (no variances, no clamp of exp), float32.
    """
    yca = (anchors[..., 0] + anchors[..., 2]) / 2
    xca = (anchors[..., 1] + anchors[..., 3]) / 2
    ha = anchors[..., 2] - anchors[..., 0]
    wa = anchors[..., 3] - anchors[..., 1]
    ty, tx, th, tw = codes.unbind(-1)
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    yc = ty * ha + yca
    xc = tx * wa + xca
    return torch.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0], dim=-1)
