"""CUDA: the golden check on the GPU, and GPU vs CPU agreement (skipped without CUDA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from effdet_torch.model import create_model
from parity.golden import run_golden, strict_fp32

from .conftest import PROJECT_GOLDEN

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("npz", ["tensors_random.npz", "tensors_chelsea.npz"])
def test_golden_on_cuda(synth_ckpt_dir, npz):
    model = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=256)
    results = run_golden(model, PROJECT_GOLDEN / "efficientdet-d0" / npz, device="cuda")
    bad = [f"{r.key}: {r.max_abs_err:.3e} > {r.tolerance:.3e} {r.note}" for r in results if not r.passed]
    assert not bad, "\n".join(bad)


@needs_cuda
def test_cuda_matches_cpu(synth_ckpt_dir):
    """Same weights, same input: CUDA fp32 (no TF32) vs CPU fp32 within the image tolerance."""
    model = create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=256)
    g = np.load(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_chelsea.npz")
    x = torch.from_numpy(g["input/chelsea_preprocessed"]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad(), strict_fp32():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
    for a, b in zip(cpu[0] + cpu[1], gpu[0] + gpu[1]):
        b = b.cpu()
        assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max())
