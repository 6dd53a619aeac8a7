"""End-to-end detections (our network + our post-processing) against the official rows, judged by
what fp32 arithmetic does to a detection list — each fact measured on the run at hand
(:mod:`parity.rules` states the rules and their sizes):

1. **Near-ties.** A detection list is a chain of discrete choices, and fp32 may make one either way
   where it is a near-tie: the class of an anchor on the inference path (the argmax of its logits,
   where the two OFFICIAL logits lie within the class-logit bound,
   :func:`~parity.rules.class_logit_bound`, the bound the ``pre_nms/classes0`` tap already accepts),
   and the soft-NMS selection order of two candidates whose current scores lie within the score gate
   (the first selected decays every later overlapping one, on both paths). Where the lists differ,
   our post-processing is re-run with the official choice at each such near-tie
   (:func:`aligned_detections`), and every row must then match; the report names each aligned anchor
   and selection with its gap. Choices beyond the bounds are not aligned.
2. **Rows our own fp32 run loses.** Our post-processing on our fp32 heads against the same on our
   float64 heads, matched with the end-to-end gates, loses ``L`` rows (:func:`measure_detection_noise`):
   the rows rounding alone decides. The official fp32 run is another fp32 run of the same network,
   so official and ours may differ by up to ``LOST_ROWS_FACTOR · L`` rows on each side. When that
   allowance covers every row the comparison cannot fail: the input is *noise-dominated*, reported
   with both counts, and decided by the network taps, the pre-NMS tensors and the detections on the
   official heads, which stay strict.
3. **On the official heads** our post-processing is bit-exact: matched strictly, always.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from effdet_torch.nms import expf, iou_one_to_many
from effdet_torch.postprocess import (nms_groups, per_class_candidates, postprocess_global, postprocess_per_class,
                                      pre_nms_global)

from .rules import DETECTION_NOISE_FACTOR, IOU_MIN, LOST_ROWS_FACTOR, REL_TOL, SCORE_TOL
from .verdicts import NearTie, TapResult, box_iou, class_flips, detection_noise, match_detections

__all__ = ["DetectionNoise", "NearTie", "OrderTie", "align_selection_order", "align_to_official", "aligned_detections",
           "compare_detections", "detection_summary", "lost_rows", "measure_detection_noise"]


def _make_top(cls: torch.Tensor, anchor: int, cls_index: int, value: torch.Tensor) -> None:
    """In place: anchor ``anchor`` of ``cls [1, N, C]`` gets ``value`` for class ``cls_index`` and
    every other logit ``>= value`` just below it, so that class is its max and first argmax."""
    row = cls[0, anchor]  # a view
    row[row >= value] = torch.nextafter(value, torch.full_like(value, float("-inf")))
    row[cls_index] = value


def align_to_official(cls: torch.Tensor, ties: list[NearTie]) -> torch.Tensor:
    """Our logits ``[1, N, C]`` with the official class made the top class at each near-tie anchor:
    every logit at or above ours of the official class is set just below it. The anchor's max and
    argmax — all the inference path reads of its logits — become the official choice and our logit
    for it."""
    out = cls.clone()
    for t in ties:
        _make_top(out, t.anchor, t.official_class, out[0, t.anchor, t.official_class].clone())
    return out


@dataclass(frozen=True)
class OrderTie:
    """A soft-NMS selection the reference made in another order: at ``position`` of NMS ``group`` (0
    on the inference path, the 0-based class on the COCO-eval path) the reference selected the
    candidate ``reference`` (anchor, 0-based class) where ours selected ``ours``, whose current
    scores in our run differ by ``gap`` (within the score gate). Soft-NMS decays every later
    overlapping row by the earlier one, so the order decides their scores."""

    group: int
    position: int
    reference: tuple[int, int]
    ours: tuple[int, int]
    gap: float

    def to_json(self) -> dict:
        return {"group": self.group, "position": self.position, "reference": list(self.reference),
                "ours": list(self.ours), "gap": self.gap}


@dataclass
class _Candidates:
    """NMS inputs of one image: boxes as NMS sees them and as the rows carry them, scores, groups,
    and the (anchor, 0-based class) behind each."""

    boxes: np.ndarray  # [M, 4]
    row_boxes: np.ndarray  # [M, 4]
    scores: np.ndarray  # [M]
    groups: np.ndarray  # [M]
    anchors: np.ndarray  # [M]
    classes: np.ndarray  # [M]


def _candidates(cfg, path: str, cls: torch.Tensor, box: torch.Tensor, anchors: torch.Tensor,
                hw: tuple[int, int], scale: float | None) -> _Candidates:
    """The post-processing's own candidates (``effdet_torch.postprocess``) of image 0, with the row
    frame of each path: inference boxes clipped to the padded input, both × their image scale."""
    if path == "detections":
        b, s, c0 = pre_nms_global(cls, box, anchors)
        boxes, scores = b[0].detach().float().cpu().numpy(), s[0].detach().float().cpu().numpy()
        classes = c0[0].cpu().numpy().astype(np.int64)
        groups, idx = np.zeros(len(scores), np.int64), np.arange(len(scores))
        limit = np.array([hw[0], hw[1], hw[0], hw[1]], np.float32)
        with np.errstate(invalid="ignore"):
            rows = np.minimum(np.maximum(boxes, np.float32(0)), limit)
    else:
        b, s, g, a = per_class_candidates(cfg, cls, box, anchors)
        boxes, scores = b.numpy(), s.numpy().astype(np.float32)
        groups, idx = g.numpy().astype(np.int64), a.numpy().astype(np.int64)
        classes, rows = groups.copy(), boxes
    if scale is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            rows = rows * np.float32(scale)
    return _Candidates(boxes, rows, scores, groups, idx, classes)


def _box_close(a: np.ndarray, b: np.ndarray, box_gate: float) -> float | None:
    """The largest coordinate difference of two row boxes when they match (IoU ≥ IOU_MIN or every
    coordinate within ``box_gate``), else None."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d[a == b] = 0.0  # equal infinities
    d = float(np.nan_to_num(d, nan=np.inf, posinf=np.inf).max())
    return d if d <= box_gate or box_iou(a, b) >= IOU_MIN else None


