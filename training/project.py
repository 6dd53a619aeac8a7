"""The seed's project file (``projects/NAME.yml``) and dataset layout, read without ``eval``.

``project_name``, ``train_set``, ``val_set``, ``num_gpus``, ``mean``/``std`` (0–1 scale),
``anchors_scales``/``anchors_ratios`` (Python expression strings in the seed: parsed here as numbers,
lists/tuples and ``+ - * / **`` only) and ``obj_list``; the images are
``DATA/project_name/{set}/`` with ``DATA/project_name/annotations/instances_{set}.json``.
"""
from __future__ import annotations

import ast
import operator
from pathlib import Path

__all__ = ["load_project", "parse_number_list", "pixel_scale", "dataset_paths"]

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


def load_project(path: Path) -> dict:
    import yaml

    path = Path(path)
    try:
        p = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the project file ({str(e).splitlines()[0]})") from None
    if not isinstance(p, dict):
        raise ValueError(f"{path}: not a project mapping")
    for key in ("project_name", "train_set", "obj_list"):
        if key not in p:
            raise ValueError(f"{path}: missing {key!r}")
    if not isinstance(p["obj_list"], list) or not p["obj_list"]:
        raise ValueError(f"{path}: obj_list must be a non-empty list of class names")
    for key in ("anchors_scales", "anchors_ratios"):
        if key in p:
            try:
                p[key] = parse_number_list(p[key])
            except ValueError as e:
                raise ValueError(f"{path}: {key}: {e}") from None
    return p


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
