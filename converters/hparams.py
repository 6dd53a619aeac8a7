"""The official ``--hparams``: what a checkpoint trained by the official scripts was configured with.

The official scripts take ``--hparams`` as a string ``k=v,k=v`` (values read as Python literals, lists
spelled with ``*``: ``aspect_ratios=1.0*2.0*0.5``) or as a ``.yaml`` file — ``config.yaml``, which an
official training run writes into its model dir (``str(config)``: the whole config as YAML, tuples as
``!!python/tuple``). Only YAML can spell an aspect-ratio pair ``[x, y]`` (the string form splits on
commas).

:func:`parse_hparams` reads either form into the fields that shape or label a model here: the anchor
configuration (``num_scales``, ``anchor_scale``, ``aspect_ratios``), ``num_classes``, ``image_size``
and the class names of a ``label_map`` dict; fields that would change the network beyond them
(levels, widths, repeats, backbone, activation) must equal the variant's, since the converters map
the variant's graph. :func:`hparams_for` writes the other way: the string (or the YAML mapping)
the official scripts need to run a model of this project.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from effdet_torch.config import AnchorConfig, EfficientDetConfig, get_config, parse_image_size

__all__ = ["OfficialHparams", "hparams_for", "parse_hparams"]

#: official config key -> our config's value of it: must agree (we map the variant's graph)
_SAME_AS_VARIANT = {
    "min_level": lambda c: c.min_level,
    "max_level": lambda c: c.max_level,
    "fpn_num_filters": lambda c: c.fpn_channels,
    "fpn_cell_repeats": lambda c: c.fpn_repeats,
    "box_class_repeats": lambda c: c.head_repeats,
    "backbone_name": lambda c: c.backbone.name,
    "act_type": lambda c: c.act_type,
}


@dataclass(frozen=True)
class OfficialHparams:
    """What an official ``--hparams`` sets, and the overrides to hand to the official code itself."""

    source: str  # the string, or the YAML file's path
    overrides: dict  # the parsed key → value mapping (``Config.override`` of the official code takes it)
    anchors: AnchorConfig | None = None
    num_classes: int | None = None
    image_size: tuple[int, int] | None = None
    class_names: tuple[str, ...] | None = None

    def config(self, variant: str) -> EfficientDetConfig:
        """The variant's configuration with these overrides."""
        return get_config(variant, image_size=self.image_size, num_classes=self.num_classes, anchors=self.anchors,
                          class_names=self.class_names)


def _literal(text: str):
    """A string-form value as the official ``eval_str_fn``: ``true``/``false``, else a Python literal,
    else the string itself."""
    import ast

    if text in ("true", "false"):
        return text == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_string(text: str) -> dict:
    out: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if part.count("=") != 1:
            raise ValueError(f"--hparams {text!r}: {part!r} is not key=value (a pair [x, y] needs the YAML form)")
        key, value = (s.strip() for s in part.split("="))
        if "." in key:
            raise ValueError(f"--hparams: nested key {key!r} sets nothing that shapes the model here")
        out[key] = [_literal(v) for v in value.split("*")] if "*" in value else _literal(value)
    return out


