"""Class and box prediction nets (official ``ClassNet`` / ``BoxNet``).

``repeats × [SeparableConv2D 3x3 (bias, shared over levels) → BN (per repeat AND level) → act]``
then a shared separable predict conv (bias, no BN/act). No residual at inference (survival_prob None).
"""
from __future__ import annotations

import copy
import math

import torch.nn as nn
from torch import Tensor

from .ops import BatchNorm2d, ConvAct, NormLayer, SeparableConv2d, create_act, fold_bn_into_conv

__all__ = ["HeadNet"]


class HeadNet(nn.Module):
    """``[P_min..P_max] ([B, C, H_l, W_l]) → [B, A * out_per_anchor, H_l, W_l]`` per level.

    ``kind`` is ``'class'`` (channel = anchor · num_classes + class) or ``'box'``
    (channel = anchor · 4 + (ty, tx, th, tw)).
    """

    def __init__(self, kind: str, in_ch: int, repeats: int, levels: list[int], num_anchors: int,
                 out_per_anchor: int, act_type: str, norm: NormLayer = BatchNorm2d) -> None:
        super().__init__()
        self.kind = kind
        self.levels = list(levels)
        self.convs = nn.ModuleList([SeparableConv2d(in_ch, in_ch, 3) for _ in range(repeats)])
        self.bns = nn.ModuleList(
            [nn.ModuleList([norm(in_ch) for _ in self.levels]) for _ in range(repeats)]
        )
        self.act = create_act(act_type)
        self.num_anchors = num_anchors
        self.predict = self.make_predict(in_ch, out_per_anchor)
        self.fused: nn.ModuleList | None = None  # [repeat][level] after fuse_for_inference

    def make_predict(self, in_ch: int, out_per_anchor: int) -> SeparableConv2d:
        """The shared predict conv; the class head's bias starts at the 0.01 prior (training init
        only, converted weights overwrite it)."""
        predict = SeparableConv2d(in_ch, self.num_anchors * out_per_anchor, 3)
        if self.kind == "class":
            nn.init.constant_(predict.conv_pw.bias, -math.log((1 - 0.01) / 0.01))
        return predict

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = []
        for j, x in enumerate(feats):
            if self.fused is None:
                for conv, bns in zip(self.convs, self.bns):
                    x = self.act(bns[j](conv(x)))
            else:
                for layers in self.fused:
                    x = layers[j](x)
            outs.append(self.predict(x))
        return outs

    def fuse_for_inference(self) -> None:
        """Inference only: repeat ``r`` on level ``j`` becomes the shared depthwise conv, then its own
        copy of the shared pointwise conv with ``bns[r][j]`` folded in and the activation fused
        (:class:`ConvAct`): ``fused[r][j] = act ∘ bn_rj ∘ conv_r``, no BN map and no separate
        activation pass per level."""
        rows = []
        for conv, bns in zip(self.convs, self.bns):
            row = []
            for bn in bns:
                pw = copy.deepcopy(conv.conv_pw)
                fold_bn_into_conv(pw, bn)
                row.append(nn.Sequential(conv.conv_dw, ConvAct(pw, self.act)))
            rows.append(nn.ModuleList(row))
        self.fused = nn.ModuleList(rows)

    def tf_names(self) -> dict[str, str]:
        k = self.kind
        names = {f"convs.{i}": f"{k}-{i}" for i in range(len(self.convs))}
        for i in range(len(self.convs)):
            for j, lvl in enumerate(self.levels):
                names[f"bns.{i}.{j}"] = f"{k}-{i}-bn-{lvl}"
        names["predict"] = f"{k}-predict"
        return names
