"""The official training input pipeline (``dataloader.InputReader.dataset_parser``, is_training):
skip crowd boxes → normalise → random horizontal flip → random scale jitter with a random crop
offset → bilinear resize (half-pixel, no antialias), crop, zero-pad bottom/right; boxes scaled,
offset, clipped to ``[0, size - 1]``, zero-area boxes dropped.

Facts reproduced, all in float32 as the official graph computes them:
- crowd boxes are dropped first (``skip_crowd_during_training``); ``is_crowds``/``areas`` are
  returned unfiltered (decoder order and count);
- flip (``u_flip > 0.5``) mirrors the image and the NORMALISED boxes: ``xmin' = 1 - xmax``;
- ``s = jitter_min + u·(jitter_max - jitter_min)`` (0.1–2.0); ``scaled = int(s · out)`` per axis;
  ``image_scale = min(scaled_y / h, scaled_x / w)``; the image is resized to
  ``int(h · image_scale) × int(w · image_scale)``; crop offset per axis
  ``int(max(0, scaled - out) · u)`` (y drawn before x);
- boxes: ``y · scaled_h``, ``x · scaled_w`` (normalised → resized pixels), minus the crop offset,
  clipped, rows with ``(ymax - ymin)·(xmax - xmin) == 0`` dropped;
- returned ``image_scale = 1 / image_scale``; the returned ``boxes`` are the labeler's boxes times it
  (crop offset NOT added back), padded with -1 to ``max_instances`` rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effdet_torch.ops import resize_bilinear_half_pixel

__all__ = ["AugmentDraws", "TrainSample", "train_transform"]


@dataclass(frozen=True)
class AugmentDraws:
    """The four uniform draws of one sample, in the official order."""

    flip_u: float  # flip if > 0.5
    scale: float  # the scale factor itself, in [jitter_min, jitter_max]
    offset_y_u: float
    offset_x_u: float

    @classmethod
    def sample(cls, generator: torch.Generator, jitter: tuple[float, float] = (0.1, 2.0)) -> "AugmentDraws":
        """Fresh draws; ``scale = jitter_min + u · (jitter_max - jitter_min)`` in float32."""
        u = torch.rand(4, generator=generator, dtype=torch.float32).numpy()
        lo, hi = np.float32(jitter[0]), np.float32(jitter[1])
        return cls(float(u[0]), float(lo + u[1] * (hi - lo)), float(u[2]), float(u[3]))


@dataclass
class TrainSample:
    image: Tensor  # [3, H, W] float, normalised
    boxes: Tensor  # [K, 4] output pixels (ymin, xmin, ymax, xmax) — what the labeler gets
    classes: Tensor  # [K] 1-based
    image_scale: float  # output → original pixels (the official returned ``image_scale``)
    image_scale_to_scaled: float
    scaled_hw: tuple[int, int]
    crop_offset_yx: tuple[int, int]
    flipped: bool


def _f32(v) -> np.float32:
    return np.float32(v)


def train_transform(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, is_crowd: np.ndarray | None,
                    out_hw: tuple[int, int], mean_rgb, stddev_rgb, draws: AugmentDraws,
                    hflip: bool = True, skip_crowd: bool = True,
                    dtype: torch.dtype = torch.float32) -> TrainSample:
    """One training sample. ``image [h, w, 3]`` uint8 RGB; ``boxes [G, 4]`` NORMALISED
    (ymin, xmin, ymax, xmax) as COCO tfrecords store them; ``classes [G]`` 1-based."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.float32).reshape(-1)
    if skip_crowd and is_crowd is not None:
        keep = np.asarray(is_crowd).reshape(-1) == 0
        boxes, classes = boxes[keep], classes[keep]
    img = torch.as_tensor(np.ascontiguousarray(image)).to(torch.float32)
    x = ((img - torch.tensor(mean_rgb, dtype=torch.float32)) / torch.tensor(stddev_rgb, dtype=torch.float32))
    x = x.to(dtype).permute(2, 0, 1)[None]  # [1, 3, h, w]
    flipped = bool(hflip and _f32(draws.flip_u) > 0.5)
    if flipped:
        x = x.flip(-1)
        boxes = np.stack([boxes[:, 0], _f32(1.0) - boxes[:, 3], boxes[:, 2], _f32(1.0) - boxes[:, 1]], axis=1)
    h, w = _f32(image.shape[0]), _f32(image.shape[1])
    s = _f32(draws.scale)
    scaled_y, scaled_x = int(s * _f32(out_hw[0])), int(s * _f32(out_hw[1]))
    image_scale = min(_f32(scaled_y) / h, _f32(scaled_x) / w)
    sh, sw = int(h * image_scale), int(w * image_scale)
    oy = int(max(_f32(0.0), _f32(sh - out_hw[0])) * _f32(draws.offset_y_u))
    ox = int(max(_f32(0.0), _f32(sw - out_hw[1])) * _f32(draws.offset_x_u))
    x = resize_bilinear_half_pixel(x, (sh, sw))[..., oy:oy + out_hw[0], ox:ox + out_hw[1]]
    x = F.pad(x, (0, out_hw[1] - x.shape[-1], 0, out_hw[0] - x.shape[-2]))[0]
    b = np.stack([boxes[:, 0] * _f32(sh), boxes[:, 1] * _f32(sw), boxes[:, 2] * _f32(sh), boxes[:, 3] * _f32(sw)], 1)
    b = b - np.array([oy, ox, oy, ox], np.float32)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, out_hw[0] - 1)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, out_hw[1] - 1)
    keep = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) != 0
    return TrainSample(x, torch.from_numpy(b[keep].astype(np.float32)), torch.from_numpy(classes[keep]),
                       float(_f32(1.0) / image_scale), float(image_scale), (sh, sw), (oy, ox), flipped)
