"""``--debug`` pictures: an image with its ground truth (green) and the model's detections (red,
with class and score), written during training so one can see what the detector is learning."""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from effdet_torch.files import atomic_write_bytes

__all__ = ["draw_debug_picture"]


def draw_debug_picture(image_rgb: np.ndarray, gt: Sequence[tuple[Sequence[float], str]], rows: np.ndarray,
                       class_names: Sequence[str], path: str | os.PathLike, max_detections: int = 10) -> None:
    """``gt``: ``(bbox [x, y, w, h], name)``; ``rows``: eval rows ``[N, 7]`` ``[id, x, y, w, h, score,
    class]`` (1-based class, original pixels), best first — the top ``max_detections`` are drawn."""
    scale = max(1, 256 // max(1, max(image_rgb.shape[:2])))  # small images are enlarged to be readable
    im = Image.fromarray(image_rgb).convert("RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    for (x, y, w, h), name in gt:
        d.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(0, 255, 0), width=2)
        d.text((x * scale + 2, y * scale + 1), str(name), fill=(0, 255, 0))
    rows = np.asarray(rows, np.float32).reshape(-1, 7)
    for r in rows[np.argsort(-rows[:, 5], kind="stable")][:max_detections]:
        x, y, w, h = (float(v) * scale for v in r[1:5])
        c = int(r[6])
        name = class_names[c - 1] if 1 <= c <= len(class_names) else str(c)
        d.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=1)
        d.text((x + 2, y + h - 11), f"{name} {float(r[5]):.2f}", fill=(255, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
