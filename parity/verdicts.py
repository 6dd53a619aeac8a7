"""Verdicts of the parity rules (:mod:`parity.rules`) on one key: a tensor tap (:class:`TapResult`),
detection rows matched one to one (:func:`match_detections`; the end-to-end judgement is
:mod:`parity.detections`), and the class argmax near-ties (:func:`class_flips`,
:func:`class_tie_result`). Used by :mod:`parity.compare`, the one runner."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .rules import IOU_MIN, REL_TOL, SCORE_TOL, class_logit_bound

__all__ = ["NearTie", "TapResult", "box_iou", "class_flips", "class_tie_result", "detection_noise", "match_detections",
           "strict_fp32"]


@dataclass
class TapResult:
    key: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float  # max_abs_err / max|official|
    tolerance: float
    passed: bool
    note: str = ""
    noise: float | None = None  # our measured rounding noise here (fp32-vs-fp64 gap, or float64 noise)
    noise_tol: float | None = None  # the noise allowance it gives (see parity.rules)
    detail: dict | None = None  # structured facts behind the verdict (detections: parity.detections)

    @property
    def bound(self) -> float:
        """The bound the error was judged against: the larger of the rule and the noise allowance."""
        return max(self.tolerance, self.noise_tol or 0.0)

    def to_json(self) -> dict:
        """JSON-ready: shape as a list, ``verdict``, non-finite numbers as null."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["passed"] = bool(self.passed)
        d["verdict"] = "pass" if self.passed else "FAIL"
        for k, v in d.items():
            if isinstance(v, np.generic):  # numpy scalars (np.bool_ is no JSON type)
                d[k] = v = v.item()
            if isinstance(v, float) and not np.isfinite(v):
                d[k] = None
        return d


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 1.0 if np.allclose(a, b, rtol=0, atol=REL_TOL * (1 + np.abs(a).max())) else 0.0
    return float(inter / union)


def match_detections(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], box_tol: float | None = None,
                     score_tol: float = SCORE_TOL) -> dict:
    """Match official and our valid detection rows one to one (see the module docstring).

    ``ref``/``ours``: ``boxes [K, 4]``, ``scores [K]``, ``classes [K]`` (valid rows only).
    A pair needs the same class, ``|Δscore| <= score_tol`` and IoU ≥ 0.9999 — or, when ``box_tol`` is
    given, every coordinate within ``box_tol`` (IoU is ill-conditioned for boxes clipped to slivers
    and for the fp32 noise that the random input amplifies; see the module docstring).
    Returns ``pairs`` [(i_ref, j_ours, iou)], ``bad_ref``/``bad_ours`` (unmatched rows that are
    not ties at the cut-off: within ``score_tol`` of the last kept score) and ``ties``.
    """
    rb, rs, rc = (np.asarray(ref[k], np.float64) for k in ("boxes", "scores", "classes"))
    ob, os_, oc = (np.asarray(ours[k], np.float64) for k in ("boxes", "scores", "classes"))
    used = np.zeros(len(os_), bool)
    pairs, unmatched_ref = [], []
    for i in range(len(rs)):
        best, best_iou = -1, -1.0
        for j in np.nonzero((~used) & (oc == rc[i]) & (np.abs(os_ - rs[i]) <= score_tol))[0]:
            iou = box_iou(rb[i], ob[j])
            if iou > best_iou:
                best, best_iou = j, iou
        close = best >= 0 and box_tol is not None and np.abs(rb[i] - ob[best]).max() <= box_tol
        if best >= 0 and (best_iou >= IOU_MIN or close):
            used[best] = True
            pairs.append((i, int(best), best_iou))
        else:
            unmatched_ref.append(i)
    last = rs[-1] if len(rs) else 0.0
    tie = lambda s: abs(s - last) <= score_tol  # noqa: E731
    bad_ref = [i for i in unmatched_ref if not tie(rs[i])]
    unmatched_ours = [j for j in range(len(os_)) if not used[j]]
    bad_ours = [j for j in unmatched_ours if not tie(os_[j])]
    ties = [i for i in unmatched_ref if tie(rs[i])] + [j for j in unmatched_ours if tie(os_[j])]
    return {"pairs": pairs, "bad_ref": bad_ref, "bad_ours": bad_ours, "ties": ties}


