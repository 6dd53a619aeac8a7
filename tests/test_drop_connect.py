"""Drop-connect (stochastic depth) in training, from the official facts (backbone/efficientnet_model.py,
utils.drop_connect, tf2/efficientdet_keras.py): the EfficientNet(-lite) builders default to survival
probability 0.8; EfficientDet passes 0.0 (off) to backbones named ``*b0*``; block i of N keeps its residual
branch with ``1 - 0.2·i/N``, only blocks with a skip connection (stride 1, in == out), only in training,
per sample ``floor(p + U[0,1))`` and the branch divided by p. Inference is unchanged (every golden)."""
from __future__ import annotations

import pytest
import torch

from effdet_torch.config import get_config
from effdet_torch.model import EfficientDet
from effdet_torch.ops import drop_connect


@pytest.mark.parametrize("variant,on", [("d0", False), ("d1", True), ("d3", True), ("lite0", True), ("lite3x", True)])
def test_which_backbones_and_the_per_block_rule(variant, on):
    with torch.device("meta"):
        blocks = EfficientDet(get_config(variant)).backbone.blocks
    probs = [b.survival_prob for b in blocks]
    if not on:
        assert all(p is None for p in probs)
        return
    n = len(blocks)
    drop = 1.0 - 0.8  # the official arithmetic, in its order: 1 - drop_rate * idx / N
    assert probs == [1.0 - drop * float(i) / n for i in range(n)]
    assert probs[0] == 1.0 and min(probs) > 0.8


def test_drop_connect_keeps_or_drops_whole_samples_unbiased():
    torch.manual_seed(0)
    x = torch.ones(20000, 1, 1, 1)
    y = drop_connect(x, 0.75)
    vals = set(y.flatten().tolist())
    assert vals <= {0.0, float(torch.tensor(1.0) / 0.75)}  # float32 division, as the official x / p
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.75) < 4 * (0.75 * 0.25 / 20000) ** 0.5  # binomial: 4 standard deviations


def test_only_training_and_only_skip_blocks():
    torch.manual_seed(0)
    model = EfficientDet(get_config("d1", image_size=64)).backbone
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # eval: deterministic, no drop
    block = next(b for b in model.blocks if b.has_skip and b.survival_prob < 1)
    noskip = next(b for b in model.blocks if not b.has_skip)
    block.train(), noskip.train()
    h = torch.randn(8, block.bn_project.num_features, 8, 8)
    with torch.no_grad():
        outs = [block(h) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the mask is drawn each call
    # a dropped sample is exactly the identity path
    dropped = [(o - h).flatten(1).abs().amax(1) == 0 for o in outs]
    assert torch.stack(dropped).any()
    assert noskip.survival_prob is not None  # it has a probability, but no skip: never dropped
    hin = torch.randn(2, (noskip.conv_expand if noskip.has_expand else noskip.conv_dw).in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(noskip(hin), noskip(hin))
    d0 = EfficientDet(get_config("d0", image_size=64)).train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = d0(x)
        torch.manual_seed(2)
        b = d0(x)
    assert all(torch.equal(u, v) for u, v in zip(a[0] + a[1], b[0] + b[1]))  # D0 trains without drop-connect
