"""``NonMaxSuppressionV5`` vectorised in torch: many independent NMS problems at once, CPU or CUDA.

Gives exactly the detections of the scalar reference :func:`effdet_torch.nms.non_max_suppression_v5`
(indices identical, scores bit-identical) for ``score_threshold >= 0``, where every candidate score
is positive so a decay can only lower it. Problems ("groups": images, or image × class) are
concatenated; one loop step selects one box in every group, so the Python loop runs at most
``max_output_size`` times whatever the number of boxes, images or classes.

Why the result is the reference's, step by step. The kernel visits candidates best first from a
queue of stale scores; a visited candidate is multiplied by the decay of each box selected since
its last visit, newest first, in float32, and is selected iff its score did not change. So in one
step (``n`` boxes selected so far):
- a candidate with no pending decay other than exactly 1.0 is "clean": its updated score is its
  stale score (multiplying by 1.0 is exact). Only the best clean candidate of a group can be chosen
  among the clean ones;
- "contenders" are the candidates with a pending decay ≠ 1 whose stale key beats the best clean
  key: the kernel pops all of them before it reaches the best clean one (keys are
  ``(score, -index)``, the queue's order, so ties go to the lower index). Each gets its exact float32
  product (same factors in the same newest-first order; the kernel's stop once ``<= score_threshold``
  cannot change the outcome, see :func:`_decayed`);
- the winner is the largest updated key; exactly the contenders whose stale key exceeds the winner's
  key were popped before it, so only they are updated (and dropped if ``<= score_threshold``); the
  others keep their stale score and pending factors, as in the queue.
Decays that round to exactly 1.0 are never stored, which leaves every product unchanged.

The decay ``exp(scale · iou²)`` must be the C library's ``expf`` bit for bit (one ulp decides ties,
see :mod:`effdet_torch.nms`): :func:`expf_exact` computes ``exp`` in float64 and rounds it to
float32, which is the correctly rounded result; glibc's ``expf`` has a maximal error of 0.502 ulp, so
it can only differ where ``exp(x)`` lies within 0.002 ulp of a midpoint between two floats
(measured over all 1.07e9 floats in [-2, 0], glibc 2.36: 68 848 differ, all within 0.0017 ulp).
Inputs within 0.01–0.02 ulp of a midpoint (~0.8 % of them) are recomputed with the scalar C ``expf``.

Denormals: TF's kernel runs with them flushed to zero (:mod:`effdet_torch.float_env`), so a score
below ``FLT_MIN`` — given, or decayed there — is 0 and, with a score threshold of 0, dropped. Here
the scores are flushed explicitly, on every device alike (given ones, and each decayed product: its
factors lie in [0, 1], so flushing the final product equals flushing every partial one). Box
geometry stays IEEE: coordinates within 1e-38 of each other are not boxes. With a threshold
``>= FLT_MIN`` (the official 0.001) nothing changes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .nms import expf as _libm_expf

__all__ = ["expf_exact", "batched_nms_v5"]

#: relative band around exp(x) in which a float32 rounding midpoint sends x to the C library:
#: 0.01–0.02 ulp, ≥ 5× the 0.002 ulp by which glibc's expf may miss the correctly rounded result.
_DELTA = 0.01 * 2.0**-23
_NEG = torch.iinfo(torch.int64).min
_LOW = (1 << 31) - 1
_TINY = float(np.finfo(np.float32).tiny)


def _flushed(scores: Tensor) -> Tensor:
    """Non-negative float32 scores with denormals flushed to zero, as TF's CPU kernels see them."""
    return torch.where(scores < _TINY, 0.0, scores)


def expf_exact(x: Tensor) -> Tensor:
    """float32 ``exp`` of a float32 tensor, bit-identical to the C library's scalar ``expf``."""
    y = torch.exp(x.double())
    # y·(1 ± δ) round to different floats iff a rounding midpoint lies within δ·y of y, i.e. within
    # 0.01–0.02 ulp (ulp ∈ [2⁻²⁴, 2⁻²³]·y): only there may the C library round the other way.
    hard = torch.nonzero((y * (1 + _DELTA)).float() != (y * (1 - _DELTA)).float()).reshape(-1)  # NaN: hard
    f = y.float()
    if hard.numel():
        f[hard] = torch.from_numpy(_libm_expf(x[hard].cpu().numpy())).to(x.device)
    return f


