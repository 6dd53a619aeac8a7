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

from effdet_torch.detector import Detector
from effdet_torch.model import EfficientDet
from effdet_torch.postprocess import flatten_outputs, postprocess_global, postprocess_per_class, pre_nms_global
from effdet_torch.preprocess import preprocess_image
from effdet_torch.taps import record_taps

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


def rel_tol(key: str) -> float:
    """The relative tolerance of a golden key (its case decides)."""
    return RANDOM_REL_TOL if key.split("/")[0] == "random" else REL_TOL


def _tensor_result(key: str, ref: np.ndarray, ours: np.ndarray, note: str = "") -> TapResult:
    ref = np.asarray(ref, np.float64)
    ours = np.asarray(ours, np.float64)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    tol = rel_tol(key) * (1.0 + scale)
    if ref.shape != ours.shape:
        return TapResult(key, tuple(ref.shape), float("inf"), float("inf"), tol, False,
                         f"shape {tuple(ours.shape)} != official {tuple(ref.shape)}")
    err = float(np.abs(ref - ours).max()) if ref.size else 0.0
    ok = bool(np.isfinite(ours).all()) and err <= tol
    return TapResult(key, tuple(ref.shape), err, err / scale if scale else err, tol, ok, note)


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

    On CUDA the comparison runs in strict fp32 (no TF32), like the CPU recordings.
    """
    with strict_fp32():
        return _run_golden(model, npz_path, image_size, seed, device)


def _run_golden(model: EfficientDet, npz_path: str | os.PathLike, image_size: tuple[int, int] | None,
                seed: int, device: str | torch.device) -> list[TapResult]:
    npz = np.load(npz_path)
    keys = list(npz.keys())
    model = model.to(device).eval()
    cfg = model.config
    results: list[TapResult] = []
    hw = image_size
    if hw is None:
        for k in ("input/random", *[k for k in keys if k.endswith("_preprocessed")]):
            if k in npz:
                hw = tuple(npz[k].shape[1:3])
                break
        else:
            hw = tuple(cfg.image_size)
    det = Detector(model, hw)
    anchors = det.anchors(hw)
    if "anchors" in npz:
        results.append(_tensor_result("anchors", npz["anchors"], anchors.cpu().numpy()))
    for case in golden_cases(keys):
        if case == "random":
            if "input/random" in npz:
                x_nhwc = npz["input/random"]
            else:
                x_nhwc = np.random.default_rng(seed).standard_normal((1, hw[0], hw[1], 3)).astype(np.float32)
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).contiguous().to(device)
            scale, eval_scale = None, 1.0
        else:
            raw = npz[f"input/{case}_raw_uint8"]
            x, s = preprocess_image(raw, hw, cfg.mean_rgb, cfg.stddev_rgb, device)
            scale = eval_scale = float(s)
            if f"input/{case}_preprocessed" in npz:
                results.append(_tensor_result(f"input/{case}_preprocessed", npz[f"input/{case}_preprocessed"],
                                              x.permute(0, 2, 3, 1).cpu().numpy()))
            if f"{case}/image_scale" in npz:
                results.append(_tensor_result(f"{case}/image_scale", npz[f"{case}/image_scale"], np.array([s])))
        with torch.no_grad(), record_taps(model) as taps:
            cls_out, box_out = model(x)
        for name, t in taps.items():
            key = f"{case}/{name}"
            if key in npz:
                results.append(_tensor_result(key, npz[key], t.permute(0, 2, 3, 1).cpu().numpy()))
        cls, box = flatten_outputs(cls_out, box_out, cfg.num_classes)
        boxes, scores, classes0 = pre_nms_global(cls, box, anchors)
        if f"{case}/pre_nms/boxes" in npz:
            results.append(_tensor_result(f"{case}/pre_nms/boxes", npz[f"{case}/pre_nms/boxes"], boxes[0].cpu().numpy()))
        if f"{case}/pre_nms/scores" in npz:
            results.append(_tensor_result(f"{case}/pre_nms/scores", npz[f"{case}/pre_nms/scores"], scores[0].cpu().numpy()))
        if f"{case}/pre_nms/classes0" in npz:
            ref_logits = None
            lv = [f"{case}/class_net/level{l}" for l in cfg.levels]
            if all(k in npz for k in lv):
                ref_logits = np.concatenate([npz[k].reshape(-1, cfg.num_classes) for k in lv])
            results.append(class_tie_result(f"{case}/pre_nms/classes0", npz[f"{case}/pre_nms/classes0"],
                                             classes0[0].cpu().numpy(), ref_logits))
        heads = _official_heads(npz, case, cfg, device, Path(npz_path))
        if f"detections/{case}/scores" in npz:
            d = postprocess_global(cfg, cls, box, anchors, hw, scale)
            o = _np(postprocess_global(cfg, *heads, anchors, hw, scale)) if heads else None
            results += compare_detections(f"detections/{case}", npz, _np(d), int(d.valid_len[0]), o)
        if f"eval_detections/{case}/scores" in npz:
            d = postprocess_per_class(cfg, cls, box, anchors, eval_scale)
            o = _np(postprocess_per_class(cfg, *heads, anchors, eval_scale)) if heads else None
            results += compare_detections(f"eval_detections/{case}", npz, _np(d), int(d.valid_len[0]), o)
    compared = {r.key for r in results}
    for k in keys:  # recorded inputs are not comparisons; anything else left over is reported
        if k not in compared and not k.startswith("input/"):
            results.append(TapResult(k, tuple(npz[k].shape), float("nan"), float("nan"), 0.0, False,
                                     "not compared: no matching tap in this model"))
    return results


def _official_heads(npz, case: str, cfg, device, npz_path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The recorded official class/box outputs of ``case``, flattened like ours (or None).

    ``tensors_chelsea.npz`` records eval detections of the random case computed from the heads
    stored in a sibling file (``tensors.npz``); those are used when one is in the same folder.
    """
    key = f"{case}/class_net/level{cfg.min_level}"
    if key not in npz:
        siblings = [p for p in sorted(npz_path.parent.glob("*.npz")) if p != npz_path]
        found = [z for z in map(np.load, siblings) if key in z]
        if not found:
            return None
        npz = found[0]
    try:
        cls = np.concatenate([npz[f"{case}/class_net/level{l}"].reshape(1, -1, cfg.num_classes) for l in cfg.levels], 1)
        box = np.concatenate([npz[f"{case}/box_net/level{l}"].reshape(1, -1, 4) for l in cfg.levels], 1)
    except KeyError:
        return None
    return torch.from_numpy(cls).to(device), torch.from_numpy(box).to(device)


def _np(d) -> dict[str, np.ndarray]:
    return {"boxes": d.boxes[0].cpu().numpy(), "scores": d.scores[0].cpu().numpy(),
            "classes": d.classes[0].cpu().numpy()}


def write_json(results: list[TapResult], path: str | os.PathLike) -> None:
    """One entry per compared npz key, keyed by that key."""
    data = {}
    for r in results:
        e = asdict(r)
        e.pop("key")
        e["verdict"] = "pass" if r.passed else "FAIL"
        for f in ("max_abs_err", "max_rel_err", "tolerance"):
            if not np.isfinite(e[f]):
                e[f] = None
        data[r.key] = e
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
