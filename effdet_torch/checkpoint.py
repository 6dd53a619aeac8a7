"""Weights in and out of the model library: torch state-dict files with the record of the model they
belong to, the class count of a state dict, and a registry through which official checkpoints are read.

The record (:func:`model_record`) is what shapes and labels the model beyond its variant — the anchor
configuration, the classes and their names, the image size it was trained at. Every ``.pth`` and
``.safetensors`` this project writes carries it (``{"state_dict": ..., "effdet": record}``; in a
safetensors file the JSON under the metadata key ``effdet``), and loading reads it
(:func:`load_weights_file`): weights run under the configuration they were trained with. Files
without one (earlier ``.pth``, other tools' state dicts) are official-configuration files.

The model library does not know the official formats. :mod:`converters` registers its reader under
the ``effdet_torch.checkpoint_loaders`` entry point (``pyproject.toml``), so
``create_model(name, checkpoint="efficientdet-d0.tar.gz")`` works when the converters package is
installed, without this package importing it. ``register_checkpoint_loader`` adds a reader at run time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch
from torch import Tensor

from .config import AnchorConfig, EfficientDetConfig, parse_image_size, resolve_variant_name

__all__ = ["CLASS_BIAS_KEY", "Checkpoint", "CheckpointError", "MODEL_RECORD_FORMAT", "RECORD_KEY", "STATE_DICT_SUFFIXES",
           "check_record", "load_checkpoint", "load_state_dict_file", "load_weights_file", "model_record",
           "num_classes_of", "register_checkpoint_loader", "torch_writer", "weights_writer"]

CLASS_BIAS_KEY = "class_net.predict.conv_pw.bias"  # [A · num_classes]: the class predictor's bias
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")
ENTRY_POINT_GROUP = "effdet_torch.checkpoint_loaders"
RECORD_KEY = "effdet"  # the record's key beside "state_dict" (.pth) and in the metadata (.safetensors)
MODEL_RECORD_FORMAT = "effdet-parity/model-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, unsupported or does not fit; the message names the
    file and, where relevant, the variable."""


class CheckpointLoader(Protocol):
    def __call__(self, path: str, variant: str, ema: bool, anchors: AnchorConfig | None = None) -> dict[str, Tensor]: ...


_LOADERS: list[CheckpointLoader] = []
_ENTRY_POINTS_READ = False


def register_checkpoint_loader(loader: CheckpointLoader) -> CheckpointLoader:
    """Add a reader of non-torch checkpoints: ``loader(path, variant, ema, anchors) -> state dict``.

    The newest registered reader is used; it raises :class:`CheckpointError` for a file it cannot read.
    """
    if loader not in _LOADERS:
        _LOADERS.insert(0, loader)
    return loader


def _loaders() -> list[CheckpointLoader]:
    global _ENTRY_POINTS_READ
    if not _ENTRY_POINTS_READ:
        _ENTRY_POINTS_READ = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            loader = ep.load()
            if loader not in _LOADERS:
                _LOADERS.append(loader)
    return _LOADERS


def model_record(cfg: EfficientDetConfig) -> dict:
    """The record that travels with a model's weights: variant, classes (and their names), the image
    size, the anchor configuration (JSON-ready)."""
    return {"format": MODEL_RECORD_FORMAT, "variant": cfg.name, "num_classes": cfg.num_classes,
            "class_names": list(cfg.class_names) if cfg.class_names is not None else None,
            "image_size": list(cfg.image_size), "anchors": cfg.anchors.to_dict()}