def _current_score(cand: _Candidates, q: int, selected: list[int], cfg) -> float:
    """Candidate ``q``'s score after the soft-NMS decay by every selected box (float32, newest first;
    hard NMS: -inf once an IoU exceeds the threshold)."""
    score = np.float32(cand.scores[q])
    if not selected:
        return float(score)
    ious = iou_one_to_many(cand.boxes[q], cand.boxes[np.asarray(selected)][::-1])
    if cfg.nms_sigma <= 0:  # hard NMS: kept as it is, or suppressed
        return float(score) if not (ious > np.float32(cfg.nms_iou_threshold)).any() else float("-inf")
    scale = np.float32(-0.5) / np.float32(cfg.nms_sigma / 2)
    for w in expf((scale * ious) * ious):
        score = np.float32(score * w)
        if score <= np.float32(cfg.nms_score_threshold):
            break
    return float(score)


def _lower(cls: torch.Tensor, path: str, anchor: int, cls_index: int, factor: float) -> None:
    """In place: candidate (anchor, class)'s score × ``factor`` (< 1) through its logit; on the
    inference path the class stays the anchor's top class."""
    s = float(torch.sigmoid(cls[0, anchor, cls_index].double())) * factor
    value = torch.tensor(np.log(s) - np.log1p(-s), dtype=cls.dtype)
    if path == "detections":
        _make_top(cls, anchor, cls_index, value)
    else:
        cls[0, anchor, cls_index] = value


