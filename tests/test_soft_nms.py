"""The vectorised NMSV5 (effdet_torch.soft_nms) against TensorFlow's op and the scalar reference.

Expected values: ``tf.raw_ops.NonMaxSuppressionV5`` (the official post-processing calls it) where
TensorFlow is installed, and always the scalar reference ``effdet_torch.nms`` (itself checked
bit-exactly against TF in tests/test_ops_vs_tf.py). Indices must be identical and scores
bit-identical: the vectorised code multiplies the same float32 factors in the same order and
uses an ``expf`` bit-identical to the C library's, so no tolerance is needed. ``tiny`` scales the
scores to ~1e-36, where decays (and some given scores) fall below FLT_MIN: TF flushes those to 0
(its CPU float environment; without the flush 506 of 900 such cases differed from TF, measured).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from effdet_torch import nms as nms_mod  # noqa: E402
from effdet_torch.nms_cpu import expf_compiled, nms_v5_groups  # noqa: E402
from effdet_torch.soft_nms import batched_nms_v5, expf_exact  # noqa: E402

from .helpers import clustered_boxes  # noqa: E402


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _scores(rng: np.random.Generator, n: int, tied: bool, tiny: bool = False) -> np.ndarray:
    if tied:  # many exact ties, broken by the lower index
        s = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)
    else:
        s = (rng.permutation(n) / max(n, 1) + rng.uniform(0, 1e-4, n)).astype(np.float32)
    return s * np.float32(1e-36) if tiny else s  # scores down to FLT_MIN (1.2e-38) and below


def _problems(seed: int, n_groups: int, tied: bool, nonfinite: bool = False, tiny: bool = False):
    rng = np.random.default_rng(seed)
    # a few huge/inf/NaN boxes with ``nonfinite``: decoded codes whose exp overflowed
    return [(clustered_boxes(rng, n, dup=0.08, nonfinite=0.05 if nonfinite else 0.0), _scores(rng, n, tied, tiny))
            for n in rng.integers(0, 160, n_groups)]


def _run_batched(problems, max_out, iou, thr, sigma, device="cpu", window=256, impl="torch"):
    """``impl``: "torch" (the vectorised version, CUDA's) or "compiled" (the CPU kernel)."""
    boxes = torch.from_numpy(np.concatenate([b for b, _ in problems])).to(device)
    scores = torch.from_numpy(np.concatenate([s for _, s in problems])).to(device)
    groups = torch.cat([torch.full((len(s),), g, dtype=torch.int64) for g, (_, s) in enumerate(problems)]).to(device)
    if impl == "compiled":
        idx, sc, cnt = (torch.from_numpy(a) for a in nms_v5_groups(boxes.numpy(), scores.numpy(), groups.numpy(),
                                                                   len(problems), max_out, iou, thr, sigma))
    else:
        idx, sc, cnt = batched_nms_v5(boxes, scores, groups, len(problems), max_out, iou, thr, sigma, window=window)
    starts = np.cumsum([0] + [len(s) for _, s in problems])
    out = []
    for g in range(len(problems)):
        n = int(cnt[g])
        assert (idx[g, n:] == -1).all() and (sc[g, n:] == 0).all()
        out.append((idx[g, :n].cpu().numpy() - starts[g], sc[g, :n].cpu().numpy()))
    return out


def _assert_same(got, want, msg):
    for g, ((gi, gs), (wi, ws)) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(gi, wi, err_msg=f"group {g}: {msg}")
        np.testing.assert_array_equal(gs, ws, err_msg=f"group {g}: {msg}")  # bit-exact


CFG = dict(seed=st.integers(0, 2**32 - 1), n_groups=st.integers(1, 6), max_out=st.integers(1, 120),
           iou=st.sampled_from([0.3, 0.5, 0.7]), thr=st.sampled_from([0.0, 0.001, 0.1]),
           sigma=st.sampled_from([0.0, 0.25, 0.5]), tied=st.booleans())


@_settings(50)
@given(window=st.sampled_from([1, 3, 256]), nonfinite=st.booleans(), tiny=st.booleans(), **CFG)
def test_batched_equals_reference(seed, n_groups, max_out, iou, thr, sigma, tied, window, nonfinite, tiny):
    """Oracle: the scalar reference, per group. ``window`` 1/3 forces the window to grow often."""
    problems = _problems(seed, n_groups, tied, nonfinite, tiny and thr == 0)
    want = [nms_mod.non_max_suppression_v5(b, s, max_out, iou, thr, sigma) for b, s in problems]
    got = _run_batched(problems, max_out, iou, thr, sigma, window=window)
    _assert_same(got, want, f"max={max_out} iou={iou} thr={thr} sigma={sigma} window={window}")


@_settings(50)
@given(nonfinite=st.booleans(), seed=CFG["seed"], n_groups=CFG["n_groups"], max_out=CFG["max_out"], iou=CFG["iou"],
       thr=st.sampled_from([float("-inf"), -0.5, 0.0, 0.001, 0.1]), sigma=CFG["sigma"], tied=CFG["tied"])
def test_compiled_equals_reference(seed, n_groups, max_out, iou, thr, sigma, tied, nonfinite):
    """The CPU kernel against the scalar reference, incl. negative thresholds and inf/NaN boxes."""
    problems = _problems(seed, n_groups, tied, nonfinite)
    want = [nms_mod.non_max_suppression_v5(b, s, max_out, iou, thr, sigma) for b, s in problems]
    got = _run_batched(problems, max_out, iou, thr, sigma, impl="compiled")
    _assert_same(got, want, f"max={max_out} iou={iou} thr={thr} sigma={sigma}")


@pytest.mark.tf
@_settings(40)
@given(impl=st.sampled_from(["torch", "compiled", "reference"]), tiny=st.booleans(), **CFG)
def test_batched_equals_tensorflow_nmsv5(seed, n_groups, max_out, iou, thr, sigma, tied, impl, tiny):
    """Oracle: TensorFlow's NonMaxSuppressionV5 on each group (indices identical, scores bit-exact)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is the oracle", exc_type=ImportError)
    problems = _problems(seed, n_groups, tied, tiny=tiny and thr == 0)  # thr > 0 would leave no candidate
    want = []
    for b, s in problems:
        idx, sc, valid = tf.raw_ops.NonMaxSuppressionV5(
            boxes=tf.constant(b.reshape(-1, 4), tf.float32), scores=tf.constant(s, tf.float32),
            max_output_size=tf.constant(max_out, tf.int32), iou_threshold=tf.constant(iou, tf.float32),
            score_threshold=tf.constant(thr, tf.float32), soft_nms_sigma=tf.constant(sigma, tf.float32),
            pad_to_max_output_size=False)
        v = int(valid.numpy())
        want.append((idx.numpy()[:v].astype(np.int64), sc.numpy()[:v]))
    if impl == "reference":
        got = [nms_mod.non_max_suppression_v5(b, s, max_out, iou, thr, sigma) for b, s in problems]
    else:
        got = _run_batched(problems, max_out, iou, thr, sigma, impl=impl)
    _assert_same(got, want, f"{impl}: max={max_out} iou={iou} thr={thr} sigma={sigma} tiny={tiny}")


def test_real_image_candidates_equal_reference():
    """The bundled chelsea recording's 12276 pre-NMS boxes (official decode), the inference NMS."""
    from .conftest import PROJECT_GOLDEN

    z = np.load(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_chelsea.npz")
    b, s = z["chelsea/pre_nms/boxes"], z["chelsea/pre_nms/scores"]
    want = nms_mod.non_max_suppression_v5(b, s, 100, 0.5, 0.001, 0.25)
    got = _run_batched([(b, s)], 100, 0.5, 0.001, 0.25, window=64)
    _assert_same(got, [want], "chelsea")
    _assert_same(_run_batched([(b, s)], 100, 0.5, 0.001, 0.25, impl="compiled"), [want], "chelsea, compiled")
    assert len(want[0]) == 100


@pytest.mark.parametrize("tied", [False, True])
def test_near_uniform_scores_equal_reference(tied):
    """An untrained network's case: every d0 anchor at 256² (12 276 boxes, the official grid) a
    candidate, all scores within 1e-5 of each other (optionally rounded into exact ties), so nearly
    every pop is decayed and re-queued: the compiled kernel's two queues and vectorised IoUs against
    the reference, indices identical and scores bit-exact."""
    from effdet_torch.anchors import generate_anchors
    from effdet_torch.config import get_config

    rng = np.random.default_rng(7)
    boxes = generate_anchors(get_config("efficientdet-d0", image_size=256)).astype(np.float32)
    boxes = boxes + rng.normal(0, 2, boxes.shape).astype(np.float32)
    scores = (0.0104 + rng.uniform(-1e-5, 1e-5, len(boxes))).astype(np.float32)
    if tied:
        scores = np.round(scores, 6).astype(np.float32)
    want = nms_mod.non_max_suppression_v5(boxes, scores, 100, 0.5, 0.001, 0.25)
    _assert_same(_run_batched([(boxes, scores)], 100, 0.5, 0.001, 0.25, impl="compiled"), [want], "near-uniform")
    assert len(want[0]) == 100


def test_expf_exact_is_the_c_library_expf():
    """Every kind of input of the decay (``-2·iou²`` ∈ [-2, 0]): random bit patterns, so each binade
    is hit. Measured exhaustively over all 1.07e9 floats in [-2, 0] (glibc 2.36): 68 848 inputs where
    the C expf differs from the correctly rounded value, all within 0.0017 ulp of a midpoint, so the
    0.01-ulp band that asks the C library catches every one. This sample must contain some."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0x80000000, 0xC0000000, 400_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), rng.uniform(-2, 0, 400_000).astype(np.float32),
                        np.float32([0.0, -0.0, -2.0, -2.0**-25, -2.0**-24, np.nan])])
    want = nms_mod.expf(x)
    rounded64 = np.exp(x.astype(np.float64)).astype(np.float32)
    if sys.platform.startswith("linux"):  # glibc: some inputs need the fallback (measured: ~6e-5 of them)
        assert (want[:-1] != rounded64[:-1]).sum() > 0
    got = expf_exact(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(x)], want.view(np.uint32)[~np.isnan(x)])
    assert np.isnan(got[-1])
    # the compiled kernel's float32 exp is the C library's too (numba calls libm's expf)
    got = expf_compiled(x)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(x)], want.view(np.uint32)[~np.isnan(x)])
    assert np.isnan(got[-1])


def test_rejects_negative_threshold():
    with pytest.raises(ValueError, match="score_threshold >= 0"):
        batched_nms_v5(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.int64), 1, 5, 0.5, -1.0, 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_reference():
    for seed in range(20):
        problems = _problems(seed, 5, tied=seed % 2 == 0, nonfinite=seed % 3 == 0)
        want = [nms_mod.non_max_suppression_v5(b, s, 100, 0.5, 0.001, 0.25) for b, s in problems]
        _assert_same(_run_batched(problems, 100, 0.5, 0.001, 0.25, device="cuda", window=8), want, f"seed {seed}")
