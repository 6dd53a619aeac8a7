"""Golden check: run the converted model on the inputs of an official golden ``.npz`` and compare
every recorded tap.

Tolerances (and why):
- tensors (backbone … box_net, anchors, pre-NMS boxes/scores, preprocessed input):
  ``|ours - official| <= r · (1 + max|official|)`` with ``r = 1e-4`` for image cases and
  ``r = 3e-4`` for the ``random`` case. fp32 through a deep net accumulates ~1e-4 relative (op
  order, fused kernels; the official graph vs eager mode alone moves logits by 7e-4). The random
  case (N(0,1) noise fed as a normalised image) amplifies rounding most: measured against exact
  (fp64) arithmetic, the OFFICIAL fp32 taps themselves deviate by up to 1.24e-4 relative (d1,
  box_net/level7) and ours by 0.84e-4, so two correct fp32 implementations may differ by ~2.1e-4
  there; on images the official deviates by ≤ 7.5e-5 (lite0, relu6) and ≤ 7e-6 (d0, d1). A
  conversion mistake is 1e4 times larger (raw instead of EMA weights: 8.2 on the class logits);
- ``pre_nms/classes0``: equal, except where the two classes' OFFICIAL logits differ by less than the
  class-logit tolerance (an argmax near-tie that fp32 noise may flip);
- detections (inference and COCO-eval paths): matched one to one with the same class and
  ``|Δscore| <= 1e-5``; only rows whose official score lies within 1e-5 of the last kept score may
  differ (ties at the cut-off); ``valid_len`` equal. Two checks:
  * our post-processing fed the OFFICIAL class/box outputs (when the file holds them): IoU ≥ 0.9999
    for every pair — this isolates pre-NMS, soft-NMS, clipping and scaling, and decides the verdict;
  * end to end (our network), reported beside it, and deciding the verdict when the official heads
    are absent: IoU ≥ 0.9999 or every coordinate within the box tolerance
    ``1e-4 · (1 + max|official box|)``. IoU alone is ill-conditioned here: boxes clipped to
    slivers (0.3 px wide) lose 1e-4 IoU to a 6e-5 px shift, and on the random input fp32 rounding
    alone moves box codes by ~1.6e-4 — measured: our fp32 vs our fp64 differs as much as TF fp32
    vs our fp64, so no fp32 implementation meets IoU ≥ 0.9999 there, and soft-NMS turns such box
    shifts into decayed-score differences above 1e-5. The image cases pass it (tests assert so).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from effdet_torch.model import EfficientDet

__all__ = ["TapResult", "box_iou", "class_tie_result", "compare_detections", "golden_cases", "match_detections",
           "rel_tol", "run_golden", "strict_fp32", "write_json"]

REL_TOL = 1e-4  # image cases
RANDOM_REL_TOL = 3e-4  # the N(0,1) 'random' case (see the module docstring for the measurement)
SCORE_TOL = 1e-5
IOU_MIN = 0.9999


@dataclass
class TapResult:
    key: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float  # max_abs_err / max|official|
    tolerance: float
    passed: bool
    note: str = ""

    def to_json(self) -> dict:
        """JSON-ready: shape as a list, ``verdict``, non-finite numbers as null."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["verdict"] = "pass" if self.passed else "FAIL"
        for k, v in d.items():
            if isinstance(v, float) and not np.isfinite(v):
                d[k] = None
        return d


def rel_tol(key: str) -> float:
    """The relative tolerance of a golden key (its case decides)."""
    return RANDOM_REL_TOL if key.split("/")[0] == "random" else REL_TOL


def golden_cases(keys: list[str]) -> list[str]:
    """Input cases of a golden file: 'random' and every image with an ``input/<name>_raw_uint8``."""
    cases = []
    if any(k == "input/random" or k.startswith(("random/", "detections/random/", "eval_detections/random/"))
           for k in keys):
        cases.append("random")
    cases += sorted(k[len("input/"):-len("_raw_uint8")] for k in keys
                    if k.startswith("input/") and k.endswith("_raw_uint8"))
    return cases


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 1.0 if np.allclose(a, b, rtol=0, atol=REL_TOL * (1 + np.abs(a).max())) else 0.0
    return float(inter / union)


