"""One table of the 15 official EfficientDet variants, and the BiFPN graph as data.

Every number here is a fact of google/automl ``efficientdet/hparams_config.py`` and the EfficientNet
builders (recorded in ``golden/manifests/<variant>.json.gz`` → ``config_facts``); the test
``tests/test_converters.py::test_config_table_equals_official_config`` checks the table against those
manifests (the BN fields, which the manifests do not record: ``tests/test_model.py``).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

__all__ = [
    "AnchorConfig",
    "Aspect",
    "BackboneConfig",
    "BlockArgs",
    "EfficientDetConfig",
    "FpnNode",
    "VARIANTS",
    "bifpn_nodes",
    "get_config",
    "octave_scales",
    "parse_image_size",
    "resolve_variant_name",
]


@dataclass(frozen=True)
class BlockArgs:
    """One EfficientNet stage before width/depth scaling (``r{repeats}_k{kernel}_s{stride}_e{expand}``)."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_filters: int
    out_filters: int
    se_ratio: float = 0.25


# The EfficientNet-B0 stage table (the paper's Table 1), shared by every B* and lite* backbone.
EFFICIENTNET_STAGES: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class BackboneConfig:
    """An EfficientNet backbone: width/depth multipliers and the lite-family switches."""

    name: str
    width: float
    depth: float
    lite: bool = False  # lite: no SE, stem and first/last stage repeats not scaled (fix_head_stem)

    @property
    def use_se(self) -> bool:
        return not self.lite

    @property
    def survival_prob(self) -> float | None:
        """Drop-connect (stochastic depth) in training: the EfficientNet and EfficientNet-lite builders'
        default survival probability 0.8, except that EfficientDet passes 0.0 (off) to backbones whose
        name contains ``b0`` (so D0 has none; lite0 has it)."""
        return None if "b0" in self.name else 0.8

    def round_filters(self, filters: int) -> int:
        """Scale channels by ``width`` and round to a multiple of 8, never more than 10 % down."""
        divisor = 8
        scaled = filters * self.width
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        if rounded < 0.9 * scaled:
            rounded += divisor
        return int(rounded)

    def round_repeats(self, repeats: int) -> int:
        return int(math.ceil(self.depth * repeats))

    def stem_filters(self) -> int:
        return 32 if self.lite else self.round_filters(32)

    def stages(self) -> list[BlockArgs]:
        """The scaled stage table: filters rounded, repeats scaled (lite keeps first/last repeats)."""
        out = []
        last = len(EFFICIENTNET_STAGES) - 1
        for i, s in enumerate(EFFICIENTNET_STAGES):
            keep = self.lite and i in (0, last)
            out.append(
                replace(
                    s,
                    repeats=s.repeats if keep else self.round_repeats(s.repeats),
                    # the first stage reads the stem, which lite keeps at 32 channels
                    in_filters=self.stem_filters() if i == 0 else self.round_filters(s.in_filters),
                    out_filters=self.round_filters(s.out_filters),
                )
            )
        return out


BACKBONES: dict[str, BackboneConfig] = {
    b.name: b
    for b in (
        BackboneConfig("efficientnet-b0", 1.0, 1.0),
        BackboneConfig("efficientnet-b1", 1.0, 1.1),
        BackboneConfig("efficientnet-b2", 1.1, 1.2),
        BackboneConfig("efficientnet-b3", 1.2, 1.4),
        BackboneConfig("efficientnet-b4", 1.4, 1.8),
        BackboneConfig("efficientnet-b5", 1.6, 2.2),
        BackboneConfig("efficientnet-b6", 1.8, 2.6),
        BackboneConfig("efficientnet-b7", 2.0, 3.1),
        BackboneConfig("efficientnet-lite0", 1.0, 1.0, lite=True),
        BackboneConfig("efficientnet-lite1", 1.0, 1.1, lite=True),
        BackboneConfig("efficientnet-lite2", 1.1, 1.2, lite=True),
        BackboneConfig("efficientnet-lite3", 1.2, 1.4, lite=True),
        BackboneConfig("efficientnet-lite4", 1.4, 1.8, lite=True),
    )
}


