"""Named intermediate tensors ("taps") under the official golden key names.

``with record_taps(model) as taps: model(x)`` fills ``taps`` with NCHW tensors named
``backbone/level{l}``, ``resample/level{l}``, ``fpn/cell{i}/level{l}``, ``class_net/level{l}``,
``box_net/level{l}`` (the official tensors are NHWC: permute ``(0, 2, 3, 1)`` to compare).
Forward hooks keep ``forward`` free of bookkeeping, so tracing/compiling see the plain network.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn

from .model import EfficientDet

__all__ = ["record_taps", "tap_points"]


def tap_points(model: EfficientDet) -> list[tuple[nn.Module, Callable[[object], dict[str, Tensor]]]]:
    """``(module, output → {tap name: tensor})`` for every official tap of ``model``."""
    levels = model.config.levels
    bb_levels = levels[: len(model.backbone.out_indices)]

    def per_level(prefix: str, lv: list[int]):
        return lambda out: {f"{prefix}/level{l}": t for l, t in zip(lv, out)}

    points = [(model.backbone, per_level("backbone", bb_levels))]
    for j, r in enumerate(model.fpn.resample):
        lvl = model.fpn.first_extra_level + j
        points.append((r, lambda out, lvl=lvl: {f"resample/level{lvl}": out}))
    for i, cell in enumerate(model.fpn.cells):
        points.append((cell, per_level(f"fpn/cell{i}", levels)))
    points.append((model.class_net, per_level("class_net", levels)))
    points.append((model.box_net, per_level("box_net", levels)))
    return points


@contextmanager
def record_taps(model: EfficientDet, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record every official tap of the forward passes run inside the ``with`` block."""
    taps: dict[str, Tensor] = {}
    handles = []
    for module, fn in tap_points(model):
        def hook(_m, _inp, out, fn=fn):
            for k, v in fn(out).items():
                taps[k] = v.detach() if detach else v
        handles.append(module.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()
