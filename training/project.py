"""The seed's project file (``projects/NAME.yml``) and dataset layout, read without ``eval``.

``project_name``, ``train_set``, ``val_set``, ``num_gpus``, ``mean``/``std`` (0–1 scale),
``anchors_scales``/``anchors_ratios`` (Python expression strings in the seed: parsed here as numbers,
lists/tuples and ``+ - * / **`` only; :func:`project_anchors` turns them into the model's anchors),
the official ``anchor_scale`` (optional) and ``obj_list``; the images are
``DATA/project_name/{set}/`` with ``DATA/project_name/annotations/instances_{set}.json``.
"""
from __future__ import annotations

import ast
import operator
from pathlib import Path

from effdet_torch.config import AnchorConfig, get_config, octave_scales

__all__ = ["dataset_paths", "load_project", "parse_number_list", "pixel_scale", "project_anchors"]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def parse_number_list(text) -> list:
    """The seed's ``anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'`` and
    ``anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'``: numbers, tuples/lists and
    + - * / ** only (no ``eval``)."""
    if not isinstance(text, str):
        return text

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not a number expression: {ast.dump(node)[:60]}")

    try:
        return ev(ast.parse(text, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not a number expression: {text!r} ({e.msg})") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_project(path: Path) -> dict:
    """The project mapping, every field checked: one ``ValueError`` naming the file, the key and the
    value at fault."""
    import yaml

    path = Path(path)
    try:
        p = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the project file ({str(e).splitlines()[0]})") from None
    if not isinstance(p, dict):
        raise ValueError(f"{path}: not a project mapping")

    def bad(key: str, what: str) -> None:
        raise ValueError(f"{path}: {key}: {what}, got {p[key]!r}")

    for key in ("project_name", "train_set", "obj_list"):
        if p.get(key) is None:
            raise ValueError(f"{path}: missing {key!r}")
    for key in ("project_name", "train_set", "val_set"):
        if p.get(key) is not None and (not isinstance(p[key], (str, int)) or isinstance(p[key], bool)
                                       or not str(p[key]) or "/" in str(p[key]) or str(p[key]) in (".", "..")):
            bad(key, "must be a plain folder name")
    names = p["obj_list"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        bad("obj_list", "must be a non-empty list of class names")
    if len(set(names)) != len(names):
        bad("obj_list", "names a class twice (categories are matched by name)")
    if p.get("num_gpus") is not None and (not isinstance(p["num_gpus"], int) or isinstance(p["num_gpus"], bool)
                                           or p["num_gpus"] < 0):
        bad("num_gpus", "must be a whole number >= 0 (the seed's 0: no GPU)")
    for key in ("mean", "std"):
        v = p.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v)
                              or (key == "std" and min(v) <= 0)):
            bad(key, "must be three numbers (RGB)" + (", each > 0" if key == "std" else ""))
    for key in ("anchors_scales", "anchors_ratios"):
        if p.get(key) is None:
            continue
        try:
            p[key] = parse_number_list(p[key])
        except ValueError as e:
            raise ValueError(f"{path}: {key}: {e}") from None
        if key == "anchors_scales":
            ok = isinstance(p[key], list) and p[key] and all(_is_number(x) and x > 0 for x in p[key])
            if not ok:
                bad(key, "must be a list of positive numbers")
        elif not (isinstance(p[key], list) and p[key] and all(
                (isinstance(r, list) and len(r) == 2 and all(_is_number(x) and x > 0 for x in r))
                or (_is_number(r) and r > 0) for r in p[key])):
            bad(key, "must be a list of (width, height) pairs (or official ratios width/height) of positive numbers")
    if p.get("anchor_scale") is not None:
        v = p["anchor_scale"]
        if not ((_is_number(v) and v > 0) or (isinstance(v, list) and v and all(_is_number(x) and x > 0 for x in v))):
            bad("anchor_scale", "must be a positive number (or one per level)")
    return p


#: how far the seed's spellings of the official ratios are from them: its default (1.4, 0.7) has area 0.98
_AREA_TOL = 0.03
_RATIO_TOL = 1e-6


def project_anchors(project: dict, variant: str, source: str = "project") -> AnchorConfig:
    """The anchors a project file asks for (official semantics, :class:`~effdet_torch.config.AnchorConfig`):

    - ``anchors_scales``: multipliers of the base size; the official octaves ``2^(i/n)`` (within
      1e-6, the seed's default spells them so) stay official, any other list is kept as given;
    - ``anchors_ratios``: ``(x, y)`` pairs used as given, as the official code reads a pair — except
      that a list which only re-spells the variant's official ratios (each pair of area 1 within 3 %
      whose ``x / y`` equals the official ratio: the seed's default ``[(1.0, 1.0), (1.4, 0.7), (0.7,
      1.4)]``) means the official ratios themselves; a plain number ``r`` is an official ratio
      (``√r`` wide, ``1/√r`` high: what ``effdet-anchors`` suggests, and the official ``--hparams``
      string can carry);
    - ``anchor_scale`` (the official name; not in the seed's files): the base size in strides.
    Absent fields keep the variant's official values."""
    official = get_config(variant).anchors
    scales = project.get("anchors_scales")
    if scales is None:
        scales = official.scales
    else:
        octaves = octave_scales(len(scales))
        scales = octaves if all(abs(s - o) <= _RATIO_TOL for s, o in zip(scales, octaves)) else tuple(scales)
    ratios = project.get("anchors_ratios")
    if ratios is None:
        ratios = official.aspect_ratios
    elif len(ratios) == len(official.aspect_ratios) and all(
            isinstance(p, list) and abs(p[0] * p[1] - 1) <= _AREA_TOL and abs(p[0] / p[1] - r) <= _RATIO_TOL
            for p, r in zip(ratios, official.aspect_ratios)):
        ratios = official.aspect_ratios
    else:
        ratios = tuple(tuple(r) if isinstance(r, list) else float(r) for r in ratios)
    anchor_scale = project.get("anchor_scale", official.anchor_scale)
    try:
        return AnchorConfig(anchor_scale=anchor_scale, scales=tuple(scales), aspect_ratios=tuple(ratios))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def pixel_scale(values, default) -> list[float]:
    """The seed writes mean/std on the 0–1 scale; the official pipeline normalises 0–255 pixels."""
    if values is None:
        return list(default)
    values = [float(v) for v in values]
    return [v * 255.0 for v in values] if max(values) <= 1.0 else values


def dataset_paths(data_path, project: dict, which: str) -> tuple[Path, Path] | None:
    """``(annotation file, image folder)`` of ``project[which]`` (``train_set``/``val_set``), or None."""
    name = project.get(which)
    if not name:
        return None
    root = Path(data_path) / str(project["project_name"])
    return root / "annotations" / f"instances_{name}.json", root / str(name)