@dataclass(frozen=True)
class FpnNode:
    """A BiFPN node: its pyramid level and the indices of its inputs in the running feature list."""

    level: int
    inputs: tuple[int, ...]


def bifpn_nodes(min_level: int, max_level: int) -> tuple[FpnNode, ...]:
    """The BiFPN graph (official ``fpn_configs.bifpn_config``) as a node list.

    Feature list indices ``0..L-1`` are the cell inputs P_min..P_max; each node appends one entry.
    Top-down: P_{max-1}'..P_min'' take (P_l, the node above); bottom-up: P_{min+1}''..P_max'' take
    (P_l, P_l' when it exists, the node below). For P3-P7 this is
    P6'(3,4) P5'(2,5) P4'(1,6) P3''(0,7) P4''(1,7,8) P5''(2,6,9) P6''(3,5,10) P7''(4,11).
    """
    levels = list(range(min_level, max_level + 1))
    last = {lvl: [i] for i, lvl in enumerate(levels)}  # every entry of each level, in order
    nodes: list[FpnNode] = []
    n = len(levels)
    for lvl in range(max_level - 1, min_level - 1, -1):  # top-down
        nodes.append(FpnNode(lvl, (last[lvl][-1], last[lvl + 1][-1])))
        last[lvl].append(n + len(nodes) - 1)
    for lvl in range(min_level + 1, max_level + 1):  # bottom-up
        nodes.append(FpnNode(lvl, tuple(last[lvl]) + (last[lvl - 1][-1],)))
        last[lvl].append(n + len(nodes) - 1)
    return tuple(nodes)


Aspect = float | tuple[float, float]  # an official aspect ratio: r (x·√r, y/√r) or an (x, y) pair used as given