def detection_noise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    """``(max |Δscore|, max |Δbox coordinate|)`` between two detection lists of OUR post-processing on
    our fp32 heads (``a``) and on our float64 heads rounded to fp32 (``b``): the fp32 noise of the
    detections. Rows are paired greedily by class and best IoU (> 0.5), highest score first; rows
    without a partner (ties at the cut-off) and coordinates that overflow do not count."""
    ab, as_, ac = (np.asarray(a[k], np.float64) for k in ("boxes", "scores", "classes"))
    bb, bs, bc = (np.asarray(b[k], np.float64) for k in ("boxes", "scores", "classes"))
    used = np.zeros(len(bs), bool)
    ds = db = 0.0
    for i in range(len(as_)):
        cand = np.nonzero((~used) & (bc == ac[i]))[0]
        if not len(cand):
            continue
        ious = [box_iou(ab[i], bb[j]) for j in cand]
        k = int(np.argmax(ious))
        if ious[k] <= 0.5:
            continue
        j = cand[k]
        used[j] = True
        ds = max(ds, float(abs(as_[i] - bs[j])))
        with np.errstate(invalid="ignore"):
            d = np.abs(ab[i] - bb[j])
        d = d[np.isfinite(d)]  # a coordinate that overflows is no measure of rounding
        db = max(db, float(d.max()) if d.size else 0.0)
    return ds, db


@dataclass(frozen=True)
class NearTie:
    """An anchor whose top class differs between the official run and ours (classes 0-based)."""

    anchor: int
    official_class: int
    our_class: int
    gap: float  # |official logit of official_class - official logit of our_class|

    def to_json(self) -> dict:
        return {"anchor": self.anchor, "official_class": self.official_class, "our_class": self.our_class,
                "gap": self.gap}


def class_flips(ref_cls0: np.ndarray, our_cls0: np.ndarray, ref_logits: np.ndarray,
                bound: float) -> tuple[list[NearTie], list[NearTie]]:
    """Anchors where the official top class ``ref_cls0 [N]`` differs from ours ``our_cls0 [N]``, split
    into near-ties (official logit gap ``<= bound``; ``ref_logits [N, C]``) and the others."""
    ref_c = np.asarray(ref_cls0).astype(np.int64).reshape(-1)
    our_c = np.asarray(our_cls0).astype(np.int64).reshape(-1)
    logits = np.asarray(ref_logits, np.float64).reshape(len(ref_c), -1)
    ties, others = [], []
    for a in np.nonzero(ref_c != our_c)[0]:
        gap = float(abs(logits[a, ref_c[a]] - logits[a, our_c[a]]))
        (ties if gap <= bound else others).append(NearTie(int(a), int(ref_c[a]), int(our_c[a]), gap))
    return ties, others



def class_tie_result(key: str, ref_cls0: np.ndarray, our_cls0: np.ndarray, ref_logits: np.ndarray | None,
                     logit_noise: float | None = None) -> TapResult:
    """``pre_nms/classes0``: equal, except argmax near-ties — anchors whose two classes' OFFICIAL logits
    differ by at most the class-logit bound (:func:`~parity.rules.class_logit_bound`)."""
    n_diff = int((np.asarray(ref_cls0).astype(np.int64) != np.asarray(our_cls0).astype(np.int64)).sum())
    if ref_logits is None:
        return TapResult(key, ref_cls0.shape, float(n_diff), 0.0, 0.0, n_diff == 0, f"{n_diff} differ")
    tol = class_logit_bound(float(np.abs(ref_logits).max()), logit_noise)
    ties, others = class_flips(ref_cls0, our_cls0, ref_logits, tol)
    ok = not others
    return TapResult(key, ref_cls0.shape, float(n_diff), 0.0, 0.0, ok,
                     f"{n_diff} argmax flips, all near-ties (official logit gap <= {tol:.2e})" if ok
                     else f"{len(others)} class differences that are not near-ties (logit gap > {tol:.2e}; "
                          f"largest {max(t.gap for t in others):.2e} at anchor "
                          f"{max(others, key=lambda t: t.gap).anchor})",
                     noise=logit_noise)


@contextmanager
def strict_fp32():
    """Disable TF32 for CUDA convs/matmuls while comparing (TF32 alone moves taps by ~1e-3)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
