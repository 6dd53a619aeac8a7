"""Side-by-side pictures of the official detections and ours (drawn with Pillow).

Layout (one PNG): three panels over the image — *official*, *ours*, *overlay* (matched pairs thin
green, near pairs orange, unmatched boxes thick red = official only / magenta = ours only) — and
below them a table of the pairs: class (COCO name), official and our score, Δscore, IoU and status.

Pairs: first the parity matching of :func:`parity.golden.match_detections` (same class,
``|Δscore| <= 1e-5``, IoU ≥ 0.9999 or coordinates within the box tolerance) → ``match``; then, among
the rest, the same class with IoU ≥ 0.5 → ``near`` (the same object, but out of tolerance);
everything else is unmatched. The PNG carries the layout (panels, table, counts) as JSON in its
``effdet-parity`` text chunk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from effdet_torch.coco_names import coco_class_name as class_name

from .rules import REL_TOL
from .verdicts import box_iou, match_detections

__all__ = ["Pairing", "layout_size", "pair_detections", "render_comparison"]

MARGIN = 10
TITLE_H = 26
ROW_H = 16
GREEN, BLUE, ORANGE, RED, MAGENTA = (0, 170, 60), (30, 100, 255), (245, 140, 0), (230, 20, 40), (220, 0, 220)


@dataclass
class Pairing:
    matched: list[tuple[int, int, float]]  # (official row, our row, IoU) within parity tolerance
    near: list[tuple[int, int, float]]  # same class, IoU >= 0.5, out of tolerance
    official_only: list[int]
    ours_only: list[int]


def _valid(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = int(d["valid_len"]) if "valid_len" in d else len(d["scores"])
    return {k: np.asarray(d[k], np.float64)[:n] for k in ("boxes", "scores", "classes")}


def pair_detections(official: Mapping[str, np.ndarray], ours: Mapping[str, np.ndarray]) -> Pairing:
    """Pair official and our detection rows (valid rows only); see the module docstring."""
    ref, mine = _valid(official), _valid(ours)
    box_tol = REL_TOL * (1 + float(np.abs(ref["boxes"]).max())) if len(ref["scores"]) else 0.0
    m = match_detections(ref, mine, box_tol)
    matched = [(int(i), int(j), float(iou)) for i, j, iou in m["pairs"]]
    used_r = {i for i, _, _ in matched}
    used_o = {j for _, j, _ in matched}
    near = []
    for i in np.argsort(-ref["scores"], kind="stable"):
        if i in used_r:
            continue
        best, best_iou = -1, 0.5
        for j in range(len(mine["scores"])):
            if j in used_o or mine["classes"][j] != ref["classes"][i]:
                continue
            iou = box_iou(ref["boxes"][i], mine["boxes"][j])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            near.append((int(i), int(best), float(best_iou)))
            used_r.add(int(i))
            used_o.add(best)
    return Pairing(matched, near, [i for i in range(len(ref["scores"])) if i not in used_r],
                   [j for j in range(len(mine["scores"])) if j not in used_o])


def _panel_scale(h: int, w: int) -> float:
    target = min(max(w, 320), 560)
    return target / w


def layout_size(image_hw: tuple[int, int], n_rows: int) -> tuple[int, int]:
    """``(width, height)`` of the PNG for an image of ``image_hw`` and ``n_rows`` table rows."""
    h, w = image_hw
    s = _panel_scale(h, w)
    pw, ph = round(w * s), round(h * s)
    width = 3 * pw + 4 * MARGIN
    table_y = MARGIN + TITLE_H + ph + MARGIN
    height = table_y + (n_rows + 3) * ROW_H + MARGIN
    return width, height


def load_font(size: int = 12):
    """Pillow's default font at ``size`` pixels (the fixed bitmap font on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _box(draw, box, scale, off, color, width, label=None, font=None):
    y0, x0, y1, x1 = (float(v) * scale for v in box)
    ox, oy = off
    rect = [ox + x0, oy + y0, ox + max(x1, x0 + 1), oy + max(y1, y0 + 1)]
    draw.rectangle(rect, outline=color, width=width)
    if label:
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ly = max(rect[1] - th - 3, oy)
        draw.rectangle([rect[0], ly, rect[0] + tw + 4, ly + th + 3], fill=color)
        draw.text((rect[0] + 2, ly), label, fill="white", font=font)