def octave_scales(num_scales: int) -> tuple[float, ...]:
    """The official anchor scales of ``num_scales``: ``2 ** (i / num_scales)`` (``anchors.Anchors``'
    ``2**octave_scale`` with ``octave_scale = i / float(num_scales)``, the same float64 values)."""
    return tuple(2 ** (i / float(num_scales)) for i in range(num_scales))


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class AnchorConfig:
    """The anchors of a model (official ``tf2/anchors.py``; the model's head has ``num_anchors`` outputs
    per location). At level ``l`` with stride ``s_l``, anchor shape ``(scale k, aspect a)`` has the base
    size ``anchor_scale_l · s_l · k`` and half extents ``base·ax/2`` (x), ``base·ay/2`` (y), where a
    float ``a`` gives ``(ax, ay) = (√a, 1/√a)`` and an ``(x, y)`` pair is used as given. Shapes are
    ordered scale-major, aspect-minor.

    - ``anchor_scale``: one float, or one per level (the official hparams accept both);
    - ``scales``: the multipliers ``k`` — officially the octaves ``2^(i / num_scales)``
      (:func:`octave_scales`); any other positive list (the seed's ``anchors_scales``) goes beyond
      the official code: :attr:`official_scales` says which, and exports to the official formats
      refuse it;
    - ``aspect_ratios``: floats and/or ``(x, y)`` pairs (the official YAML form; its ``--hparams``
      string cannot spell pairs).
    """

    anchor_scale: float | tuple[float, ...] = 4.0
    scales: tuple[float, ...] = octave_scales(3)
    aspect_ratios: tuple[Aspect, ...] = (1.0, 2.0, 0.5)

    def __post_init__(self) -> None:
        a = self.anchor_scale
        a = tuple(float(v) for v in a) if isinstance(a, (list, tuple)) else a
        if not (all(_positive(v) for v in a) and a if isinstance(a, tuple) else _positive(a)):
            raise ValueError(f"anchor_scale must be a positive number or one per level, got {self.anchor_scale!r}")
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else None
        if not scales or not all(_positive(v) for v in scales):
            raise ValueError(f"anchor scales must be a non-empty list of positive numbers, got {self.scales!r}")
        ratios = []
        for r in self.aspect_ratios if isinstance(self.aspect_ratios, (list, tuple)) else [None]:
            if isinstance(r, (list, tuple)) and len(r) == 2 and all(_positive(v) for v in r):
                ratios.append((float(r[0]), float(r[1])))
            elif _positive(r):
                ratios.append(float(r))
            else:
                raise ValueError(f"aspect ratios must be positive numbers or (x, y) pairs of them, got "
                                 f"{self.aspect_ratios!r}")
        if not ratios:
            raise ValueError("aspect ratios must not be empty")
        object.__setattr__(self, "anchor_scale", float(a) if not isinstance(a, tuple) else a)
        object.__setattr__(self, "scales", tuple(float(v) for v in scales))
        object.__setattr__(self, "aspect_ratios", tuple(ratios))

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_anchors(self) -> int:
        """Anchors per location: the head's outputs per location are this × classes (or × 4)."""
        return self.num_scales * len(self.aspect_ratios)

    @property
    def official_scales(self) -> bool:
        """The scales are the official octaves of their count (representable by ``num_scales``)."""
        return self.scales == octave_scales(self.num_scales)

    def level_scales(self, num_levels: int) -> tuple[float, ...]:
        """``anchor_scale`` per level (a float repeated, or the per-level list checked for length)."""
        if isinstance(self.anchor_scale, tuple):
            if len(self.anchor_scale) != num_levels:
                raise ValueError(f"anchor_scale has {len(self.anchor_scale)} values for {num_levels} levels")
            return self.anchor_scale
        return (self.anchor_scale,) * num_levels

    def axis_factors(self) -> list[tuple[float, float]]:
        """``(ax, ay)`` per aspect ratio: ``(√a, 1/√a)`` for a float (the official float64
        arithmetic: ``ax = np.sqrt(a)``, ``ay = 1.0 / ax``), a pair as given."""
        out = []
        for r in self.aspect_ratios:
            if isinstance(r, tuple):
                out.append(r)
            else:
                ax = float(math.sqrt(r))
                out.append((ax, 1.0 / ax))
        return out

    def to_dict(self) -> dict:
        """JSON/YAML-ready: ``anchor_scale`` (float or list), ``scales`` and ``aspect_ratios`` (floats or
        ``[x, y]``), plus ``num_scales``."""
        return {"anchor_scale": list(self.anchor_scale) if isinstance(self.anchor_scale, tuple) else self.anchor_scale,
                "num_scales": self.num_scales, "scales": list(self.scales),
                "aspect_ratios": [list(r) if isinstance(r, tuple) else r for r in self.aspect_ratios]}

    @classmethod
    def from_dict(cls, d: dict) -> "AnchorConfig":
        """The inverse of :meth:`to_dict`; ``scales`` may be left out for the official octaves of
        ``num_scales`` (the official hparams' form)."""
        if not isinstance(d, dict):
            raise ValueError(f"an anchor configuration must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"anchor_scale", "num_scales", "scales", "aspect_ratios"}
        if unknown:
            raise ValueError(f"unknown anchor field(s) {sorted(unknown)}")
        scales = d.get("scales")
        n = d.get("num_scales")
        if scales is None:
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise ValueError(f"num_scales must be a whole number >= 1, got {n!r}")
            scales = octave_scales(3 if n is None else n)
        elif n is not None and n != len(scales):
            raise ValueError(f"num_scales {n} but {len(scales)} scales {list(scales)}")
        default = cls()
        return cls(anchor_scale=d.get("anchor_scale", default.anchor_scale), scales=tuple(scales),
                   aspect_ratios=tuple(tuple(r) if isinstance(r, list) else r
                                       for r in d.get("aspect_ratios", default.aspect_ratios)))

    def describe(self) -> str:
        """One line: ``anchor_scale 4.0, scales [1, 1.26, 1.587] (official octaves of 3), aspect
        ratios [1.0, 2.0, 0.5]``."""
        scales = "[" + ", ".join(f"{s:.4g}" for s in self.scales) + "]"
        how = f"official octaves of {self.num_scales}" if self.official_scales else "custom multipliers"
        ratios = "[" + ", ".join(f"({r[0]:g}, {r[1]:g})" if isinstance(r, tuple) else f"{r:g}"
                                 for r in self.aspect_ratios) + "]"
        a = self.anchor_scale
        a = "[" + ", ".join(f"{v:g}" for v in a) + "]" if isinstance(a, tuple) else f"{a:g}"
        return f"anchor_scale {a}, scales {scales} ({how}), aspect ratios {ratios}"


@dataclass(frozen=True)
class EfficientDetConfig:
    """Resolved config of one official variant (only what inference and conversion need)."""

    name: str
    backbone: BackboneConfig
    image_size: tuple[int, int]  # (H, W)
    fpn_channels: int
    fpn_repeats: int
    head_repeats: int
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    min_level: int = 3
    max_level: int = 7
    fpn_weight_method: str = "fastattn"  # 'fastattn' (d0-d5) or 'sum' (d6, d7, d7x, lite*)
    act_type: str = "swish"  # 'swish' (d*) or 'relu6' (lite*)
    num_classes: int = 90
    class_names: tuple[str, ...] | None = None  # model class i (1-based) is class_names[i - 1]; None: COCO ids
    mean_rgb: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    stddev_rgb: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    # Official inference post-processing: Gaussian soft-NMS (sigma 0.5, passed to NMSV5 as 0.25).
    nms_sigma: float = 0.5
    nms_iou_threshold: float = 0.5
    nms_score_threshold: float = 0.001
    max_detections: int = 100
    eval_max_nms_inputs: int = 5000  # anchors.MAX_DETECTION_POINTS on the COCO-eval path
    # every BN layer of the backbone, BiFPN and heads (ops.tf_batch_norm); official: utils.batch_normalization
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99  # TF convention (torch momentum = 1 - this)
    fpn_nodes: tuple[FpnNode, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.fpn_nodes:
            object.__setattr__(self, "fpn_nodes", bifpn_nodes(self.min_level, self.max_level))
        self.anchors.level_scales(len(self.levels))  # a per-level anchor_scale must fit the levels
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def levels(self) -> list[int]:
        return list(range(self.min_level, self.max_level + 1))

    @property
    def num_anchors(self) -> int:
        return self.anchors.num_anchors

    def feature_sizes(self, image_size: tuple[int, int] | None = None) -> dict[int, tuple[int, int]]:
        """Feature map size per level: each level halves with ceil (official ``get_feat_sizes``)."""
        h, w = image_size or self.image_size
        sizes = {0: (h, w)}
        for lvl in range(1, self.max_level + 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            sizes[lvl] = (h, w)
        return sizes


_LITE_MEAN = (127.0, 127.0, 127.0)
_LITE_STD = (128.0, 128.0, 128.0)


def _d(name, backbone, size, ch, fpn_rep, head_rep, anchor_scale=4.0, method="fastattn", max_level=7):
    return EfficientDetConfig(
        name=name, backbone=BACKBONES[backbone], image_size=(size, size), fpn_channels=ch,
        fpn_repeats=fpn_rep, head_repeats=head_rep, anchors=AnchorConfig(anchor_scale=anchor_scale),
        fpn_weight_method=method, max_level=max_level,
    )


def _lite(name, backbone, size, ch, fpn_rep, head_rep, anchor_scale):
    return EfficientDetConfig(
        name=name, backbone=BACKBONES[backbone], image_size=(size, size), fpn_channels=ch,
        fpn_repeats=fpn_rep, head_repeats=head_rep, anchors=AnchorConfig(anchor_scale=anchor_scale),
        fpn_weight_method="sum", act_type="relu6", mean_rgb=_LITE_MEAN, stddev_rgb=_LITE_STD,
    )


#: The variant table (official hparams_config.py). lite3/lite4 keep the default anchor_scale 4.0.
VARIANTS: dict[str, EfficientDetConfig] = {
    c.name: c
    for c in (
        _d("efficientdet-d0", "efficientnet-b0", 512, 64, 3, 3),
        _d("efficientdet-d1", "efficientnet-b1", 640, 88, 4, 3),
        _d("efficientdet-d2", "efficientnet-b2", 768, 112, 5, 3),
        _d("efficientdet-d3", "efficientnet-b3", 896, 160, 6, 4),
        _d("efficientdet-d4", "efficientnet-b4", 1024, 224, 7, 4),
        _d("efficientdet-d5", "efficientnet-b5", 1280, 288, 7, 4),
        _d("efficientdet-d6", "efficientnet-b6", 1280, 384, 8, 5, method="sum"),
        _d("efficientdet-d7", "efficientnet-b6", 1536, 384, 8, 5, anchor_scale=5.0, method="sum"),
        _d("efficientdet-d7x", "efficientnet-b7", 1536, 384, 8, 5, method="sum", max_level=8),
        _lite("efficientdet-lite0", "efficientnet-lite0", 320, 64, 3, 3, 3.0),
        _lite("efficientdet-lite1", "efficientnet-lite1", 384, 88, 4, 3, 3.0),
        _lite("efficientdet-lite2", "efficientnet-lite2", 448, 112, 5, 3, 3.0),
        _lite("efficientdet-lite3", "efficientnet-lite3", 512, 160, 6, 4, 4.0),
        _lite("efficientdet-lite3x", "efficientnet-lite3", 640, 200, 6, 4, 3.0),
        _lite("efficientdet-lite4", "efficientnet-lite4", 640, 224, 7, 4, 4.0),
    )
}


def resolve_variant_name(name: str) -> str:
    """``d7x`` / ``D7X`` / ``efficientdet-d7x`` → ``efficientdet-d7x``; unknown names suggest the nearest."""
    key = name.strip().lower().replace("_", "-")
    if not key.startswith("efficientdet-"):
        key = "efficientdet-" + key
    if key in VARIANTS:
        return key
    short = [v.removeprefix("efficientdet-") for v in VARIANTS]
    close = difflib.get_close_matches(key.removeprefix("efficientdet-"), short, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown EfficientDet variant {name!r}.{hint} Valid: {', '.join(short)}")


def parse_image_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """Image size as ``(H, W)`` from an int, ``(H, W)``, or the official ``'WxH'`` string."""
    if isinstance(size, int):
        hw = (size, size)
    elif isinstance(size, str):
        s = size.lower().strip()
        if "x" in s:
            w, h = s.split("x", 1)
            hw = (int(h), int(w))
        else:
            hw = (int(s), int(s))
    else:
        h, w = size
        hw = (int(h), int(w))
    if min(hw) < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return hw


def get_config(name: str, image_size: int | str | Sequence[int] | None = None,
               num_classes: int | None = None, anchors: AnchorConfig | None = None,
               class_names: Sequence[str] | None = None) -> EfficientDetConfig:
    """The official config of ``name`` with optional ``image_size`` / ``num_classes`` / ``anchors`` /
    ``class_names`` overrides (``num_classes`` defaults to the number of ``class_names``)."""
    cfg = VARIANTS[resolve_variant_name(name)]
    changes: dict = {}
    if image_size is not None:
        changes["image_size"] = parse_image_size(image_size)
    if class_names is not None:
        changes["class_names"] = tuple(class_names)
        num_classes = len(class_names) if num_classes is None else num_classes
    if num_classes is not None:
        changes["num_classes"] = int(num_classes)
    if anchors is not None:
        changes["anchors"] = anchors
    return replace(cfg, **changes) if changes else cfg
