"""The exportable network: fixed input size, dynamic batch, plain tensor outputs.

:class:`ExportNetwork` wraps an :class:`~effdet_torch.EfficientDet` for ``torch.export`` (and the
ONNX exporter built on it). The input size is fixed at export time, so every TF SAME padding and
every BiFPN resample size is a constant of the graph; only the batch dimension stays symbolic.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn as nn
from torch import Tensor

from effdet_torch.anchors import generate_anchors
from effdet_torch.model import EfficientDet
from effdet_torch.postprocess import flatten_outputs, pre_nms_global

__all__ = ["ExportNetwork", "export_program", "output_names", "save_program"]


def output_names(model: EfficientDet, decode: bool) -> list[str]:
    """``class_p3..``, ``box_p3..`` (NCHW heads per level) [+ ``boxes``, ``scores``, ``classes``]."""
    levels = model.config.levels
    names = [f"class_p{lvl}" for lvl in levels] + [f"box_p{lvl}" for lvl in levels]
    return names + (["boxes", "scores", "classes"] if decode else [])


class ExportNetwork(nn.Module):
    """``[B, 3, H, W]`` normalised image → the raw heads per level, and with ``decode`` the official
    pre-NMS tensors of the inference path (``pre_nms_global``, ``max_nms_inputs = 0``):

    - ``class_p{l}``: ``[B, A·num_classes, H_l, W_l]`` logits; ``box_p{l}``: ``[B, A·4, H_l, W_l]`` codes
    - ``boxes``: ``[B, N, 4]`` decoded (ymin, xmin, ymax, xmax) in input pixels, not clipped
    - ``scores``: ``[B, N]`` sigmoid of the per-anchor max logit
    - ``classes``: ``[B, N]`` int64, 0-based argmax (first on ties, as TF)
    """

    def __init__(self, model: EfficientDet, image_size: tuple[int, int], decode: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = tuple(image_size)
        self.decode = decode
        self.num_classes = model.config.num_classes
        if decode:
            anchors = torch.from_numpy(generate_anchors(model.config, self.image_size))
            self.register_buffer("anchors", anchors, persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        cls, box = self.model(x)
        outs = [*cls, *box]
        if self.decode:
            c, b = flatten_outputs(cls, box, self.num_classes)
            outs += list(pre_nms_global(c, b, self.anchors))
        return tuple(outs)


def export_program(model: EfficientDet, image_size: tuple[int, int], decode: bool = False,
                   max_batch: int = 1024) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ExportNetwork`: batch symbolic (1..``max_batch``), ``H×W`` fixed.

    Traced with a batch of 2 (a batch of 1 would be specialised to a constant).
    """
    net = ExportNetwork(model, image_size, decode).eval()
    p = next(model.parameters())
    x = torch.zeros(2, 3, *image_size, dtype=p.dtype, device=p.device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}}, strict=False)


def save_program(program: torch.export.ExportedProgram, f: str | Path | BinaryIO) -> None:
    """``torch.export.save``, without its warning about channels_last weights.

    The archive writer groups weights by storage and warns "No complete tensor found in the group"
    for every group without a *contiguous* tensor covering its storage. Our weights are
    channels_last (the fast CPU layout, which the program keeps): each one covers its own storage
    exactly, just not in the default memory format, so the tensor it saves is the whole weight.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, f)
