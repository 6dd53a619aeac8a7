"""TensorFlow's CPU float environment (effdet_torch.float_env): denormals flushed on every thread.

Expected values: TensorFlow's own results for the same float32 operations (it runs its CPU kernels
with FTZ and DAZ), and first principles — ``1e-38 · 0.01 = 1e-40`` is below ``FLT_MIN`` and flushes
to exactly 0; IEEE arithmetic keeps it. An elementwise op over 4 M elements is split across the
OpenMP team, so an all-zero result means every thread flushes (``torch.set_flush_denormal`` alone,
on the calling thread, leaves half of them denormal once the team exists: measured 0.5).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from effdet_torch import create_model, float_env
from effdet_torch.float_env import flush_denormals, flushes_denormals
from effdet_torch.model import iter_network

TINY = float(np.finfo(np.float32).tiny)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    (torch.ones(4_000_000) * 2).sum()  # the team exists before the block, as in any real process
    yield
    torch.set_num_threads(before)


def _denormal_fraction(y: torch.Tensor) -> float:
    return float(((y != 0) & (y.abs() < TINY)).float().mean())


@pytest.mark.skipif(float_env._TEAM is None, reason="no OpenMP runtime with GOMP_parallel on x86-64 Linux: "
                    "only the calling thread can be set here")
def test_every_thread_flushes_inside_and_is_restored_after(two_threads):
    x = torch.full((4_000_000,), 1e-38)
    assert _denormal_fraction(x * 0.01) == 1.0 and not flushes_denormals()
    with flush_denormals("cpu"):
        assert flushes_denormals()
        assert torch.count_nonzero(x * 0.01) == 0  # every thread of the team flushes
        with flush_denormals("cpu"):  # nested: a no-op that must not restore early
            pass
        assert torch.count_nonzero(x * 0.01) == 0
    assert _denormal_fraction(x * 0.01) == 1.0 and not flushes_denormals()


def test_restored_after_an_exception(two_threads):
    x = torch.full((4_000_000,), 1e-38)
    with pytest.raises(ValueError):
        with flush_denormals("cpu"):
            raise ValueError
    assert _denormal_fraction(x * 0.01) == 1.0


def test_other_devices_are_left_alone():
    with flush_denormals("meta"):
        assert not flushes_denormals()


def test_iter_network_runs_in_the_environment(two_threads):
    """The default inference forward (Detector, effdet-infer/eval/bench) runs with denormals flushed."""
    model = create_model("d0", image_size=64).eval()
    seen = []
    model.backbone.register_forward_hook(lambda *_: seen.append(flushes_denormals()))
    with torch.no_grad():
        list(iter_network(model, torch.zeros(2, 3, 64, 64)))
    assert seen == [True, True] and not flushes_denormals()


@pytest.mark.tf
def test_matches_tensorflow():
    """The same float32 operations give TensorFlow's results bit for bit inside the block."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is the oracle", exc_type=ImportError)
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 2.0, (1, 32, 32, 8)) * 1e-38).astype(np.float32)  # normal, products denormal
    w = rng.uniform(-0.05, 0.05, (3, 3, 8, 8)).astype(np.float32)
    d = np.float32(1e-40) * np.ones(1000, np.float32)  # denormal operands: DAZ reads them as 0
    want = {"mul": (tf.constant(x) * 0.01).numpy(),
            "daz": (tf.constant(d) * tf.constant(np.float32(1e30))).numpy(),
            "conv": tf.nn.conv2d(tf.constant(x), tf.constant(w), 1, "SAME").numpy()}
    assert not want["daz"].any() and not want["mul"].any()  # the oracle flushes: the test can fail

    def ours():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        conv = torch.nn.functional.conv2d(xt, torch.from_numpy(w).permute(3, 2, 0, 1), padding=1)
        return {"mul": (torch.from_numpy(x) * 0.01).numpy(),
                "daz": (torch.from_numpy(d) * np.float32(1e30)).numpy(),
                "conv": conv.permute(0, 2, 3, 1).numpy()}

    plain = ours()
    assert plain["daz"].all(), "IEEE keeps denormal operands: outside the block torch differs from TF"
    with flush_denormals("cpu"):
        got = ours()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