def align_selection_order(cfg, path: str, cls: torch.Tensor, box: torch.Tensor, anchors: torch.Tensor,
                          hw: tuple[int, int], scale: float | None, ref: dict[str, np.ndarray],
                          score_gate: float, box_gate: float) -> tuple[torch.Tensor, list[OrderTie]]:
    """Our logits ``[1, N, C]`` adjusted, within the score gate, so that soft-NMS selects in the order of
    the reference rows ``ref`` (valid rows, 1-based classes) where ours differs by a near-tie.

    Per NMS group the rows are compared in selection order (inference path: the list order; COCO-eval
    path: each class's rows by score, which is their selection order). At the first row where ours
    differs, the candidate matching the reference row (same class, row box within ``box_gate``) is
    looked up; when its current score in our run is within ``score_gate`` of the one ours selected,
    ours is lowered just below it (its input score × ``c_ref / c_ours · (1 - 4e-6)``) and the
    post-processing runs again. Stops at the first difference that is not such a tie.
    """
    cls = cls.detach().float().clone()
    ties: list[OrderTie] = []
    ref_classes = np.asarray(ref["classes"]).astype(np.int64) - 1
    by_group: dict[int, np.ndarray] = {}
    for r in range(len(ref_classes)):  # reference rows per group, in their order
        g = 0 if path == "detections" else int(ref_classes[r])
        by_group.setdefault(g, []).append(r)
    if path != "detections":  # one class's rows by score (stable): its selection order
        by_group = {g: sorted(rs, key=lambda r: -float(ref["scores"][r])) for g, rs in by_group.items()}
    stuck: set[int] = set()
    margin = 4e-6
    for _ in range(4 * max(len(ref_classes), 1)):
        cand = _candidates(cfg, path, cls, box, anchors, hw, scale)
        num_groups = 1 if path == "detections" else cls.shape[-1]
        idx, sc, cnt = (t.numpy() for t in nms_groups(cfg, torch.from_numpy(cand.boxes), torch.from_numpy(cand.scores),
                                                       torch.from_numpy(cand.groups), num_groups))
        changed = False
        for g, rows in by_group.items():
            if g in stuck:
                continue
            for k, r in enumerate(rows[:cnt[g]]):
                p = int(idx[g, k])
                if (cand.classes[p] == ref_classes[r] and abs(float(sc[g, k]) - float(ref["scores"][r])) <= score_gate
                        and _box_close(cand.row_boxes[p], ref["boxes"][r], box_gate) is not None):
                    continue
                selected = [int(i) for i in idx[g, :k]]
                # candidates that can be the reference row: its group and class, a score that decays to
                # it within the gate (decay only lowers), the row box within the box gate
                target = float(ref["scores"][r])
                pool = np.nonzero((cand.groups == g) & (cand.classes == ref_classes[r])
                                  & (cand.scores >= target - score_gate))[0]
                close = [(abs(c - target), d, int(q)) for q in pool if int(q) not in selected
                         for d in [_box_close(cand.row_boxes[q], ref["boxes"][r], box_gate)] if d is not None
                         for c in [_current_score(cand, int(q), selected, cfg)]]
                if not close:
                    stuck.add(g)
                    break
                q = min(close)[2]
                c_p, c_q = float(sc[g, k]), _current_score(cand, q, selected, cfg)
                if q == p or c_p - c_q > score_gate or c_q <= cfg.nms_score_threshold:
                    stuck.add(g)
                    break
                prev = ties[-1] if ties else None
                if prev is not None and (prev.group, prev.position, prev.ours) == (g, k, (int(cand.anchors[p]), int(cand.classes[p]))):
                    margin *= 10  # the last lowering did not reach below: go further
                    if margin > 1e-2:
                        stuck.add(g)
                        break
                else:
                    ties.append(OrderTie(g, k, (int(cand.anchors[q]), int(cand.classes[q])),
                                         (int(cand.anchors[p]), int(cand.classes[p])), c_p - c_q))
                _lower(cls, path, int(cand.anchors[p]), int(cand.classes[p]), c_q / c_p * (1 - margin))
                changed = True
                break
        if not changed:
            break
    return cls, ties


@dataclass(frozen=True)
class DetectionNoise:
    """The fp32 noise of one detection list: our post-processing on our fp32 heads against the same
    on our float64 heads rounded to fp32."""

    score: float  # σ_score: the largest score difference of paired rows
    box: float  # σ_box: the largest box-coordinate difference of paired rows
    lost: int  # rows one list holds that the other lacks, under the end-to-end gates
    rows: int  # rows of the float64-head list

    def gates(self, box_scale: float) -> tuple[float, float]:
        """``(score gate, box gate)`` of the end-to-end matching for boxes of scale ``max|box|``."""
        return (max(SCORE_TOL, DETECTION_NOISE_FACTOR * self.score),
                max(REL_TOL * (1 + box_scale), DETECTION_NOISE_FACTOR * self.box))


