"""Small test-data generators shared by several test modules (plain numpy, no fixtures)."""
from __future__ import annotations

import numpy as np


def clustered_boxes(rng: np.random.Generator, n: int, *, swap_x: float = 0.0, dup: float = 0.05,
                    nonfinite: float = 0.0) -> np.ndarray:
    """``[n, 4]`` float32 boxes ``(y1, x1, y2, x2)`` around 1-5 centres in ``[0, 100]²``: the cases
    NMS must get right.

    Half sizes are uniform in ``[1, 15]``; 15 % of the boxes have both corners swapped, ``swap_x``
    of them only the x corners, 5 % zero height, 5 % zero width, ``dup`` are exact duplicates of
    another box (IoU exactly 1), and ``nonfinite`` get an ``inf``, ``nan`` or ``3e38`` y2 (decoded
    codes whose exp overflowed). A rate of 0 draws nothing, so the remaining draws (and the boxes)
    stay those of a generator without that feature.
    """
    centres = rng.uniform(0, 100, (int(rng.integers(1, 6)), 2))
    which = rng.integers(0, len(centres), n)
    cy = centres[which, 0] + rng.normal(0, 4, n)
    cx = centres[which, 1] + rng.normal(0, 4, n)
    hh, hw = rng.uniform(1, 15, n), rng.uniform(1, 15, n)
    boxes = np.stack([cy - hh, cx - hw, cy + hh, cx + hw], axis=1)
    if n:
        swap = rng.random(n) < 0.15
        boxes[swap] = boxes[swap][:, [2, 3, 0, 1]]
        if swap_x:
            sx = rng.random(n) < swap_x
            boxes[sx] = boxes[sx][:, [0, 3, 2, 1]]
        zero_h = rng.random(n) < 0.05
        boxes[zero_h, 2] = boxes[zero_h, 0]
        zero_w = rng.random(n) < 0.05
        boxes[zero_w, 3] = boxes[zero_w, 1]
        d = rng.random(n) < dup
        boxes[d] = boxes[rng.integers(0, n, int(d.sum()))]
        if nonfinite:
            bad = rng.random(n) < nonfinite
            boxes[bad, 2] = rng.choice([np.inf, np.nan, 3e38], int(bad.sum()))
    return boxes.astype(np.float32)