def check_record(record, source: str) -> dict:
    """A record read from ``source``, checked field by field; returns it with ``anchors`` as an
    :class:`~effdet_torch.config.AnchorConfig`, ``image_size`` as ``(H, W)`` and ``class_names`` as a
    tuple (or None). One :class:`CheckpointError` names the file and the field at fault."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: the model record (key {RECORD_KEY!r}) {what}")

    if not isinstance(record, dict):
        raise bad(f"is a {type(record).__name__}, not a mapping")
    if record.get("format") != MODEL_RECORD_FORMAT:
        raise bad(f"has format {record.get('format')!r}; this version reads {MODEL_RECORD_FORMAT!r}")
    out = dict(record)
    try:
        out["variant"] = resolve_variant_name(str(record.get("variant")))
    except ValueError as e:
        raise bad(f"names no variant: {e}") from None
    n = record.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad(f"num_classes: expected a whole number >= 1, got {n!r}")
    names = record.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != n or not all(isinstance(x, str) for x in names)):
        raise bad(f"class_names: expected {n} names or null, got {names!r}"[:300])
    out["class_names"] = tuple(names) if names is not None else None
    try:
        out["image_size"] = parse_image_size(record.get("image_size"))
    except (TypeError, ValueError):
        raise bad(f"image_size: expected [H, W], got {record.get('image_size')!r}") from None
    try:
        out["anchors"] = AnchorConfig.from_dict(record.get("anchors"))
    except (TypeError, ValueError) as e:
        raise bad(f"anchors: {e}") from None
    return out


@dataclass
class Checkpoint:
    """Weights read from a file: the state dict and the model record written with it (checked by
    :func:`check_record`), or None for files without one — official checkpoints and earlier ``.pth``."""

    state: dict[str, Tensor]
    record: dict | None = None


def load_weights_file(path: str | os.PathLike) -> Checkpoint:
    """A converted ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, checked
    to be a state dict (``{"state_dict": ...}`` wrappers are unwrapped), with its model record."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    record = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        if RECORD_KEY in meta:
            try:
                record = json.loads(meta[RECORD_KEY])
            except ValueError:
                raise CheckpointError(f"{path}: the metadata {RECORD_KEY!r} is not JSON") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a loadable torch file with weights_only=True ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            record = obj.get(RECORD_KEY)
            obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state_dict (expected a dict of str -> Tensor, got {type(obj).__name__})")
    return Checkpoint(obj, check_record(record, str(path)) if record is not None else None)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of :func:`load_weights_file` (the record left out)."""
    return load_weights_file(path).state


def weights_writer(state: Mapping[str, Tensor], cfg: EfficientDetConfig, path: str | os.PathLike) -> Callable[[str], None]:
    """A ``write(tmp)`` for :func:`effdet_torch.files.atomic_write` of ``state`` with the record of
    ``cfg``: ``.safetensors`` by the file's suffix (the record as JSON metadata), else ``torch.save``
    of ``{"state_dict": state, "effdet": record}``."""
    record = model_record(cfg)
    state = {k: v.contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return lambda tmp: save_file(state, tmp, metadata={RECORD_KEY: json.dumps(record)})
    return torch_writer({"state_dict": state, RECORD_KEY: record})


def torch_writer(obj) -> Callable[[str], None]:
    """A ``write(tmp)`` for :func:`effdet_torch.files.atomic_write`: ``torch.save(obj)`` into a file object,
    which keeps the archive's root name fixed ("archive"), so the same tensors always give the same bytes."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write


def num_classes_of(state: Mapping[str, Tensor], num_anchors: int, source: str = "state dict") -> int:
    """Classes of an EfficientDet state dict: the class predictor's bias has ``num_anchors · classes`` channels."""
    if CLASS_BIAS_KEY not in state:
        raise CheckpointError(f"{source}: not an EfficientDet state dict (no {CLASS_BIAS_KEY!r})")
    width = int(state[CLASS_BIAS_KEY].shape[0])
    if width % num_anchors:
        raise CheckpointError(f"{source}: {CLASS_BIAS_KEY} has {width} channels, not a multiple of "
                              f"{num_anchors} anchors")
    return width // num_anchors


def load_checkpoint(path: str | os.PathLike, variant: str | None = None, ema: bool = True,
                    anchors: AnchorConfig | None = None) -> Checkpoint:
    """Weights from a converted ``.pth``/``.safetensors`` (with its record) or, through the registered
    readers, an official checkpoint (TF1 directory/prefix/tarball, Keras ``.h5``), which needs
    ``variant`` and, when it was trained with other than the official anchors, their ``anchors``."""
    path = os.fspath(path)
    if path.endswith(STATE_DICT_SUFFIXES):
        return load_weights_file(path)
    if variant is None:
        raise CheckpointError(f"{path}: converting an official checkpoint needs the variant name")
    loaders = _loaders()
    if not loaders:
        raise CheckpointError(f"{path}: reading official checkpoints needs the converters package "
                              f"(no {ENTRY_POINT_GROUP!r} entry point is installed; pip install effdet-parity)")
    return Checkpoint(loaders[0](path, variant, ema, anchors))


