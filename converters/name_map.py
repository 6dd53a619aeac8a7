"""The declarative TF-name → torch-key map.

Every module of :mod:`effdet_torch` that owns weights declares the official scope of each child in
``tf_names()``; leaf layers declare their TF variable names below (``LEAF_VARIABLES``). Walking a
model composes the scopes into one printable table of :class:`MapEntry` rows — no per-variant lists
and no string rewriting. ``python -m converters.name_map efficientdet-d3`` (or
``convert-ckpt --print-map d3``) prints it.
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from effdet_torch.bifpn import FastAttnFusion
from effdet_torch.config import AnchorConfig, get_config
from effdet_torch.model import EfficientDet
from effdet_torch.ops import BatchNorm2d, SeparableConv2d

__all__ = ["Layout", "MapEntry", "build_name_map", "format_map", "name_map_for"]


class Layout(enum.Enum):
    """How a TF array becomes a torch tensor."""

    CONV = "HWIO -> OIHW"  # Conv2D kernel [kh, kw, cin, cout], SeparableConv2D pointwise [1, 1, cin, cout]
    DEPTHWISE = "HWC1 -> C1HW"  # DepthwiseConv2D / SeparableConv2D depthwise [kh, kw, C, 1]
    VECTOR = "[C] -> [C]"  # bias, BN gamma/beta/moving stats
    SCALAR = "[] -> []"  # BiFPN fusion weights WSM, WSM_1, ...

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        if self is Layout.CONV:
            a = a.transpose(3, 2, 0, 1)
        elif self is Layout.DEPTHWISE:
            a = a.transpose(2, 3, 0, 1)
        return np.array(a, order="C")  # (ascontiguousarray would turn scalars into shape [1])

    def to_tf(self, a: np.ndarray) -> np.ndarray:
        if self is Layout.CONV:
            a = a.transpose(2, 3, 1, 0)
        elif self is Layout.DEPTHWISE:
            a = a.transpose(2, 3, 0, 1)
        return np.array(a, order="C")

    def tf_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self is Layout.CONV:
            o, i, h, w = torch_shape
            return (h, w, i, o)
        if self is Layout.DEPTHWISE:
            c, one, h, w = torch_shape
            return (h, w, c, one)
        return tuple(torch_shape)


@dataclass(frozen=True)
class MapEntry:
    """One variable: official name (no ``:0``), torch state-dict key, layout, TF shape."""

    tf_name: str
    torch_key: str
    layout: Layout
    tf_shape: tuple[int, ...]


def _conv_variables(m: nn.Conv2d) -> dict[str, tuple[str, Layout]]:
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    out = {"weight": ("depthwise_kernel", Layout.DEPTHWISE) if depthwise else ("kernel", Layout.CONV)}
    if m.bias is not None:
        out["bias"] = ("bias", Layout.VECTOR)
    return out


#: Leaf layers: torch parameter/buffer name → (official variable name, layout).
LEAF_VARIABLES = {
    SeparableConv2d: lambda m: {
        "conv_dw.weight": ("depthwise_kernel", Layout.DEPTHWISE),
        "conv_pw.weight": ("pointwise_kernel", Layout.CONV),
        **({"conv_pw.bias": ("bias", Layout.VECTOR)} if m.conv_pw.bias is not None else {}),
    },
    BatchNorm2d: lambda m: {
        "weight": ("gamma", Layout.VECTOR),
        "bias": ("beta", Layout.VECTOR),
        "running_mean": ("moving_mean", Layout.VECTOR),
        "running_var": ("moving_variance", Layout.VECTOR),
    },
    nn.Conv2d: _conv_variables,
    FastAttnFusion: lambda m: {f"edge_weights.{i}": (name, Layout.SCALAR) for i, name in
                               ((i, "WSM" if i == 0 else f"WSM_{i}") for i in range(len(m.edge_weights)))},
}


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _leaf_rule(m: nn.Module):
    for cls, rule in LEAF_VARIABLES.items():
        if isinstance(m, cls):
            return rule
    return None


def _walk(m: nn.Module, torch_prefix: str, tf_prefix: str) -> Iterator[tuple[str, str, Layout]]:
    rule = _leaf_rule(m)
    if rule is not None:
        for pname, (tf_leaf, layout) in rule(m).items():
            yield _join(tf_prefix, tf_leaf), f"{torch_prefix}{pname}", layout
        return
    if not hasattr(m, "tf_names"):
        return
    for child_path, scope in m.tf_names().items():
        child = m.get_submodule(child_path)
        yield from _walk(child, f"{torch_prefix}{child_path}.", _join(tf_prefix, scope))


def build_name_map(model: nn.Module) -> list[MapEntry]:
    """The map of ``model`` in state-dict order; checks that it covers the state dict one-to-one."""
    state = model.state_dict(keep_vars=True)
    rows = {key: (tf, layout) for tf, key, layout in _walk(model, "", "")}
    missing = [k for k in state if k not in rows]
    extra = [k for k in rows if k not in state]
    if missing or extra:
        raise RuntimeError(f"name map does not cover the model: unmapped {missing[:5]}, unknown {extra[:5]}")
    tf_names = [tf for tf, _ in rows.values()]
    if len(set(tf_names)) != len(tf_names):
        dup = sorted({n for n in tf_names if tf_names.count(n) > 1})
        raise RuntimeError(f"name map gives several torch keys one TF name: {dup[:5]}")
    return [MapEntry(rows[k][0], k, rows[k][1], rows[k][1].tf_shape(tuple(v.shape))) for k, v in state.items()]


def name_map_for(variant: str, num_classes: int | None = None, anchors: AnchorConfig | None = None) -> list[MapEntry]:
    """The map of an official variant (with ``num_classes`` and ``anchors``, which set the predictors'
    shapes), built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = EfficientDet(get_config(variant, num_classes=num_classes, anchors=anchors))
    return build_name_map(model)


def format_map(entries: list[MapEntry]) -> str:
    """A fixed-width table: TF name, TF shape, layout, torch key."""
    w = max(len(e.tf_name) for e in entries)
    lines = [f"{'TF variable':<{w}}  {'TF shape':<18}  {'layout':<13}  torch key"]
    for e in entries:
        shape = "[" + ", ".join(map(str, e.tf_shape)) + "]"
        lines.append(f"{e.tf_name:<{w}}  {shape:<18}  {e.layout.value:<13}  {e.torch_key}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_map(name_map_for(sys.argv[1] if len(sys.argv) > 1 else "efficientdet-d0")))