def _keys(scores: Tensor, local: Tensor) -> Tensor:
    """int64 sort keys ``(score, -index)`` of positive float32 scores: larger key = popped first."""
    return (scores.view(torch.int32).to(torch.int64) << 32) | (_LOW - local)


def _key_score(key: Tensor) -> Tensor:
    """The float32 score held in the high half of :func:`_keys`."""
    return (key >> 32).to(torch.int32).view(torch.float32)


def _decayed(score: Tensor, pend: Tensor, npend: Tensor, newest: Tensor) -> Tensor:
    """Sequential float32 products ``score · w_newest · … · w_oldest`` of the pending decays.

    Rows are padded with 1.0 (exact). No early stop at the threshold is needed: with a positive
    score and decays in ``[0, 1]`` (or NaN) a product that fell ``<= threshold`` stays there, and
    such a candidate is dropped whatever its final value.
    """
    width = int(npend.max())
    steps = torch.arange(width, device=pend.device)
    flat = newest[:, None] + npend[:, None] - steps  # [c, width] positions in pend.view(-1)
    w = torch.where(steps < npend[:, None], pend.view(-1)[flat.clamp_min(0)], 1.0)
    if score.device.type == "cpu":  # one C loop, sequential in float32 (torch.cumprod accumulates in double)
        cols = np.concatenate([score.numpy()[:, None], w.numpy()], axis=1)
        return torch.from_numpy(np.multiply.accumulate(cols, axis=1)[:, -1].copy())
    u = score
    for col in w.t():  # [c] per step: the Python loop runs over the longest pending list only
        u = u * col
    return u


def _geometry(boxes: Tensor) -> Tensor:
    """``[M, 4]`` boxes → ``[M, 5]`` (ymin, xmin, ymax, xmax, area): corners ordered per box, as NMSV5."""
    y1 = torch.minimum(boxes[:, 0], boxes[:, 2]); x1 = torch.minimum(boxes[:, 1], boxes[:, 3])
    y2 = torch.maximum(boxes[:, 0], boxes[:, 2]); x2 = torch.maximum(boxes[:, 1], boxes[:, 3])
    return torch.stack([y1, x1, y2, x2, (y2 - y1) * (x2 - x1)], dim=-1)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of geometry rows ``a [..., 5]`` and ``b [..., 5]`` (broadcast), float32, bit-identical to
    :func:`effdet_torch.nms.iou_one_to_many` (same operations in the same order; 0 if an area <= 0)."""
    zero = torch.zeros((), dtype=torch.float32, device=a.device)
    ih = torch.maximum(torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]), zero)
    iw = torch.maximum(torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]), zero)
    inter = ih * iw
    iou = inter / ((a[..., 4] + b[..., 4]) - inter)
    return torch.where((a[..., 4] <= 0) | (b[..., 4] <= 0), zero, iou)


class _Decay:
    """The per-pair factor: ``expf(scale · iou · iou)`` (soft) or 0 above the IoU threshold (hard)."""

    def __init__(self, sigma: float, iou_threshold: float, device: torch.device) -> None:
        self.soft = sigma > 0
        self.scale = torch.tensor(np.float32(-0.5) / np.float32(sigma) if self.soft else 0.0,
                                  dtype=torch.float32, device=device)
        self.iou_threshold = float(np.float32(iou_threshold))

    def __call__(self, iou: Tensor) -> Tensor:
        if self.soft:
            return expf_exact((self.scale * iou) * iou)  # float32 products in the kernel's order
        return torch.where(iou > self.iou_threshold, 0.0, 1.0).to(torch.float32)


def batched_nms_v5(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, max_output_size: int,
                   iou_threshold: float = 0.5, score_threshold: float = 0.0,
                   soft_nms_sigma: float = 0.0, window: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`_batched_nms_v5`. On the CPU it runs on one intra-op thread: its tensors are small
    and a parallel region per op made it 11× slower on a loaded 2-core machine (measured)."""
    if boxes.device.type != "cpu" or torch.get_num_threads() == 1:
        return _batched_nms_v5(boxes, scores, groups, num_groups, max_output_size, iou_threshold,
                               score_threshold, soft_nms_sigma, window)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _batched_nms_v5(boxes, scores, groups, num_groups, max_output_size, iou_threshold,
                               score_threshold, soft_nms_sigma, window)
    finally:
        torch.set_num_threads(threads)


