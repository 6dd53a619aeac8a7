"""The official detection loss (``tf2/train_lib.py`` FocalLoss / BoxLoss / ``_detection_loss`` /
``_reg_l2_loss``), on flat anchor-ordered tensors (see :mod:`training.targets`).

- focal loss on logits: ``alpha_t · (1 - p_t)^gamma · BCEwithlogits``, alpha 0.25, gamma 1.5,
  ``cls = -1`` is an all-zero one-hot row (pure background), ``cls = -2`` (never produced) masked;
- box loss: Huber(delta 0.1) per element, masked element-wise on ``box_targets != 0``;
- normaliser: ``total positives of the batch + 1`` (the official ``sum(mean_num_positives) + 1``),
  the box loss by 4× that; ``det_loss = cls_loss + 50 · box_loss``;
- L2 weight decay inside the loss: ``4e-5 · Σ v²/2`` over every variable whose official name ends in
  ``kernel`` (conv, depthwise, pointwise kernels; not bias, BN gamma/beta, BiFPN WSM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from converters.name_map import build_name_map

__all__ = ["LossConfig", "detection_loss", "focal_loss", "huber_loss", "l2_parameters", "reg_l2_loss"]


@dataclass(frozen=True)
class LossConfig:
    """Official ``hparams_config`` defaults."""

    alpha: float = 0.25
    gamma: float = 1.5
    delta: float = 0.1
    box_loss_weight: float = 50.0
    weight_decay: float = 4e-5


def focal_loss(logits: Tensor, cls: Tensor, num_classes: int, alpha: float, gamma: float) -> Tensor:
    """Sum of the per-element focal loss (not normalised). ``logits [B, N, C]``, ``cls [B, N]``."""
    onehot = F.one_hot(cls.clamp(min=0), num_classes).to(logits.dtype) * (cls >= 0)[..., None].to(logits.dtype)
    p = torch.sigmoid(logits)
    p_t = onehot * p + (1 - onehot) * (1 - p)
    alpha_t = onehot * alpha + (1 - onehot) * (1 - alpha)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    loss = alpha_t * (1.0 - p_t) ** gamma * ce
    return (loss * (cls != -2)[..., None].to(logits.dtype)).sum()


def huber_loss(pred: Tensor, target: Tensor, delta: float) -> Tensor:
    """Keras Huber per element: ``0.5 x²`` if ``|x| ≤ delta`` else ``delta (|x| - delta/2)``."""
    return F.huber_loss(pred, target, reduction="none", delta=delta)


def detection_loss(cls_logits: Tensor, box_codes: Tensor, cls_targets: Tensor, box_targets: Tensor,
                   num_positives: Tensor, cfg: LossConfig = LossConfig()) -> dict[str, Tensor]:
    """``cls_logits [B, N, C]``, ``box_codes [B, N, 4]``, ``cls_targets [B, N]``, ``box_targets
    [B, N, 4]``, ``num_positives [B]`` → ``cls_loss``, ``box_loss``, ``det_loss`` (scalars)."""
    normalizer = num_positives.to(cls_logits.dtype).sum() + 1.0
    cls_loss = focal_loss(cls_logits, cls_targets, cls_logits.shape[-1], cfg.alpha, cfg.gamma) / normalizer
    mask = (box_targets != 0).to(box_codes.dtype)
    box_loss = (huber_loss(box_codes, box_targets, cfg.delta) * mask).sum() / (normalizer * 4.0)
    return {"cls_loss": cls_loss, "box_loss": box_loss, "det_loss": cls_loss + cfg.box_loss_weight * box_loss}


def l2_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(torch name, parameter)`` of every weight the official L2 decay covers: those whose TF name
    (via the declarative name map) ends in ``kernel``."""
    params = dict(model.named_parameters())
    return [(e.torch_key, params[e.torch_key]) for e in build_name_map(model)
            if e.torch_key in params and e.tf_name.rsplit("/", 1)[-1].endswith("kernel")]


def reg_l2_loss(params: list[Tensor], weight_decay: float) -> Tensor:
    """``weight_decay · Σ_v sum(v²) / 2`` (``tf.nn.l2_loss`` summed)."""
    return weight_decay * torch.stack([(p * p).sum() / 2 for p in params]).sum()
