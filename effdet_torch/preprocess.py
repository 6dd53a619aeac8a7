"""Official inference pre-processing (``dataloader.py`` InputProcessor, ``infer`` mode).

normalise FIRST (float32 ``(x - mean_rgb) / stddev_rgb``), then ``scale = min(H/h, W/w)`` in
float32, resize the normalised image bilinearly (half-pixel centres, no antialias) to
``int(h·scale) × int(w·scale)`` (truncation), zero-pad bottom/right to ``H × W``;
``image_scale = 1 / scale`` maps network-input pixels back to the original image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import resize_bilinear_half_pixel

__all__ = ["preprocess_image", "scale_and_size"]


def scale_and_size(hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[np.float32, tuple[int, int]]:
    """``(scale, (scaled_h, scaled_w))`` computed in float32 as TF does."""
    h, w = np.float32(hw[0]), np.float32(hw[1])
    scale = min(np.float32(out_hw[0]) / h, np.float32(out_hw[1]) / w)
    return np.float32(scale), (int(np.float32(h * scale)), int(np.float32(w * scale)))


def preprocess_image(image: np.ndarray | Tensor, image_size: tuple[int, int], mean_rgb, stddev_rgb,
                     device: torch.device | str | None = None) -> tuple[Tensor, np.float32]:
    """``[h, w, 3]`` uint8 RGB → (``[1, 3, H, W]`` float32 network input in channels_last memory,
    ``image_scale``)."""
    if not isinstance(image, Tensor):
        image = np.asarray(image)
        if not image.flags.writeable:  # e.g. numpy views of PIL images; torch wants writable memory
            image = image.copy()
    img = torch.as_tensor(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {tuple(img.shape)}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image of shape {tuple(img.shape)}")
    img = img.to(device=device, dtype=torch.float32)
    mean = torch.tensor(mean_rgb, dtype=torch.float32, device=img.device)
    std = torch.tensor(stddev_rgb, dtype=torch.float32, device=img.device)
    x = (img - mean) / std  # [h, w, 3]
    scale, (sh, sw) = scale_and_size((img.shape[0], img.shape[1]), image_size)
    # resized and padded in the image's own HWC layout (half the time of NCHW index_selects on a
    # transposed view, same numbers); the result is channels_last, the network's layout
    x = resize_bilinear_half_pixel(x, (sh, sw), dims=(0, 1))
    x = F.pad(x, (0, 0, 0, image_size[1] - sw, 0, image_size[0] - sh))
    return x.permute(2, 0, 1)[None], np.float32(1.0) / scale
