"""EfficientNet / EfficientNet-lite backbone as the official EfficientDet uses it.

Facts (official ``backbone/efficientnet_model.py``): stem 3x3/s2 SAME conv → BN → act; MBConv blocks
``[expand 1x1 → BN → act] → depthwise kxk SAME → BN → act → [SE] → project 1x1 → BN [+ identity]``;
the outputs used are the endpoints before each stride-2 stage and the last block (reduction_3..5).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import BackboneConfig
from .ops import BatchNorm2d, Conv2dSame, ConvAct, NormLayer, create_act, drop_connect, fold_bn_into_conv

__all__ = ["EfficientNetBackbone", "ExcitedProjection", "MBConvBlock", "SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """SE: mean over H, W → 1x1 conv (bias) → act → 1x1 conv (bias) → sigmoid → scale the input.

    ``reduced = max(1, int(block_input_filters * se_ratio))`` (of the block INPUT, not expanded).
    """

    def __init__(self, channels: int, reduced: int, act_type: str) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = create_act(act_type)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def gate(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] → [B, C, 1, 1]``: the per-channel scale in (0, 1)."""
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(s))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class ExcitedProjection(nn.Module):
    """Inference only: an MBConv block's SE and project conv (BN folded in), ``conv(x · gate(x))``.
    For one image the gate scales the conv's input channels, i.e. its weights — ``W[o, c] · s[c]``,
    a ``[C_out, C]`` product — instead of the ``[1, C, H, W]`` map (d0's backbone at 512² on 2 CPU
    threads: 3 ms of 41); batches multiply the map. Changes fp32 rounding only."""

    def __init__(self, se: SqueezeExcite, conv: nn.Conv2d) -> None:
        super().__init__()
        self.se = se
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        s = self.se.gate(x)
        if x.shape[0] == 1:
            return F.conv2d(x, self.conv.weight * s.reshape(1, -1, 1, 1), self.conv.bias)
        return self.conv(x * s)


class MBConvBlock(nn.Module):
    """Inverted-residual block. ``[B, C_in, H, W] → [B, C_out, ceil(H/s), ceil(W/s)]``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float | None, act_type: str, norm: NormLayer = BatchNorm2d) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self.conv_expand = Conv2dSame(in_ch, mid, 1, bias=False)
            self.bn_expand = norm(mid)
            self.act_expand = create_act(act_type)
        self.conv_dw = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self.bn_dw = norm(mid)
        self.act_dw = create_act(act_type)
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio)), act_type) if se_ratio else None
        self.conv_project = Conv2dSame(mid, out_ch, 1, bias=False)
        self.bn_project = norm(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.survival_prob: float | None = None  # set by the backbone: drop-connect of the residual branch

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = self.act_expand(self.bn_expand(self.conv_expand(y)))
        y = self.act_dw(self.bn_dw(self.conv_dw(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn_project(self.conv_project(y))
        if self.has_skip:  # drop-connect is a training-only op; inference is the plain sum
            if self.training and self.survival_prob:
                y = drop_connect(y, self.survival_prob)
            y = y + x if torch.is_grad_enabled() else y.add_(x)  # in place on the fresh conv output at inference
        return y

    def fuse_for_inference(self) -> None:
        """Inference only: every BN folded into the conv before it (:func:`fold_bn_into_conv`), each
        conv → act pair one :class:`ConvAct`, the SE gate applied to the project conv's weights
        (:class:`ExcitedProjection`). ``forward`` runs unchanged over the replaced modules."""
        pairs = (("conv_expand", "bn_expand"),) if self.has_expand else ()
        for conv, bn in pairs + (("conv_dw", "bn_dw"), ("conv_project", "bn_project")):
            fold_bn_into_conv(getattr(self, conv), getattr(self, bn))
            setattr(self, bn, nn.Identity())
        if self.has_expand:
            self.conv_expand, self.act_expand = ConvAct(self.conv_expand, self.act_expand), nn.Identity()
        self.conv_dw, self.act_dw = ConvAct(self.conv_dw, self.act_dw), nn.Identity()
        if self.se is not None:
            self.conv_project, self.se = ExcitedProjection(self.se, self.conv_project), None

    def tf_names(self) -> dict[str, str]:
        """Official variable scopes of this block's layers (Keras auto-names, creation order)."""
        names = {}
        convs = ["conv_expand", "conv_project"] if self.has_expand else ["conv_project"]
        bns = ["bn_expand", "bn_dw", "bn_project"] if self.has_expand else ["bn_dw", "bn_project"]
        for i, c in enumerate(convs):
            names[c] = "conv2d" if i == 0 else f"conv2d_{i}"
        for i, b in enumerate(bns):
            names[b] = "tpu_batch_normalization" if i == 0 else f"tpu_batch_normalization_{i}"
        names["conv_dw"] = "depthwise_conv2d"
        if self.se is not None:
            names["se.conv_reduce"] = "se/conv2d"
            names["se.conv_expand"] = "se/conv2d_1"
        return names


class EfficientNetBackbone(nn.Module):
    """EfficientNet feature extractor. ``[B, 3, H, W] → [P3, P4, P5]`` (strides 8, 16, 32)."""

    def __init__(self, cfg: BackboneConfig, act_type: str, out_levels: tuple[int, ...] = (3, 4, 5),
                 norm: NormLayer = BatchNorm2d) -> None:
        super().__init__()
        self.name = cfg.name
        stem = cfg.stem_filters()
        self.conv_stem = Conv2dSame(3, stem, 3, stride=2, bias=False)
        self.bn_stem = norm(stem)
        self.act_stem = create_act(act_type)
        blocks: list[MBConvBlock] = []
        level_of_block: list[int] = []
        level = 1  # after the stride-2 stem
        for stage in cfg.stages():
            for r in range(stage.repeats):
                stride = stage.stride if r == 0 else 1
                level += stride == 2
                blocks.append(
                    MBConvBlock(
                        stage.in_filters if r == 0 else stage.out_filters,
                        stage.out_filters, stage.kernel, stride, stage.expand_ratio,
                        stage.se_ratio if cfg.use_se else None, act_type, norm,
                    )
                )
                level_of_block.append(level)
        self.blocks = nn.ModuleList(blocks)
        if cfg.survival_prob:  # official: block i of N keeps its branch with 1 - (1 - p) * i / N
            for i, b in enumerate(blocks):
                b.survival_prob = 1.0 - (1.0 - cfg.survival_prob) * i / len(blocks)
        # Endpoint of a level = the last block at that level (official reduction_{level}).
        self.out_indices = [max(i for i, lv in enumerate(level_of_block) if lv == lvl) for lvl in out_levels]
        self.out_channels = [blocks[i].bn_project.num_features for i in self.out_indices]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.act_stem(self.bn_stem(self.conv_stem(x)))
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                feats.append(x)
        return feats

    def fuse_for_inference(self) -> None:
        """Inference only: the stem and every block fused (:meth:`MBConvBlock.fuse_for_inference`)."""
        fold_bn_into_conv(self.conv_stem, self.bn_stem)
        self.bn_stem = nn.Identity()
        self.conv_stem, self.act_stem = ConvAct(self.conv_stem, self.act_stem), nn.Identity()
        for block in self.blocks:
            block.fuse_for_inference()

    def tf_names(self) -> dict[str, str]:
        names = {"conv_stem": "stem/conv2d", "bn_stem": "stem/tpu_batch_normalization"}
        for i in range(len(self.blocks)):
            names[f"blocks.{i}"] = f"blocks_{i}"
        return names
