"""BiFPN: extra pyramid levels, resampling, weighted fusion and the repeated cells.

Facts (official ``tf2/efficientdet_keras.py`` ResampleFeatureMap / FNode / OpAfterCombine / FPNCells):
- resampling: 1x1 conv (bias) → BN only when channels differ, THEN max-pool down or nearest up;
- down: ``MaxPooling2D(stride + 1, stride, 'SAME')`` with ``stride = (n - 1) // target + 1`` per axis;
- up: TF1 nearest neighbour (``src = floor(dst * in / out)``);
- node: fuse ('fastattn': ``sum_i x_i * relu(w_i) / (sum_j relu(w_j) + 1e-4)``, or 'sum') → act →
  SeparableConv2D 3x3 (bias) → BN (no act after);
- the cell output of each level is the last node of that level.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import EfficientDetConfig, FpnNode
from .ops import (
    BatchNorm2d,
    NormLayer,
    SeparableConv2d,
    create_act,
    fold_bn_into_conv,
    max_pool2d_same,
    resize_nearest_tf1,
    tf_batch_norm,
)

__all__ = ["BiFpn", "BiFpnCell", "FNode", "FastAttnFusion", "ResampleFeatureMap", "SumFusion"]

_WEIGHT_EPSILON = 1e-4  # official _WEIGHT_EPSILON in FNode.fuse_features


class ResampleFeatureMap(nn.Module):
    """Project channels if needed (1x1 conv + BN), then resize to ``size``.

    ``[B, C_in, h, w] → [B, C_out, H, W]``; ``size`` is given per call (from the pyramid sizes).
    """

    def __init__(self, in_ch: int, out_ch: int, norm: NormLayer = BatchNorm2d) -> None:
        super().__init__()
        if in_ch != out_ch:
            self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=True)
            self.bn = norm(out_ch)
        else:
            self.conv = None
            self.bn = None

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.conv is not None:
            x = self.bn(self.conv(x))
        h, w = x.shape[-2:]
        if h > size[0] or w > size[1]:
            # per axis: stride = (n - 1) // target + 1, pool size = stride + 1
            stride = ((h - 1) // size[0] + 1, (w - 1) // size[1] + 1)
            x = max_pool2d_same(x, (stride[0] + 1, stride[1] + 1), stride)
        elif h < size[0] or w < size[1]:
            x = resize_nearest_tf1(x, size)
        return x

    def fuse_for_inference(self) -> None:
        """Inference only: the BN folded into the 1x1 conv."""
        if self.conv is not None:
            fold_bn_into_conv(self.conv, self.bn)
            self.bn = nn.Identity()

    def tf_names(self) -> dict[str, str]:
        return {"conv": "conv2d", "bn": "bn"} if self.conv is not None else {}


class FastAttnFusion(nn.Module):
    """'fastattn': ``add_n(x_i * w_i / (add_n(w) + 1e-4))`` with ``w_i = relu(WSM_i)`` (init 1.0)."""

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        self.edge_weights = nn.ParameterList([nn.Parameter(torch.ones(())) for _ in range(num_inputs)])

    def forward(self, xs: list[Tensor]) -> Tensor:
        ws = [torch.relu(w) for w in self.edge_weights]
        total = ws[0]
        for w in ws[1:]:
            total = total + w
        denom = total + _WEIGHT_EPSILON
        if torch.is_grad_enabled():
            out = xs[0] * ws[0] / denom
            for x, w in zip(xs[1:], ws[1:]):
                out = out + x * w / denom
            return out
        # inference: the same operations in place on the fresh products (one map per input instead
        # of 2-3; every large new tensor costs page faults on the CPU), bit-identical
        out = (xs[0] * ws[0]).div_(denom)
        for x, w in zip(xs[1:], ws[1:]):
            out.add_((x * w).div_(denom))
        return out

    def tf_names(self) -> dict[str, str]:
        return {f"edge_weights.{i}": "WSM" if i == 0 else f"WSM_{i}" for i in range(len(self.edge_weights))}


class SumFusion(nn.Module):
    """'sum': sequential ``add_n`` of the inputs (d6, d7, d7x and every lite variant)."""

    def forward(self, xs: list[Tensor]) -> Tensor:
        out = xs[0] + xs[1]
        for x in xs[2:]:  # in place on the fresh sum at inference (one map instead of N - 1), bit-identical
            out = out + x if torch.is_grad_enabled() else out.add_(x)
        return out


class FNode(nn.Module):
    """One BiFPN node: resample every input to the node's level, fuse, act → sep-conv → BN."""

    def __init__(self, node: FpnNode, in_channels: list[int], out_ch: int, method: str,
                 act_type: str, num_feats_before: int, norm: NormLayer = BatchNorm2d) -> None:
        super().__init__()
        self.level = node.level
        self.inputs = list(node.inputs)
        self.resample = nn.ModuleDict(
            {str(i): ResampleFeatureMap(in_channels[off], out_ch, norm) for i, off in enumerate(self.inputs)}
        )
        if method == "fastattn":
            self.fuse = FastAttnFusion(len(self.inputs))
        elif method == "sum":
            self.fuse = SumFusion()
        else:
            raise ValueError(f"unsupported fpn weight method {method!r}")
        self.act = create_act(act_type)
        self.conv = SeparableConv2d(out_ch, out_ch, 3, bias=True)
        self.bn = norm(out_ch)
        # Official layer names carry the running feature count: resample_{i}_{offset}_{n}, op_after_combine{n}.
        self._n = num_feats_before

    def forward(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        xs = [self.resample[str(i)](feats[off], size) for i, off in enumerate(self.inputs)]
        return self.bn(self.conv(self.act(self.fuse(xs))))

    def fuse_for_inference(self) -> None:
        """Inference only: the BN folded into the separable conv's pointwise conv (its inputs'
        resamples are fused by :meth:`BiFpn.fuse_for_inference`)."""
        fold_bn_into_conv(self.conv.conv_pw, self.bn)
        self.bn = nn.Identity()

    def tf_names(self) -> dict[str, str]:
        names = {f"resample.{i}": f"resample_{i}_{off}_{self._n}" for i, off in enumerate(self.inputs)}
        names["fuse"] = ""
        names["conv"] = f"op_after_combine{self._n}/conv"
        names["bn"] = f"op_after_combine{self._n}/bn"
        return names


class BiFpnCell(nn.Module):
    """One BiFPN repeat. ``[P_min..P_max] → [P_min..P_max]``, all ``fpn_channels`` wide."""

    def __init__(self, cfg: EfficientDetConfig, in_channels: list[int]) -> None:
        super().__init__()
        norm = tf_batch_norm(cfg.bn_eps, cfg.bn_momentum)
        self.levels = cfg.levels
        channels = list(in_channels)
        nodes = []
        for node in cfg.fpn_nodes:
            nodes.append(FNode(node, channels, cfg.fpn_channels, cfg.fpn_weight_method, cfg.act_type, len(channels),
                               norm))
            channels.append(cfg.fpn_channels)
        self.fnodes = nn.ModuleList(nodes)
        n_in = len(in_channels)
        # Output of a level = the last node of that level.
        self.out_indices = [max(n_in + j for j, nd in enumerate(cfg.fpn_nodes) if nd.level == lvl) for lvl in self.levels]

    def forward(self, feats: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
        feats = list(feats)
        for node in self.fnodes:
            feats.append(node(feats, sizes[node.level - self.levels[0]]))
        return [feats[i] for i in self.out_indices]

    def tf_names(self) -> dict[str, str]:
        return {f"fnodes.{i}": f"fnode{i}" for i in range(len(self.fnodes))}


class BiFpn(nn.Module):
    """Extra levels (``resample_p{l}``) then ``fpn_repeats`` cells.

    ``[P3, P4, P5] (backbone widths) → [P3..P_max] (fpn_channels)``.
    """

    def __init__(self, cfg: EfficientDetConfig, backbone_channels: list[int]) -> None:
        super().__init__()
        norm = tf_batch_norm(cfg.bn_eps, cfg.bn_momentum)
        self.levels = cfg.levels
        n_backbone = len(backbone_channels)
        extra = []
        ch = backbone_channels[-1]
        for _ in range(cfg.min_level + n_backbone, cfg.max_level + 1):
            extra.append(ResampleFeatureMap(ch, cfg.fpn_channels, norm))
            ch = cfg.fpn_channels
        self.resample = nn.ModuleList(extra)
        self.first_extra_level = cfg.min_level + n_backbone
        in_channels = list(backbone_channels) + [cfg.fpn_channels] * len(extra)
        cells = []
        for _ in range(cfg.fpn_repeats):
            cells.append(BiFpnCell(cfg, in_channels))
            in_channels = [cfg.fpn_channels] * len(cfg.levels)
        self.cells = nn.ModuleList(cells)

    def extra_levels(self, feats: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
        feats = list(feats)
        for j, r in enumerate(self.resample):
            lvl = self.first_extra_level + j
            feats.append(r(feats[-1], sizes[lvl - self.levels[0]]))
        return feats

    def fuse_for_inference(self) -> None:
        """Inference only: every BN folded into the conv before it (resamples and nodes)."""
        for m in self.modules():
            if isinstance(m, (ResampleFeatureMap, FNode)):
                m.fuse_for_inference()

    def forward(self, feats: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
        feats = self.extra_levels(feats, sizes)
        for cell in self.cells:
            feats = cell(feats, sizes)
        return feats

    def tf_names(self) -> dict[str, str]:
        names = {f"resample.{j}": f"resample_p{self.first_extra_level + j}" for j in range(len(self.resample))}
        names.update({f"cells.{i}": f"fpn_cells/cell_{i}" for i in range(len(self.cells))})
        return names
