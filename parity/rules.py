"""The parity rules: when is a tensor of ours equal to the official one?

One rule for every command and test (``effdet-parity golden``, ``compare``, ``record``'s check,
``convert-ckpt --verify``, the demo and the pytest suites), in two precisions.

**fp32** (the recordings in ``shared/golden/<variant>/``, live ``compare``): a tensor passes when

    ``err <= max(REL_TOL · (1 + max|ref|),  NOISE_FACTOR · gap32)``

``err = max|ours - ref|``; ``gap32 = max|ours_fp32 - ours_fp64|`` at the same tap, measured by running a
float64 copy of our model on the same input. Why: fp32 through a deep network accumulates rounding
that grows with depth — deep BiFPN stacks and ``sum`` fusion amplify it far beyond any fixed number
(measured on recordings made like ``shared/golden``: d3 ``box_net/level7`` ours−official 4.2e-4,
official−exact 3.8e-4, ours−exact 3.8e-4; d7x ``fpn/cell7`` 1.0e-2 / 7.8e-3 / 4.8e-3). Two correct
fp32 implementations each sit about their own ``gap32`` away from exact arithmetic, so their
difference is bounded by the sum: the official gap was at most 1.6× ours at every failing tap
measured (d3, d5, lite2, d7x), hence ``NOISE_FACTOR = 3``. ``gap32`` measures rounding alone — a
wrong layer moves the fp32 and the fp64 run alike — so it cannot excuse a real mistake, which is
orders of magnitude larger (raw instead of EMA weights: 8.2 on the class logits; a BN epsilon of
1e-5 instead of 1e-3 in one block: ~1e-2). ``REL_TOL = 1e-4`` is the floor for shallow taps where
both runs round alike (the ``1 +`` keeps it meaningful for taps near zero).

**Detections** end to end (our network + our post-processing vs the official rows): matched one to
one (same class; ``|Δscore| <= max(1e-5, 6·σ_score)``; IoU ≥ 0.9999 or every coordinate within
``max(1e-4·(1 + max|box|), 6·σ_box)``; rows within the score gate of the last kept score are ties at the
cut-off), where ``(σ_score, σ_box)`` is the largest difference between our post-processing on our fp32
heads and on our float64 heads rounded to fp32 — the detections' own fp32 noise. A detection row
carries one anchor's box codes through ``exp``, and the max over 100 such rows spreads wider than a
tensor's max: measured over d0/d1/lite0 (random, chelsea, img1; both detection paths), the official
rows sit at most 2.2× ``σ_score`` and 3.5× ``σ_box`` (d1 COCO-eval path, random input, 3000-px boxes:
0.76 px) from ours where the fixed part does not already cover it, hence ``DETECTION_NOISE_FACTOR =
6``. Our post-processing fed the OFFICIAL heads is bit-exact and is matched strictly (1e-5, IoU
0.9999); both checks decide.

**float64** (``shared/golden/fp64/``: the official model run with the Keras policy 'float64'): our
model runs in float64 (``model.double()``) and a tensor passes when

    ``err <= max(FP64_REL_FLOOR · (1 + max|ref|),  FP64_NOISE_FACTOR · noise64)``,
    ``noise64 = max(gap32 · U64 / U32,  gap_ulp)``

``gap32 · U64/U32`` scales our measured fp32 rounding to float64's unit roundoff (rounding error is
linear in the unit roundoff while it stays small); ``gap_ulp = max|ours64(x) - ours64(x')|`` with
``x'`` the input moved by one ulp (random sign) measures the network's own amplification of
float64 rounding, which dominates where the network is chaotic (d7x's random input: ~1e-8 at the
last cells, where the fp32 gap saturates and the scaled estimate falls short). Measured on the
official float64 recordings (d0, lite0, d6; random and chelsea; every tap): ours−official lies at
0.5–4.3× ``noise64`` (the largest at d6's first backbone level on chelsea, where TF's unfused float64
BN rounds differently), and 4e-16…3e-11 absolute; ``FP64_NOISE_FACTOR = 10`` leaves a 2.3× margin.
A wrong layer is 1e6–1e12 times larger (the broken models of ``tests/test_fp64_parity.py``).
``FP64_REL_FLOOR = 2**-50`` (8 ulps of the tap's scale) covers taps whose noise rounds to zero.
"""
from __future__ import annotations

import numpy as np

__all__ = ["FP64_NOISE_FACTOR", "FP64_REL_FLOOR", "IOU_MIN", "NOISE_FACTOR", "REL_TOL", "SCORE_TOL", "U32", "U64", "DETECTION_NOISE_FACTOR",
           "fp64_noise", "is_float64_reference", "tensor_bounds"]

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # unit roundoff of float64
REL_TOL = 1e-4
NOISE_FACTOR = 3.0
FP64_NOISE_FACTOR = 10.0
FP64_REL_FLOOR = 2.0 ** -50
SCORE_TOL = 1e-5  # detection scores (post-processing on the same heads is bit-exact)
DETECTION_NOISE_FACTOR = 6.0  # end-to-end detections: see the module docstring
IOU_MIN = 0.9999


def tensor_bounds(scale: float, noise: float | None, float64: bool = False) -> tuple[float, float | None]:
    """``(rule tolerance, noise tolerance)`` of a tensor whose reference has ``max|ref| = scale``.

    ``noise``: ``gap32`` (fp32 rule) or ``noise64`` (float64 rule); ``None`` when not measured, which
    leaves only the fixed part. A tap passes when its error is within the larger of the two.
    """
    if float64:
        return FP64_REL_FLOOR * (1.0 + scale), None if noise is None else FP64_NOISE_FACTOR * noise
    return REL_TOL * (1.0 + scale), None if noise is None else NOISE_FACTOR * noise


def fp64_noise(gap32: float, gap_ulp: float) -> float:
    """The float64 rounding noise of our model at a tap (see the module docstring)."""
    return max(gap32 * (U64 / U32), gap_ulp)


def is_float64_reference(ref) -> bool:
    """A reference recorded in float64: its network input (random or preprocessed) is float64."""
    for k in ref:
        if k == "input/random" or (k.startswith("input/") and k.endswith("_preprocessed")):
            return np.asarray(ref[k]).dtype == np.float64
    return False