def _max_abs(a: np.ndarray) -> float:
    """``max|a|`` over the finite elements (0 for none): scales rules on boxes that may overflow."""
    a = np.abs(np.asarray(a, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _pair_err(r: np.ndarray, o: np.ndarray) -> float:
    """``max|r - o|`` of paired values; equal infinities count 0, any other non-finite difference inf."""
    if not r.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        d = np.abs(r - o)
    d[r == o] = 0.0
    return float(np.nan_to_num(d, nan=np.inf, posinf=np.inf).max())


def lost_rows(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], score_gate: float, box_gate: float) -> int:
    """Rows one list holds that the other lacks, matched with the gates — ties at the cut-off
    included: where every score sits within the gate of the last one (a saturated, chaotic run) the
    whole list is such a tie, and that is what must show."""
    m = match_detections(ref, ours, box_gate, score_gate)
    return max(len(ref["scores"]), len(ours["scores"])) - len(m["pairs"])


def measure_detection_noise(ours32: dict[str, np.ndarray], ours64: dict[str, np.ndarray]) -> DetectionNoise:
    """:class:`DetectionNoise` of two detection lists (valid rows: ``boxes``, ``scores``, ``classes``)
    of our post-processing, on our fp32 heads (``ours32``) and our float64 heads (``ours64``).

    ``L`` is counted without aligning near-ties: where rounding makes the choices at near-ties
    everywhere (a chaotic network, whose class-logit noise exceeds the logits' spread), alignment
    could turn any list into any other, and the lost rows are what shows it."""
    s, b = detection_noise(ours32, ours64)
    noise = DetectionNoise(s, b, 0, len(ours64["scores"]))
    return DetectionNoise(s, b, lost_rows(ours64, ours32, *noise.gates(_max_abs(ours64["boxes"]))), noise.rows)


def aligned_detections(cfg, path: str, cls: torch.Tensor, box: torch.Tensor, anchors: torch.Tensor,
                       hw: tuple[int, int], scale: float | None, ref: dict[str, np.ndarray], score_gate: float,
                       box_gate: float, ref_cls0: np.ndarray | None = None, ref_logits: np.ndarray | None = None,
                       class_bound: float | None = None) -> tuple[dict[str, np.ndarray], list[NearTie], list[OrderTie]]:
    """Our post-processing of ``path`` (``detections``: inference, ``eval_detections``: COCO eval) on
    our heads ``cls [1, N, C]``, ``box [1, N, 4]``, re-run with the reference's choice at every near-tie
    (module docstring): the class at anchors whose reference logits are within ``class_bound``
    (inference path; ``ref_cls0``, ``ref_logits [N, C]``), then the soft-NMS selection order
    (:func:`align_selection_order`). Returns the valid rows and both lists of aligned ties."""
    class_ties: list[NearTie] = []
    if path == "detections" and ref_cls0 is not None and ref_logits is not None and class_bound is not None:
        our_cls0 = pre_nms_global(cls, box, anchors)[2][0].cpu().numpy()
        class_ties, _ = class_flips(ref_cls0, our_cls0, ref_logits, class_bound)
        cls = align_to_official(cls, class_ties)
    cls, order_ties = align_selection_order(cfg, path, cls, box, anchors, hw, scale, ref, score_gate, box_gate)
    d = (postprocess_global(cfg, cls, box, anchors, hw, scale) if path == "detections"
         else postprocess_per_class(cfg, cls, box, anchors, scale))
    n = int(d.valid_len[0])
    rows = {"boxes": d.boxes[0, :n].cpu().numpy(), "scores": d.scores[0, :n].cpu().numpy(),
            "classes": d.classes[0, :n].cpu().numpy()}
    return rows, class_ties, order_ties


def _describe(m: dict) -> str:
    note = f"{len(m['pairs'])} matched, {len(m['ties'])} ties"
    if m["pairs"]:
        note += f", min IoU {min(p[2] for p in m['pairs']):.6f}"
    if m["bad_ref"] or m["bad_ours"]:
        note = (f"{len(m['bad_ref'])} official rows unmatched (first {m['bad_ref'][:3]}), "
                f"{len(m['bad_ours'])} of ours unmatched; " + note)
    return note


def _describe_ties(class_ties: list[NearTie], order_ties: list[OrderTie], bound: float | None, per_class: bool) -> str:
    out = ""
    if class_ties:
        shown = ", ".join(f"anchor {t.anchor} (official class {t.official_class + 1}, ours {t.our_class + 1}, "
                          f"logit gap {t.gap:.2e})" for t in class_ties[:5])
        more = f" and {len(class_ties) - 5} more" if len(class_ties) > 5 else ""
        out += (f"aligned {len(class_ties)} near-tie anchor(s) to the official class (bound {bound:.2e}): "
                f"{shown}{more}; ")
    if order_ties:
        shown = ", ".join(f"row {t.position}" + (f" of class {t.group + 1}" if per_class else "")
                          + f" (official anchor {t.reference[0]} class {t.reference[1] + 1}, ours anchor {t.ours[0]} "
                            f"class {t.ours[1] + 1}, score gap {t.gap:.2e})" for t in order_ties[:5])
        more = f" and {len(order_ties) - 5} more" if len(order_ties) > 5 else ""
        out += f"aligned {len(order_ties)} soft-NMS selection(s) to the official order: {shown}{more}; "
    return out


def compare_detections(prefix: str, npz, ours: dict[str, np.ndarray], ours_n: int,
                       on_official_heads: dict[str, np.ndarray] | None = None,
                       noise: DetectionNoise | None = None, realign=None) -> list[TapResult]:
    """Detections of ``prefix`` (``detections/<case>`` or ``eval_detections/<case>``) by the rules of
    the module docstring.

    ``ours`` (``boxes``/``scores``/``classes``, ``ours_n`` valid rows): our network and
    post-processing. ``on_official_heads``: our post-processing fed the OFFICIAL class/box outputs,
    matched strictly (same class, ``|Δscore| <= 1e-5``, IoU ≥ 0.9999). End to end the gates are
    ``score: max(1e-5, 8·σ_score)``, ``box: max(1e-4·(1 + max|box|), 8·σ_box)`` and each side may keep
    ``LOST_ROWS_FACTOR · L`` rows unmatched, where ``noise = (σ_score, σ_box, L)`` is measured on our
    own fp32 and float64 runs (:func:`measure_detection_noise`); without ``noise`` only the fixed
    gates apply and no row may be unmatched. When rows are unmatched, ``realign(score_gate, box_gate)``
    gives ours re-run with the official choice at every near-tie: ``(rows, class ties, order ties,
    class bound)`` (:func:`aligned_detections`), and those rows are judged. Both checks decide,
    except that a noise-dominated input is decided by the official heads alone. The first result
    carries ``detail`` (JSON): aligned ties, lost rows, unmatched counts, noise-dominated.
    """
    ref_n = int(npz[f"{prefix}/valid_len"])
    ref = {k: npz[f"{prefix}/{k}"][:ref_n] for k in ("boxes", "scores", "classes")}
    mine = {k: ours[k][:ours_n] for k in ("boxes", "scores", "classes")}
    box_rule = REL_TOL * (1 + _max_abs(ref["boxes"])) if ref_n else 0.0
    if noise is not None:
        score_tol, box_tol = noise.gates(_max_abs(ref["boxes"]) if ref_n else 0.0)
        s_noise, b_noise = noise.score, noise.box
    else:
        score_tol, box_tol, s_noise, b_noise = SCORE_TOL, box_rule, None, None
    m = match_detections(ref, mine, box_tol, score_tol)
    class_ties: list[NearTie] = []
    order_ties: list[OrderTie] = []
    bound = None
    allowance = LOST_ROWS_FACTOR * noise.lost if noise is not None else 0
    noise_dominated = allowance > 0 and allowance >= max(ref_n, ours_n)
    if (m["bad_ref"] or m["bad_ours"]) and realign is not None and not noise_dominated:
        mine, class_ties, order_ties, bound = realign(score_tol, box_tol)
        ours_n = len(mine["scores"])
        m = match_detections(ref, mine, box_tol, score_tol)
    e2e_ok = len(m["bad_ref"]) <= allowance and len(m["bad_ours"]) <= allowance
    note = (_describe_ties(class_ties, order_ties, bound, prefix.startswith("eval_")) + "end-to-end: "
            + _describe(m))
    if noise is not None:
        note += f" (gates: score {score_tol:.1e}, box {box_tol:.1e}; fp32 noise {s_noise:.1e} / {b_noise:.1e}"
        if noise.lost:
            note += (f"; our fp32 run loses {noise.lost} of {noise.rows} rows against our float64 run, so up to "
                     f"{allowance} may be unmatched on each side")
        note += ")"
    if noise_dominated:
        note += ("; NOISE-DOMINATED: the allowance covers every row, so the end-to-end list is decided by "
                 "rounding and does not judge; the taps, the pre-NMS tensors and the detections on the "
                 "official heads decide")
    ok = e2e_ok or noise_dominated
    strict_ok = None
    if on_official_heads is not None:
        strict = match_detections(ref, on_official_heads)
        strict_ok = not strict["bad_ref"] and not strict["bad_ours"]
        ok = ok and strict_ok
        note = "on the official heads: " + _describe(strict) + "; " + note
    elif noise_dominated:
        note += " (none recorded for this case: its post-processing is not checked here)"
    detail = {"aligned_classes": [t.to_json() for t in class_ties], "class_bound": bound,
              "aligned_order": [t.to_json() for t in order_ties],
              "unmatched_official": len(m["bad_ref"]), "unmatched_ours": len(m["bad_ours"]),
              "lost_by_our_fp32": None if noise is None else noise.lost,
              "rows_of_our_float64": None if noise is None else noise.rows, "allowance": allowance,
              "noise_dominated": noise_dominated, "end_to_end_ok": e2e_ok, "official_heads_ok": strict_ok}
    pi = np.array([p[0] for p in m["pairs"]], int)
    pj = np.array([p[1] for p in m["pairs"]], int)
    out = []
    for k, tol, nz in (("boxes", box_rule, b_noise), ("scores", SCORE_TOL, s_noise), ("classes", 0.0, None)):
        key = f"{prefix}/{k}"
        if key not in npz:
            continue
        r, o = np.asarray(ref[k], np.float64)[pi], np.asarray(mine[k], np.float64)[pj]
        err = _pair_err(r, o)
        scale = _max_abs(ref[k]) if ref_n else 0.0
        n_tol = DETECTION_NOISE_FACTOR * nz if nz is not None else None
        out.append(TapResult(key, tuple(npz[key].shape), err, err / scale if scale else err, tol,
                             ok and err <= max(tol, n_tol or 0.0), note, noise=nz, noise_tol=n_tol))
    if f"{prefix}/valid_len" in npz:
        out.append(TapResult(f"{prefix}/valid_len", (), float(abs(ref_n - ours_n)), 0.0, 0.0,
                             ref_n == ours_n or ok, f"official {ref_n}, ours {ours_n}"))
    gkey = f"{prefix}/generate_detections"
    if gkey in npz:  # official [K, 7] rows: [image_id, xmin, ymin, xmax, ymax, score, class]
        g = np.asarray(npz[gkey], np.float64)[:ref_n]
        b = np.asarray(mine["boxes"], np.float64).reshape(-1, 4)
        source_id = g[0, 0] if len(g) else 0.0
        rows = np.concatenate([np.full((len(b), 1), source_id), b[:, [1, 0, 3, 2]],
                               np.asarray(mine["scores"], np.float64)[:, None],
                               np.asarray(mine["classes"], np.float64)[:, None]], 1)
        err = _pair_err(g[pi], rows[pj])
        scale = _max_abs(g) if len(g) else 0.0
        t = REL_TOL * (1 + scale)
        n_tol = DETECTION_NOISE_FACTOR * max(s_noise, b_noise) if noise is not None else None
        out.append(TapResult(gkey, tuple(npz[gkey].shape), err, err / scale if scale else err, t,
                             ok and err <= max(t, n_tol or 0.0), note, noise=None if noise is None else
                             max(s_noise, b_noise), noise_tol=n_tol))
    if out:
        out[0].detail = detail
    return out


def detection_summary(results) -> list[str]:
    """One line per compared detection list of ``results`` (the results carrying ``detail``): how the
    end-to-end comparison was decided — strictly, after aligning near-ties, or noise-dominated."""
    lines = []
    for r in results:
        d = r.detail
        if not d:
            continue
        prefix = r.key.rsplit("/", 1)[0]
        lost = d["lost_by_our_fp32"]
        noise = "" if lost is None else f"; our fp32 loses {lost} of {d['rows_of_our_float64']} rows to our float64"
        heads = {True: "; on the official heads: all match", False: "; on the official heads: MISMATCH",
                 None: ""}[d["official_heads_ok"]]
        if d["noise_dominated"]:
            how = (f"NOISE-DOMINATED (end to end {d['unmatched_official']} official / {d['unmatched_ours']} of ours "
                   f"unmatched, allowance {d['allowance']}): decided by the taps and the official heads")
        else:
            aligned = []
            if d["aligned_classes"]:
                aligned.append(f"{len(d['aligned_classes'])} class near-tie(s)")
            if d["aligned_order"]:
                aligned.append(f"{len(d['aligned_order'])} soft-NMS order tie(s)")
            how = ("end to end " + ("all rows match" if d["end_to_end_ok"] else
                                    f"{d['unmatched_official']} official / {d['unmatched_ours']} of ours unmatched "
                                    f"(allowance {d['allowance']}): FAIL")
                   + (" after aligning " + " and ".join(aligned) if aligned else ""))
        lines.append(f"{prefix}: {how}{noise}{heads}")
    return lines