def _batched_nms_v5(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, max_output_size: int,
                    iou_threshold: float, score_threshold: float, soft_nms_sigma: float,
                    window: int) -> tuple[Tensor, Tensor, Tensor]:
    """NMSV5 on every group at once.

    ``boxes [M, 4]``, ``scores [M]`` (float32), ``groups [M]`` (int64 in ``[0, num_groups)``; within a
    group the lower position is the lower NMSV5 index). Returns ``indices [G, K]`` (positions in
    ``M``, ``-1`` past the end), ``scores [G, K]`` (decayed, 0 past the end), ``counts [G]``.

    Only each group's ``window`` best candidates (by original score) are worked on; a group's window
    doubles whenever its step winner would not beat its best candidate outside it (the kernel
    would have popped that one), and the newcomers get the decays of all boxes selected so far.
    """
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if not score_threshold >= 0:
        raise ValueError(f"batched_nms_v5 needs score_threshold >= 0 (positive scores), got {score_threshold}")
    dev = boxes.device
    k = max(int(max_output_size), 0)
    g = int(num_groups)
    out_idx = torch.full((g, k), -1, dtype=torch.int64, device=dev)
    out_scores = torch.zeros((g, k), dtype=torch.float32, device=dev)
    counts = torch.zeros((g,), dtype=torch.int64, device=dev)
    thr = float(np.float32(score_threshold))
    decay = _Decay(soft_nms_sigma, iou_threshold, dev)
    scores = scores.to(torch.float32)
    cand = torch.nonzero(_flushed(scores) > thr).reshape(-1)  # a denormal score reads as 0
    if k == 0 or cand.numel() == 0:
        return out_idx, out_scores, counts

    # All candidates ordered by (group, key descending); rank = place within the group.
    ckey = _keys(scores[cand], cand)
    order = torch.argsort(ckey, descending=True)
    order = order[torch.argsort(groups[cand][order], stable=True)]
    c_pos, c_key = cand[order], ckey[order]
    c_grp = groups[c_pos].to(torch.int64)
    gsize = torch.bincount(c_grp, minlength=g)
    gstart = torch.cumsum(gsize, 0) - gsize
    c_rank = torch.arange(c_pos.numel(), device=dev) - gstart[c_grp]
    c_geom = _geometry(boxes[c_pos].to(torch.float32))
    neg = torch.full((g,), _NEG, dtype=torch.int64, device=dev)
    steps_k = torch.arange(k, device=dev)
    sel_geom = torch.zeros((g, k, 5), dtype=torch.float32, device=dev)
    lim = torch.zeros((g,), dtype=torch.int64, device=dev)

    # The window (ordered by position, so that ties in keys resolve as in the kernel).
    key = c_key[:0]; grp = c_grp[:0]; pos = c_pos[:0]; geom = c_geom[:0]  # key _NEG: gone
    pend = torch.empty((0, k), dtype=torch.float32, device=dev)  # pending decays, oldest first
    npend = torch.zeros((0,), dtype=torch.int64, device=dev)

    def best_outside() -> Tensor:
        nxt = (gstart + lim).clamp_max(c_pos.numel() - 1)
        return torch.where(lim < gsize, c_key[nxt], _NEG)

    def enter(new_lim: Tensor) -> None:
        nonlocal key, grp, pos, geom, pend, npend, lim
        ent = torch.nonzero((c_rank >= lim[c_grp]) & (c_rank < new_lim[c_grp])).reshape(-1)
        lim = new_lim
        if ent.numel() == 0:
            return
        e_grp, e_geom = c_grp[ent], c_geom[ent]
        n = counts[e_grp]
        e_pend = torch.ones((ent.numel(), k), dtype=torch.float32, device=dev)
        e_npend = torch.zeros((ent.numel(),), dtype=torch.int64, device=dev)
        if int(n.max()) > 0:  # decays of the boxes selected so far, oldest first
            iou = _iou(e_geom[:, None, :], sel_geom[e_grp])
            hit = torch.nonzero((steps_k < n[:, None]) & (iou != 0), as_tuple=True)
            e_pend[hit] = decay(iou[hit])
            keep = (steps_k < n[:, None]) & (e_pend != 1)
            e_pend = e_pend.gather(1, torch.argsort((~keep).to(torch.int8), dim=1, stable=True))
            e_npend = keep.sum(1)
        p = torch.argsort(torch.cat([pos, c_pos[ent]]))
        key = torch.cat([key, c_key[ent]])[p]; grp = torch.cat([grp, e_grp])[p]
        pos = torch.cat([pos, c_pos[ent]])[p]; geom = torch.cat([geom, e_geom])[p]
        pend = torch.cat([pend, e_pend])[p]; npend = torch.cat([npend, e_npend])[p]

    enter(torch.minimum(gsize, torch.full_like(gsize, max(window, 1))))
    out = best_outside()
    while True:
        dirty = npend > 0
        best_clean = neg.scatter_reduce(0, grp, torch.where(dirty, _NEG, key), "amax")
        cont = torch.nonzero(dirty & (key > best_clean[grp])).reshape(-1)
        best = best_clean
        if cont.numel():
            u = _flushed(_decayed(_key_score(key[cont]), pend, npend[cont], cont * k - 1))
            ukey = torch.where(u > thr, _keys(u, pos[cont]), _NEG)  # dropped: gone
            best = best_clean.scatter_reduce(0, grp[cont], ukey, "amax")
        open_ = counts < k
        need = open_ & (out > best)
        if bool(need.any()):  # the kernel would pop a candidate outside the window first: widen it
            enter(torch.where(need, torch.minimum(gsize, 2 * lim), lim))
            out = best_outside()
            continue
        if cont.numel():  # exactly the contenders popped before the winner are updated
            visited = key[cont] > best[grp[cont]]
            vis = cont[visited]
            key[vis] = ukey[visited]
            npend[vis] = 0
        win_groups = torch.nonzero((best != _NEG) & open_).reshape(-1)
        if win_groups.numel() == 0:
            break
        wkey = best[win_groups]
        wpos = _LOW - (wkey & 0xFFFFFFFF)
        win = torch.searchsorted(pos, wpos)
        slot = counts[win_groups]
        out_idx[win_groups, slot] = wpos
        out_scores[win_groups, slot] = _key_score(wkey)
        sel_geom[win_groups, slot] = geom[win]
        counts[win_groups] += 1
        key[win] = _NEG
        full = counts >= k
        if bool(full[win_groups].any()):
            key = torch.where(full[grp], _NEG, key)
        alive = key != _NEG
        if int(alive.sum()) < key.numel() // 2:  # compact now and then (copying pend every step would dominate)
            idx = torch.nonzero(alive).reshape(-1)
            key, grp, pos, geom, alive = key[idx], grp[idx], pos[idx], geom[idx], alive[idx]
            pend, npend = pend[idx], npend[idx]
        # the new selection's decay for every remaining candidate of its group
        wgeom = torch.zeros((g, 5), dtype=torch.float32, device=dev)
        wgeom[win_groups] = sel_geom[win_groups, slot]
        has = torch.zeros((g,), dtype=torch.bool, device=dev)
        has[win_groups] = True
        iou = _iou(geom, wgeom[grp])
        touched = torch.nonzero(alive & has[grp] & (iou != 0)).reshape(-1)  # NaN != 0: kept (NaN decay)
        if touched.numel():
            w = decay(iou[touched])
            ne = w != 1
            touched, w = touched[ne], w[ne]
            pend[touched, npend[touched]] = w
            npend[touched] += 1
    return out_idx, out_scores, counts