def match_detections(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], box_tol: float | None = None) -> dict:
    """Match official and our valid detection rows one to one (see the module docstring).

    ``ref``/``ours``: ``boxes [K, 4]``, ``scores [K]``, ``classes [K]`` (valid rows only).
    A pair needs the same class, ``|Δscore| <= 1e-5`` and IoU ≥ 0.9999 — or, when ``box_tol`` is
    given, every coordinate within ``box_tol`` (IoU is ill-conditioned for boxes clipped to slivers
    and for the fp32 noise that the random input amplifies; see the module docstring).
    Returns ``pairs`` [(i_ref, j_ours, iou)], ``bad_ref``/``bad_ours`` (unmatched rows that are
    not ties at the cut-off) and ``ties`` (unmatched rows excused as ties).
    """
    rb, rs, rc = (np.asarray(ref[k], np.float64) for k in ("boxes", "scores", "classes"))
    ob, os_, oc = (np.asarray(ours[k], np.float64) for k in ("boxes", "scores", "classes"))
    used = np.zeros(len(os_), bool)
    pairs, unmatched_ref = [], []
    for i in range(len(rs)):
        best, best_iou = -1, -1.0
        for j in np.nonzero((~used) & (oc == rc[i]) & (np.abs(os_ - rs[i]) <= SCORE_TOL))[0]:
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
    tie = lambda s: abs(s - last) <= SCORE_TOL  # noqa: E731
    bad_ref = [i for i in unmatched_ref if not tie(rs[i])]
    unmatched_ours = [j for j in range(len(os_)) if not used[j]]
    bad_ours = [j for j in unmatched_ours if not tie(os_[j])]
    ties = [i for i in unmatched_ref if tie(rs[i])] + [j for j in unmatched_ours if tie(os_[j])]
    return {"pairs": pairs, "bad_ref": bad_ref, "bad_ours": bad_ours, "ties": ties}


def _describe(m: dict) -> str:
    note = f"{len(m['pairs'])} matched, {len(m['ties'])} ties"
    if m["pairs"]:
        note += f", min IoU {min(p[2] for p in m['pairs']):.6f}"
    if m["bad_ref"] or m["bad_ours"]:
        note = (f"{len(m['bad_ref'])} official rows unmatched (first {m['bad_ref'][:3]}), "
                f"{len(m['bad_ours'])} of ours unmatched; " + note)
    return note


def compare_detections(prefix: str, npz, ours: dict[str, np.ndarray], ours_n: int,
                        on_official_heads: dict[str, np.ndarray] | None = None) -> list[TapResult]:
    """End-to-end rows (``ours``) matched with the box tolerance; ``on_official_heads`` (our
    post-processing fed the OFFICIAL class/box outputs) matched strictly (IoU ≥ 0.9999)."""
    ref_n = int(npz[f"{prefix}/valid_len"])
    ref = {k: npz[f"{prefix}/{k}"][:ref_n] for k in ("boxes", "scores", "classes")}
    mine = {k: ours[k][:ours_n] for k in ("boxes", "scores", "classes")}
    r_tol = rel_tol(prefix.split("/", 1)[1])  # the case (random or an image) sets the tolerance
    box_tol = r_tol * (1 + float(np.abs(ref["boxes"]).max())) if ref_n else 0.0
    m = match_detections(ref, mine, box_tol)
    e2e_ok = not m["bad_ref"] and not m["bad_ours"]
    note = "end-to-end: " + _describe(m)
    if on_official_heads is not None:
        strict = match_detections(ref, on_official_heads)
        ok = not strict["bad_ref"] and not strict["bad_ours"]
        note = "on the official heads: " + _describe(strict) + "; " + note
        if not e2e_ok:
            note += " (advisory: fp32 noise of the network, within the tap tolerances, moves soft-NMS)"
    else:
        ok = e2e_ok
    pi = np.array([p[0] for p in m["pairs"]], int)
    pj = np.array([p[1] for p in m["pairs"]], int)
    out = []
    for k, tol in (("boxes", None), ("scores", SCORE_TOL), ("classes", 0.0)):
        key = f"{prefix}/{k}"
        if key not in npz:
            continue
        r, o = np.asarray(ref[k], np.float64)[pi], np.asarray(mine[k], np.float64)[pj]
        err = float(np.abs(r - o).max()) if len(pi) else 0.0
        scale = float(np.abs(ref[k]).max()) if ref_n else 0.0
        t = r_tol * (1 + scale) if tol is None else tol
        out.append(TapResult(key, tuple(npz[key].shape), err, err / scale if scale else err, t,
                             ok and err <= t, note))
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
        t = r_tol * (1 + scale)
        out.append(TapResult(gkey, tuple(npz[gkey].shape), err, err / scale if scale else err, t, ok and err <= t, note))
    return out