def _load_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML as the official ``config.yaml`` is written: tuples tagged ``!!python/tuple``."""

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    try:
        data = yaml.load(path.read_text(), Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--hparams {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--hparams {path}: not a YAML mapping of hparams")
    return data


def parse_hparams(value: str, variant: str) -> OfficialHparams:
    """``--hparams`` (a ``k=v,...`` string or a ``.yaml`` file, the official forms) for ``variant``.

    Raises ``ValueError`` naming the field at fault: a value of the wrong type, anchors the
    official code would reject, or a network field that differs from the variant's."""
    text = str(value)
    if "=" in text:
        d, where = _parse_string(text), f"--hparams {text!r}"
    elif text.endswith((".yaml", ".yml")):
        d, where = _load_yaml(Path(text)), f"--hparams {text}"
    else:
        raise ValueError(f"--hparams {text!r}: expected k=v[,k=v...] or a .yaml file (the official forms)")
    base = get_config(variant)
    for key, ours in _SAME_AS_VARIANT.items():
        if key in d and d[key] != ours(base):
            raise ValueError(f"{where}: {key} {d[key]!r} differs from {base.name}'s {ours(base)!r}; only the anchors, "
                             "classes and image size may differ from the variant")
    anchors = None
    if any(k in d for k in ("num_scales", "anchor_scale", "aspect_ratios")):
        a = base.anchors
        fields = {"num_scales": d.get("num_scales", a.num_scales), "anchor_scale": d.get("anchor_scale", a.anchor_scale),
                  "aspect_ratios": d.get("aspect_ratios", list(a.aspect_ratios))}
        if not isinstance(fields["aspect_ratios"], (list, tuple)):
            raise ValueError(f"{where}: aspect_ratios must be a list, got {fields['aspect_ratios']!r}")
        try:
            anchors = AnchorConfig.from_dict(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        if anchors == a:
            anchors = None
    num_classes = d.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"{where}: num_classes must be a whole number >= 1, got {num_classes!r}")
    image_size = None
    if d.get("image_size") is not None:
        try:
            image_size = parse_image_size(d["image_size"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: image_size must be N, 'WxH' or [H, W], got {d['image_size']!r}") from None
    names = None
    label_map = d.get("label_map")
    n = num_classes or base.num_classes
    if isinstance(label_map, dict) and all(isinstance(k, int) for k in label_map) and \
            set(label_map) == set(range(1, n + 1)):
        names = tuple(str(label_map[i]) for i in range(1, n + 1))
    return OfficialHparams(text, d, anchors, num_classes, image_size, names)


def _fmt(v: float) -> str:
    return repr(float(v))


def hparams_for(cfg: EfficientDetConfig) -> tuple[str | None, dict]:
    """What the official scripts need to build ``cfg``'s model: ``(string, yaml)`` — the ``--hparams``
    string (None when it cannot spell the anchors: aspect-ratio pairs) and the mapping to write as a
    ``.yaml`` for ``--hparams FILE``; both empty of what equals the official default.

    Raises ``ValueError`` for anchors the official code cannot build: scales other than the octaves
    ``2^(i/num_scales)``."""
    a = cfg.anchors
    if not a.official_scales:
        raise ValueError(f"anchor scales {list(a.scales)} are not the official octaves 2^(i/n) of any n: the official "
                         "code cannot build these anchors (only this project's formats carry them)")
    base = get_config(cfg.name)
    d: dict = {}
    if cfg.num_classes != base.num_classes:
        d["num_classes"] = cfg.num_classes
    if tuple(cfg.image_size) != tuple(base.image_size):
        h, w = cfg.image_size
        d["image_size"] = h if h == w else f"{w}x{h}"
    if a.num_scales != base.anchors.num_scales:
        d["num_scales"] = a.num_scales
    if a.anchor_scale != base.anchors.anchor_scale:
        d["anchor_scale"] = list(a.anchor_scale) if isinstance(a.anchor_scale, tuple) else a.anchor_scale
    if a.aspect_ratios != base.anchors.aspect_ratios:
        d["aspect_ratios"] = [list(r) if isinstance(r, tuple) else r for r in a.aspect_ratios]
    if cfg.class_names is not None:
        d["label_map"] = {i + 1: n for i, n in enumerate(cfg.class_names)}
    parts = []
    for k, v in d.items():
        if k == "label_map":
            continue  # names do not shape the model; the YAML carries them
        if isinstance(v, list):
            if any(isinstance(x, list) for x in v):
                return None, d
            parts.append(f"{k}={'*'.join(_fmt(x) for x in v)}")
        else:
            parts.append(f"{k}={_fmt(v) if isinstance(v, float) else v}")
    return ",".join(parts), d