def render_comparison(image: np.ndarray, official: Mapping[str, np.ndarray], ours: Mapping[str, np.ndarray],
                      out_png: str | Path, title: str = "", top: int = 20, min_score: float = 0.0,
                      max_rows: int | None = None) -> dict:
    """Draw the comparison PNG; returns its layout (also stored in the PNG's ``effdet-parity`` chunk).

    ``image``: uint8 ``[h, w, 3]`` RGB in the detections' coordinates (original-image pixels);
    ``official``/``ours``: ``boxes`` (ymin, xmin, ymax, xmax), ``scores``, ``classes`` (1-based),
    optional ``valid_len``. Each panel draws the ``top`` highest-scoring rows with score ≥
    ``min_score``; the table lists the pairs and unmatched rows among them (``max_rows``, default ``top``).
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    img = np.asarray(image, np.uint8)
    h, w = img.shape[:2]
    ref, mine = _valid(official), _valid(ours)
    pairing = pair_detections(official, ours)
    shown_r = [int(i) for i in np.argsort(-ref["scores"], kind="stable")[:top] if ref["scores"][i] >= min_score]
    shown_o = [int(j) for j in np.argsort(-mine["scores"], kind="stable")[:top] if mine["scores"][j] >= min_score]
    status_r = {i: ("match", j, iou) for i, j, iou in pairing.matched}
    status_r.update({i: ("near", j, iou) for i, j, iou in pairing.near})
    partner_o = {j: i for i, j, _ in pairing.matched + pairing.near}

    rows = []  # (sort score, cells, color)
    for i in shown_r:
        st = status_r.get(i)
        name = class_name(ref["classes"][i])
        if st is None:
            rows.append((ref["scores"][i], [name, f"{ref['scores'][i]:.4f}", "—", "—", "—", "official only"], RED))
        else:
            kind, j, iou = st
            ds = mine["scores"][j] - ref["scores"][i]
            rows.append((ref["scores"][i], [name, f"{ref['scores'][i]:.4f}", f"{mine['scores'][j]:.4f}", f"{ds:+.1e}",
                                            f"{iou:.6f}", kind], GREEN if kind == "match" else ORANGE))
    for j in shown_o:
        if j not in partner_o:
            rows.append((mine["scores"][j], [class_name(mine["classes"][j]), "—", f"{mine['scores'][j]:.4f}", "—", "—",
                                             "ours only"], MAGENTA))
    rows.sort(key=lambda r: -r[0])
    max_rows = top if max_rows is None else max_rows
    more = max(len(rows) - max_rows, 0)
    rows = rows[:max_rows]
    n_rows = len(rows) + (1 if more else 0)

    s = _panel_scale(h, w)
    pw, ph = round(w * s), round(h * s)
    width, height = layout_size((h, w), n_rows)
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    font, small = load_font(13), load_font(11)
    base = Image.fromarray(img).resize((pw, ph), Image.BILINEAR) if (pw, ph) != (w, h) else Image.fromarray(img)
    # Each panel is drawn on its own copy of the image, so boxes past the image (the inference path
    # clips to the padded network input, not to the image) are cut at the panel's edge.
    tiles = {name: base.copy() for name in ("official", "ours", "overlay")}
    draws = {name: ImageDraw.Draw(t) for name, t in tiles.items()}
    o = (0, 0)
    for i in reversed(shown_r):
        _box(draws["official"], ref["boxes"][i], s, o, GREEN, 2,
             f"{class_name(ref['classes'][i])} {ref['scores'][i]:.2f}", small)
    for j in reversed(shown_o):
        _box(draws["ours"], mine["boxes"][j], s, o, BLUE, 2, f"{class_name(mine['classes'][j])} {mine['scores'][j]:.2f}",
             small)
    dv = draws["overlay"]
    for i in reversed(shown_r):  # overlay: official boxes by their pairing status
        st = status_r.get(i)
        if st is None:
            _box(dv, ref["boxes"][i], s, o, RED, 4, f"official only: {class_name(ref['classes'][i])}", small)
        elif st[0] == "near":
            _box(dv, ref["boxes"][i], s, o, ORANGE, 3, f"near: {class_name(ref['classes'][i])}", small)
            _box(dv, mine["boxes"][st[1]], s, o, ORANGE, 1)
        else:
            _box(dv, ref["boxes"][i], s, o, GREEN, 1)
    for j in reversed(shown_o):
        if j not in partner_o:
            _box(dv, mine["boxes"][j], s, o, MAGENTA, 4, f"ours only: {class_name(mine['classes'][j])}", small)
    panels = []
    for k, name in enumerate(("official", "ours", "overlay")):
        x0, y0 = MARGIN + k * (pw + MARGIN), MARGIN + TITLE_H
        canvas.paste(tiles[name], (x0, y0))
        panels.append({"name": name, "box": [x0, y0, x0 + pw, y0 + ph]})
    n_r, n_o = len(ref["scores"]), len(mine["scores"])
    titles = (f"official ({n_r} detections, top {len(shown_r)} drawn)", f"ours ({n_o} detections, top {len(shown_o)} drawn)",
              f"overlay: {len(pairing.matched)} matched, {len(pairing.near)} near, "
              f"{len(pairing.official_only)}+{len(pairing.ours_only)} unmatched")
    for p, t in zip(panels, titles):
        d.text((p["box"][0], MARGIN + 4), t, fill="black", font=font)

    ty = MARGIN + TITLE_H + ph + MARGIN
    cols = [("#", 30), ("class (COCO)", 170), ("official", 80), ("ours", 80), ("d-score", 90), ("IoU", 90), ("status", 120)]
    head = f"{title}   " if title else ""
    d.text((MARGIN, ty), head + "pairs among the drawn detections (green = within parity tolerance, orange = near, "
           "red/magenta = unmatched)", fill="black", font=font)
    y = ty + ROW_H + 2
    x = MARGIN
    for c, cw in cols:
        d.text((x, y), c, fill=(60, 60, 60), font=font)
        x += cw
    d.line([(MARGIN, y + ROW_H - 2), (width - MARGIN, y + ROW_H - 2)], fill=(180, 180, 180))
    for r, (_, cells, color) in enumerate(rows):
        y = ty + (r + 2) * ROW_H + 2
        x = MARGIN
        for (c, cw), v in zip(cols, [str(r + 1)] + cells):
            d.text((x, y), v, fill=color if c == "status" else "black", font=small)
            x += cw
    if more:
        d.text((MARGIN, ty + (len(rows) + 2) * ROW_H + 2), f"... {more} more rows", fill=(90, 90, 90), font=small)
    info = {
        "size": [width, height],
        "image_hw": [h, w],
        "panel_scale": s,
        "panels": panels,
        "table": {"box": [MARGIN, ty, width - MARGIN, height - MARGIN], "rows": len(rows), "more": more},
        "counts": {"matched": len(pairing.matched), "near": len(pairing.near),
                   "official_only": len(pairing.official_only), "ours_only": len(pairing.ours_only),
                   "official": n_r, "ours": n_o},
        "title": title,
    }
    meta = PngInfo()
    meta.add_text("effdet-parity", json.dumps(info))
    canvas.save(out_png, "PNG", pnginfo=meta)
    return info
