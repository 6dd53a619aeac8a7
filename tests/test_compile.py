"""``--compile`` (``effdet_torch.model.compile_network``): inductor's fused network gives the eager
network's head outputs up to fp32 rounding (the post-processing after it is unchanged).

The allowance is our measured fp32 noise at the same outputs: the eager fp32 model against its
float64 copy, the largest ``|fp32 − fp64| / max|fp64|`` over the levels of each head, times 4 (the
compiled and the eager fp32 each sit about that far from exact; fusing BN and activations into the
convolutions only reorders rounding). A real fusion mistake (a BN dropped, folded with the wrong
epsilon) moves the outputs by orders of magnitude more.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from effdet_torch.model import compile_network, create_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="torch.compile on the CPU needs a C++ compiler")]


def test_compiled_network_equals_eager_within_fp32_noise(synth_ckpt_dir):
    torch.manual_seed(0)
    eager = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=128).eval()
    exact = copy.deepcopy(eager).double()
    compiled = compile_network(copy.deepcopy(eager))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        e_cls, e_box = eager(x)
        c_cls, c_box = compiled(x)
        x_cls, x_box = exact(x.double())
    for name, e_out, c_out, x_out in (("class", e_cls, c_cls, x_cls), ("box", e_box, c_box, x_box)):
        scale = [float(x.abs().max()) for x in x_out]
        noise = max(float((e - t).abs().max()) / s for e, t, s in zip(e_out, x_out, scale))
        for lv, (e, c, s) in enumerate(zip(e_out, c_out, scale)):
            err = float((c - e).abs().max()) / s
            # + 2^-22: two float32 ulps of the level's scale, for a level where the noise happens to be ~0
            assert err <= 4 * noise + 2**-22, f"{name} level {lv}: compiled vs eager {err:.2e}, fp32 noise {noise:.2e}"

