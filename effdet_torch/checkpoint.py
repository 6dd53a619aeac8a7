"""Weights in and out of the model library: torch state-dict files, the class count of a state dict,
and a registry through which official checkpoints are read.

The model library does not know the official formats. :mod:`converters` registers its reader under
the ``effdet_torch.checkpoint_loaders`` entry point (``pyproject.toml``), so
``create_model(name, checkpoint="efficientdet-d0.tar.gz")`` works when the converters package is
installed, without this package importing it. ``register_checkpoint_loader`` adds a reader at run time.
"""
from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch
from torch import Tensor

__all__ = ["CheckpointError", "CLASS_BIAS_KEY", "STATE_DICT_SUFFIXES", "load_state_dict_file", "num_classes_of",
           "register_checkpoint_loader", "load_checkpoint", "torch_writer"]

CLASS_BIAS_KEY = "class_net.predict.conv_pw.bias"  # [A · num_classes]: the class predictor's bias
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")
ENTRY_POINT_GROUP = "effdet_torch.checkpoint_loaders"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, unsupported or does not fit; the message names the
    file and, where relevant, the variable."""


class CheckpointLoader(Protocol):
    def __call__(self, path: str, variant: str, ema: bool) -> dict[str, Tensor]: ...


_LOADERS: list[CheckpointLoader] = []
_ENTRY_POINTS_READ = False


def register_checkpoint_loader(loader: CheckpointLoader) -> CheckpointLoader:
    """Add a reader of non-torch checkpoints: ``loader(path, variant, ema) -> state dict``.

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


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A converted ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file, checked
    to be a state dict (``{"state_dict": ...}`` wrappers are unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable torch file with weights_only=True ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state_dict (expected a dict of str -> Tensor, got {type(obj).__name__})")
    return obj


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


def load_checkpoint(path: str | os.PathLike, variant: str | None = None, ema: bool = True) -> dict[str, Tensor]:
    """A torch state dict from a converted ``.pth``/``.safetensors`` or, through the registered readers,
    an official checkpoint (TF1 directory/prefix/tarball, Keras ``.h5``), which needs ``variant``."""
    path = os.fspath(path)
    if path.endswith(STATE_DICT_SUFFIXES):
        return load_state_dict_file(path)
    if variant is None:
        raise CheckpointError(f"{path}: converting an official checkpoint needs the variant name")
    loaders = _loaders()
    if not loaders:
        raise CheckpointError(f"{path}: reading official checkpoints needs the converters package "
                              f"(no {ENTRY_POINT_GROUP!r} entry point is installed; pip install effdet-parity)")
    return loaders[0](path, variant, ema)