def class_tie_result(key: str, ref_cls0: np.ndarray, our_cls0: np.ndarray, ref_logits: np.ndarray | None) -> TapResult:
    diff = np.nonzero(ref_cls0.astype(np.int64) != our_cls0.astype(np.int64))[0]
    if ref_logits is None:
        return TapResult(key, ref_cls0.shape, float(len(diff)), 0.0, 0.0, len(diff) == 0, f"{len(diff)} differ")
    tol = rel_tol(key) * (1 + float(np.abs(ref_logits).max()))
    rows = ref_logits[diff]
    gaps = np.abs(rows[np.arange(len(diff)), ref_cls0[diff].astype(int)] - rows[np.arange(len(diff)), our_cls0[diff].astype(int)])
    ok = bool((gaps <= tol).all())
    return TapResult(key, ref_cls0.shape, float(len(diff)), 0.0, 0.0, ok,
                     f"{len(diff)} argmax flips, all near-ties (official logit gap <= {tol:.2e})" if ok
                     else f"{int((gaps > tol).sum())} class differences that are not near-ties")


@contextmanager
def strict_fp32():
    """Disable TF32 for CUDA convs/matmuls while comparing (TF32 alone moves taps by ~1e-3)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def run_golden(model: EfficientDet, npz_path: str | os.PathLike, image_size: tuple[int, int] | None = None,
               seed: int = 1234, device: str | torch.device = "cpu") -> list[TapResult]:
    """Compare every tap of every case in ``npz_path``; see the module docstring for tolerances.

    The same runner as ``effdet-parity compare --golden`` (:mod:`parity.compare`), on the golden's
    own taps, in strict fp32 on CUDA and without the fp32-noise allowance. Cases whose official
    heads lie in a sibling ``.npz`` of the same folder get the post-processing-only check too.
    """
    from .compare import compare_runs, run_ours  # compare builds on this module's rules
    from .live import load_npz, sibling_heads

    ref = load_npz(npz_path)
    with np.errstate(over="ignore", invalid="ignore"):  # random inputs may overflow box decoding
        ours, heads, _ = run_ours(model, ref, image_size=image_size, device=device, detailed=False, seed=seed,
                                  heads_ref=sibling_heads(Path(npz_path), ref))
        stats = compare_runs(model, ref, ours, heads)
    return stats


def write_json(results: list[TapResult], path: str | os.PathLike) -> None:
    """One entry per compared npz key, keyed by that key."""
    data = {}
    for r in results:
        e = r.to_json()
        data[e.pop("key")] = e
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def format_results(results: list[TapResult]) -> str:
    w = max([len(r.key) for r in results] + [10])
    lines = [f"{'tap':<{w}}  {'max abs err':>11}  {'rel err':>9}  {'tolerance':>9}  verdict  note"]
    for r in results:
        lines.append(f"{r.key:<{w}}  {r.max_abs_err:>11.3e}  {r.max_rel_err:>9.2e}  {r.tolerance:>9.2e}  "
                     f"{'pass' if r.passed else 'FAIL':<7}  {r.note}")
    n_fail = sum(not r.passed for r in results)
    lines.append(f"{len(results)} taps compared, {len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)
