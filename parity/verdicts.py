"""Verdicts of the parity rules (:mod:`parity.rules`) on one key: a tensor tap (:class:`TapResult`),
detection rows matched one to one (:func:`match_detections`, :func:`compare_detections`), and the
class argmax near-ties (:func:`class_tie_result`). Used by :mod:`parity.compare`, the one runner."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .rules import DETECTION_NOISE_FACTOR, IOU_MIN, NOISE_FACTOR, REL_TOL, SCORE_TOL

__all__ = ["TapResult", "box_iou", "class_tie_result", "compare_detections", "detection_noise", "match_detections",
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
    without a partner (ties at the cut-off) do not count."""
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
        db = max(db, float(np.abs(ab[i] - bb[j]).max()))
    return ds, db


def _describe(m: dict) -> str:
    note = f"{len(m['pairs'])} matched, {len(m['ties'])} ties"
    if m["pairs"]:
        note += f", min IoU {min(p[2] for p in m['pairs']):.6f}"
    if m["bad_ref"] or m["bad_ours"]:
        note = (f"{len(m['bad_ref'])} official rows unmatched (first {m['bad_ref'][:3]}), "
                f"{len(m['bad_ours'])} of ours unmatched; " + note)
    return note


def compare_detections(prefix: str, npz, ours: dict[str, np.ndarray], ours_n: int,
                        on_official_heads: dict[str, np.ndarray] | None = None,
                        noise: tuple[float, float] | None = None) -> list[TapResult]:
    """Detections of ``prefix`` (``detections/<case>`` or ``eval_detections/<case>``).

    ``on_official_heads`` (our post-processing fed the OFFICIAL class/box outputs) must match strictly
    (same class, ``|Δscore| <= 1e-5``, IoU ≥ 0.9999): the post-processing is bit-exact, so this has no
    noise. End to end (``ours``: our network) the same matching runs with the noise-aware gates
    ``score: max(1e-5, 6·σ_score)``, ``box: max(1e-4·(1 + max|box|), 6·σ_box)`` where ``noise =
    (σ_score, σ_box)`` is our own detections' fp32 noise (:func:`detection_noise`); both decide.
    """
    ref_n = int(npz[f"{prefix}/valid_len"])
    ref = {k: npz[f"{prefix}/{k}"][:ref_n] for k in ("boxes", "scores", "classes")}
    mine = {k: ours[k][:ours_n] for k in ("boxes", "scores", "classes")}
    box_rule = REL_TOL * (1 + float(np.abs(ref["boxes"]).max())) if ref_n else 0.0
    s_noise, b_noise = noise if noise is not None else (None, None)
    score_tol = max(SCORE_TOL, DETECTION_NOISE_FACTOR * s_noise) if s_noise is not None else SCORE_TOL
    box_tol = max(box_rule, DETECTION_NOISE_FACTOR * b_noise) if b_noise is not None else box_rule
    m = match_detections(ref, mine, box_tol, score_tol)
    ok = not m["bad_ref"] and not m["bad_ours"]
    note = "end-to-end: " + _describe(m)
    if noise is not None:
        note += f" (gates: score {score_tol:.1e}, box {box_tol:.1e}; fp32 noise {s_noise:.1e} / {b_noise:.1e})"
    if on_official_heads is not None:
        strict = match_detections(ref, on_official_heads)
        ok = ok and not strict["bad_ref"] and not strict["bad_ours"]
        note = "on the official heads: " + _describe(strict) + "; " + note
    pi = np.array([p[0] for p in m["pairs"]], int)
    pj = np.array([p[1] for p in m["pairs"]], int)
    out = []
    for k, tol, nz in (("boxes", box_rule, b_noise), ("scores", SCORE_TOL, s_noise), ("classes", 0.0, None)):
        key = f"{prefix}/{k}"
        if key not in npz:
            continue
        r, o = np.asarray(ref[k], np.float64)[pi], np.asarray(mine[k], np.float64)[pj]
        err = float(np.abs(r - o).max()) if len(pi) else 0.0
        scale = float(np.abs(ref[k]).max()) if ref_n else 0.0
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
        err = float(np.abs(g[pi] - rows[pj]).max()) if len(pi) else 0.0
        scale = float(np.abs(g).max()) if len(g) else 0.0
        t = REL_TOL * (1 + scale)
        n_tol = DETECTION_NOISE_FACTOR * max(s_noise, b_noise) if noise is not None else None
        out.append(TapResult(gkey, tuple(npz[gkey].shape), err, err / scale if scale else err, t,
                             ok and err <= max(t, n_tol or 0.0), note, noise=None if noise is None else
                             max(s_noise, b_noise), noise_tol=n_tol))
    return out


def class_tie_result(key: str, ref_cls0: np.ndarray, our_cls0: np.ndarray, ref_logits: np.ndarray | None,
                     logit_noise: float | None = None) -> TapResult:
    """``pre_nms/classes0``: equal, except argmax near-ties — rows whose two classes' OFFICIAL logits
    differ by less than the class-logit bound (``max(1e-4·(1 + max|logit|), 3·gap32 of the logits)``)."""
    diff = np.nonzero(ref_cls0.astype(np.int64) != our_cls0.astype(np.int64))[0]
    if ref_logits is None:
        return TapResult(key, ref_cls0.shape, float(len(diff)), 0.0, 0.0, len(diff) == 0, f"{len(diff)} differ")
    tol = max(REL_TOL * (1 + float(np.abs(ref_logits).max())),
              NOISE_FACTOR * logit_noise if logit_noise is not None else 0.0)
    rows = ref_logits[diff]
    gaps = np.abs(rows[np.arange(len(diff)), ref_cls0[diff].astype(int)] - rows[np.arange(len(diff)), our_cls0[diff].astype(int)])
    ok = bool((gaps <= tol).all())
    return TapResult(key, ref_cls0.shape, float(len(diff)), 0.0, 0.0, ok,
                     f"{len(diff)} argmax flips, all near-ties (official logit gap <= {tol:.2e})" if ok
                     else f"{int((gaps > tol).sum())} class differences that are not near-ties (logit gap > {tol:.2e})",
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
