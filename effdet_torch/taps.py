"""Named intermediate tensors ("taps") under the official golden key names.

``with record_taps(model) as taps: model(x)`` fills ``taps`` with NCHW tensors named
``backbone/level{l}``, ``resample/level{l}``, ``fpn/cell{i}/level{l}``, ``class_net/level{l}``,
``box_net/level{l}`` (the official tensors are NHWC: permute ``(0, 2, 3, 1)`` to compare).

``record_taps(model, detailed=True)`` (or :func:`record_all_taps`) adds the fine-grained taps the
live parity harness compares layer by layer:

- ``backbone/stem`` (stem conv → BN → act) and ``backbone/block{i}`` (every MBConv block output);
- ``fpn/cell{i}/fnode{j}`` (every BiFPN node, i.e. the new feature each ``FNode`` appends);
- ``class_net/repeat{r}/level{l}``, ``box_net/repeat{r}/level{l}`` (conv → BN → act of head
  repeat ``r`` on level ``l``, as the official ``_conv_bn_act`` returns it).

Taps are stored in execution order (dict insertion order), so the first failing tap of a comparison
is the first divergent layer. Forward hooks keep ``forward`` free of bookkeeping, so
tracing/compiling see the plain network. :func:`tap_modules` names the module behind every tap.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

from torch import Tensor, nn

from .model import EfficientDet

__all__ = ["TapPoint", "record_all_taps", "record_taps", "tap_modules", "tap_points"]


class TapPoint(NamedTuple):
    module: nn.Module
    fn: Callable[[object], dict[str, Tensor]]  # module output → {tap name: tensor}
    path: str  # qualified module name in the model ("" = the model itself)
    names: tuple[str, ...]  # the tap names this point yields


def _points(model: EfficientDet, detailed: bool) -> list[TapPoint]:
    levels = model.config.levels
    bb_levels = levels[: len(model.backbone.out_indices)]

    def per_level(prefix: str, lv: list[int]):
        return lambda out: {f"{prefix}/level{l}": t for l, t in zip(lv, out)}

    pts: list[TapPoint] = []
    if detailed:
        pts.append(TapPoint(model.backbone.act_stem, lambda out: {"backbone/stem": out},
                            "backbone.conv_stem+bn_stem+act_stem", ("backbone/stem",)))
        for i, block in enumerate(model.backbone.blocks):
            pts.append(TapPoint(block, lambda out, i=i: {f"backbone/block{i}": out}, f"backbone.blocks.{i}",
                                (f"backbone/block{i}",)))
    pts.append(TapPoint(model.backbone, per_level("backbone", bb_levels), "backbone",
                        tuple(f"backbone/level{l}" for l in bb_levels)))
    for j, r in enumerate(model.fpn.resample):
        lvl = model.fpn.first_extra_level + j
        pts.append(TapPoint(r, lambda out, lvl=lvl: {f"resample/level{lvl}": out}, f"fpn.resample.{j}",
                            (f"resample/level{lvl}",)))
    for i, cell in enumerate(model.fpn.cells):
        if detailed:
            for j, node in enumerate(cell.fnodes):
                name = f"fpn/cell{i}/fnode{j}"
                pts.append(TapPoint(node, lambda out, name=name: {name: out}, f"fpn.cells.{i}.fnodes.{j}", (name,)))
        pts.append(TapPoint(cell, per_level(f"fpn/cell{i}", levels), f"fpn.cells.{i}",
                            tuple(f"fpn/cell{i}/level{l}" for l in levels)))
    for head_name in ("class_net", "box_net"):
        head = getattr(model, head_name)
        if detailed and head.fused is not None:  # fuse_for_inference: one module per repeat and level
            for r, layers in enumerate(head.fused):
                for j, (layer, lvl) in enumerate(zip(layers, levels)):
                    name = f"{head_name}/repeat{r}/level{lvl}"
                    pts.append(TapPoint(layer, lambda out, name=name: {name: out}, f"{head_name}.fused.{r}.{j}",
                                        (name,)))
        elif detailed:
            for r, bns in enumerate(head.bns):
                for j, (bn, lvl) in enumerate(zip(bns, levels)):
                    name = f"{head_name}/repeat{r}/level{lvl}"
                    # The hook sees BN's output; the official tap is after the activation (applied to a
                    # copy: the network's own activation may work in place on BN's output afterwards)
                    pts.append(TapPoint(bn, lambda out, name=name, act=head.act: {name: act(out.clone())},
                                        f"{head_name}.convs.{r}+bns.{r}.{j}+act", (name,)))
        pts.append(TapPoint(head, per_level(head_name, levels), f"{head_name}.predict",
                            tuple(f"{head_name}/level{l}" for l in levels)))
    return pts


def tap_points(model: EfficientDet, detailed: bool = False) -> list[tuple[nn.Module, Callable[[object], dict[str, Tensor]]]]:
    """``(module, output → {tap name: tensor})`` for every official tap of ``model``."""
    return [(p.module, p.fn) for p in _points(model, detailed)]


def tap_modules(model: EfficientDet, detailed: bool = True) -> dict[str, str]:
    """``{tap name: qualified name of the module that produces it}`` (e.g.
    ``'fpn/cell0/fnode2' → 'fpn.cells.0.fnodes.2'``)."""
    return {name: p.path for p in _points(model, detailed) for name in p.names}


@contextmanager
def record_taps(model: EfficientDet, detach: bool = True, detailed: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record every official tap of the forward passes run inside the ``with`` block
    (``detailed``: also every block, BiFPN node and head repeat; see the module docstring)."""
    taps: dict[str, Tensor] = {}
    handles = []
    for module, fn in tap_points(model, detailed):
        def hook(_m, _inp, out, fn=fn):
            for k, v in fn(out).items():
                taps[k] = v.detach() if detach else v
        handles.append(module.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def record_all_taps(model: EfficientDet, detach: bool = True):
    """``record_taps(model, detach, detailed=True)``."""
    return record_taps(model, detach=detach, detailed=True)
