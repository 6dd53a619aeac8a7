"""The compiled CPU preprocessing (uint8 → normalise → half-pixel bilinear resize → pad, one pass)
against the torch operations it replaces (the path of float and CUDA inputs).

Expected values: the torch path, itself bit-exact against the official preprocessing on the
recorded chelsea image (``tests/test_golden_parity.py::test_preprocessing_bit_exact``) and
against ``tf.image.resize`` (``tests/test_ops_vs_tf.py``). Same float32 operations in the same
order, so no tolerance: every value bit-identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from effdet_torch.config import get_config  # noqa: E402
from effdet_torch.preprocess import preprocess_image  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 700), w=st.integers(1, 700),
       out=st.sampled_from([(512, 512), (256, 256), (384, 640), (96, 72)]))
def test_compiled_preprocessing_equals_torch_path(seed, h, w, out):
    cfg = get_config("efficientdet-d0")
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x, scale = preprocess_image(img, out, cfg.mean_rgb, cfg.stddev_rgb)  # uint8 on the CPU: compiled
    ref, ref_scale = preprocess_image(img.astype(np.float32), out, cfg.mean_rgb, cfg.stddev_rgb)  # torch ops
    assert x.shape == (1, 3, *out) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, ref) and scale == ref_scale
