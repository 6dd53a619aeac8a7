"""Deliberately broken models shared by the parity tests: each reproduces a classic port bug."""
from __future__ import annotations

import types

import torch.nn.functional as F

from effdet_torch.ops import same_padding


def flip_same_padding(conv) -> None:
    """Make one SAME conv pad top/left instead of bottom/right (a classic port bug)."""
    def forward(self, x):
        kh, kw = self.kernel_size
        top, bottom = same_padding(x.shape[-2], kh, self.stride[0])
        left, right = same_padding(x.shape[-1], kw, self.stride[1])
        return F.conv2d(F.pad(x, (right, left, bottom, top)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)

    conv.forward = types.MethodType(forward, conv)
