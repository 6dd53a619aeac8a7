"""Torch state dict → the official formats: a TF1 release checkpoint and a Keras ``.h5``.

The inverse of :mod:`converters.convert`, driven by the same declarative name map, without
TensorFlow (the TensorBundle writer and h5py):

- TF1 (``write_tf1_checkpoint``): ``DIR/checkpoint``, ``DIR/model.index``,
  ``DIR/model.data-00000-of-00001`` holding every official variable under its official name, its
  ``/ExponentialMovingAverage`` shadow (equal to the weight: the official loader assigns the shadow)
  and ``global_step`` (int64) — the layout of the official release checkpoints.
- Keras ``.h5`` (``write_keras_h5``): the ``model.save_weights('x.h5')`` layout of the official
  ``EfficientDetNet`` (tf_keras legacy h5): root attributes ``backend``, ``keras_version``,
  ``layer_names`` (every top-level layer, weightless ones included); one group per layer with a
  ``weight_names`` attribute (split into ``weight_names0..N`` past HDF5's 64512-byte attribute
  limit) and one dataset per weight at ``/<layer>/<weight name>:0``. Keras loads an ``.h5`` by
  *position*, so the order of ``weight_names`` is the official ``model.weights`` order
  (:func:`keras_weight_order`), checked against the recorded manifests of all 15 variants.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from effdet_torch.checkpoint import CheckpointError, num_classes_of
from effdet_torch.config import VARIANTS, AnchorConfig, get_config, resolve_variant_name
from effdet_torch.files import atomic_write
from effdet_torch.model import EfficientDet, state_dict_mismatch

from . import EMA_SUFFIX
from .name_map import Layout, MapEntry, name_map_for
from .tensorbundle import write_bundle

__all__ = [
    "ExportError",
    "H5_ROOT_ATTRS",
    "keras_layer_names",
    "keras_weight_order",
    "official_arrays",
    "tf1_keys",
    "weight_names_chunks",
    "write_keras_h5",
    "write_tf1_checkpoint",
]

#: Root attributes the official model's ``save_weights`` writes (tf_keras 2.21, see the manifests).
H5_ROOT_ATTRS = {"backend": "tensorflow", "keras_version": "2.21.0"}
#: tf_keras ``HDF5_OBJECT_HEADER_LIMIT``: a longer ``weight_names`` attribute is split into chunks.
H5_ATTR_LIMIT = 64512
#: tf_keras writes the model's own (here: none) weights to this group, not listed in ``layer_names``.
H5_TOP_LEVEL_GROUP = "top_level_model_weights"
BN_STATS = ("moving_mean", "moving_variance")


class ExportError(CheckpointError):
    """The state dict does not fit the variant, or holds values the official format cannot take."""


def official_arrays(state: Mapping[str, torch.Tensor], variant: str, source: str = "state dict",
                    anchors: AnchorConfig | None = None) -> tuple[list[MapEntry], dict[str, np.ndarray]]:
    """The map of ``variant`` (with the state's class count and ``anchors``, default the official
    ones) and every official variable as a float32 TF-layout array (``HWIO`` kernels, ``HWC1``
    depthwise kernels, vectors, scalars).

    Raises :class:`ExportError` naming ``source`` and the first missing / unexpected / misshapen /
    non-finite key.
    """
    variant = resolve_variant_name(variant)
    anchors = anchors or VARIANTS[variant].anchors
    try:
        classes = num_classes_of(state, anchors.num_anchors)
    except CheckpointError as e:
        raise ExportError(f"{source}: {e}") from None
    entries = name_map_for(variant, num_classes=classes, anchors=anchors)
    parts = state_dict_mismatch(state, {e.torch_key: _torch_shape(e) for e in entries})
    if parts:
        raise ExportError(f"{source}: does not fit {variant} ({classes} classes); " + "; ".join(parts))
    arrays: dict[str, np.ndarray] = {}
    for e in entries:
        t = state[e.torch_key].detach()
        if not t.is_floating_point():
            raise ExportError(f"{source}: {e.torch_key} has dtype {t.dtype}, expected a float")
        a = t.to(device="cpu", dtype=torch.float32).numpy()
        if not np.isfinite(a).all():
            raise ExportError(f"{source}: {e.torch_key} holds {int((~np.isfinite(a)).sum())} NaN/Inf value(s); "
                              "refusing to export")
        arrays[e.tf_name] = e.layout.to_tf(a)
    return entries, arrays


def _torch_shape(e: MapEntry) -> tuple[int, ...]:
    s = e.tf_shape
    if e.layout is Layout.CONV:  # HWIO -> OIHW
        return (s[3], s[2], s[0], s[1])
    if e.layout is Layout.DEPTHWISE:  # HWC1 -> C1HW
        return (s[2], s[3], s[0], s[1])
    return tuple(s)


# ---------------------------------------------------------------------------------------------
# TF1 checkpoint
# ---------------------------------------------------------------------------------------------

def tf1_keys(entries: list[MapEntry]) -> list[str]:
    """Every key of the written checkpoint: raw, ``/ExponentialMovingAverage``, ``global_step``."""
    return [k for e in entries for k in (e.tf_name, e.tf_name + EMA_SUFFIX)] + ["global_step"]


def write_tf1_checkpoint(state: Mapping[str, torch.Tensor], variant: str, out_dir: str | os.PathLike,
                         global_step: int = 0, force: bool = False, source: str = "state dict",
                         anchors: AnchorConfig | None = None) -> Path:
    """Write the official TF1 release layout of ``state`` into ``out_dir`` (prefix ``model``).

    EMA shadows equal the weights (a torch state dict has one value per variable; the official loader
    restores the shadow). A new or empty ``out_dir`` is written as a temporary sibling folder and
    renamed into place; a non-empty one needs ``force`` and gets its three files replaced, each atomically.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: directory is not empty; pass --force (force=True) to replace the checkpoint")
    entries, arrays = official_arrays(state, variant, source, anchors)
    tensors: dict[str, np.ndarray] = {}
    for e in entries:
        tensors[e.tf_name] = arrays[e.tf_name]
        tensors[e.tf_name + EMA_SUFFIX] = arrays[e.tf_name]
    tensors["global_step"] = np.asarray(int(global_step), dtype=np.int64)

    def write_into(d: Path) -> None:
        write_bundle(d / "model", tensors)
        atomic_write(d / "checkpoint", lambda tmp: Path(tmp).write_text(
            'model_checkpoint_path: "model"\nall_model_checkpoint_paths: "model"\n'))

    if out.is_dir() and any(out.iterdir()):
        write_into(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        write_into(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Keras .h5
# ---------------------------------------------------------------------------------------------

def _scopes(m: nn.Module, prefix: str = "") -> Iterator[str]:
    """The official scope of every named child, descending through unnamed (``""``) scopes."""
    for child_path, scope in m.tf_names().items():
        child = m.get_submodule(child_path)
        if scope == "" and hasattr(child, "tf_names"):
            yield from _scopes(child, prefix)
        elif scope:
            yield f"{prefix}/{scope}" if prefix else scope


def keras_layer_names(variant: str) -> list[str]:
    """Top-level Keras layers of the official ``EfficientDetNet`` in model order, weightless ones
    (``resample_p7``) included: backbone, ``resample_p6..p{max}``, ``fpn_cells``, ``class_net``, ``box_net``."""
    with torch.device("meta"):
        model = EfficientDet(get_config(variant))
    names: list[str] = []
    for scope in _scopes(model):
        top = scope.split("/")[0]
        if top not in names:
            names.append(top)
    return names


def _tree_order(entries: list[MapEntry], late: tuple[str, ...] = ("stem",)) -> list[MapEntry]:
    """Keras creation order within one layer: at every scope the scope's own variables first (an
    ``FNode``'s ``WSM*`` before its sub-layers), then its sub-scopes in map order, except that the
    official EfficientNet builds its ``stem`` after its ``blocks_*``."""
    tree: dict = {}
    for e in entries:
        node = tree
        *parents, _ = e.tf_name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[e.tf_name] = e

    def emit(node: dict) -> list[MapEntry]:
        out = [v for v in node.values() if isinstance(v, MapEntry)]
        subs = [(k, v) for k, v in node.items() if isinstance(v, dict)]
        subs = [s for s in subs if s[0] not in late] + [s for s in subs if s[0] in late]
        for _, v in subs:
            out += emit(v)
        return out

    return emit(tree)


def keras_weight_order(entries: list[MapEntry]) -> dict[str, list[MapEntry]]:
    """Per top-level layer, its weights in the official ``layer.weights`` order: trainable weights
    then non-trainable ones (the BN moving statistics), each in Keras creation order."""
    groups: dict[str, list[MapEntry]] = {}
    for e in entries:
        groups.setdefault(e.tf_name.split("/")[0], []).append(e)
    out = {}
    for layer, es in groups.items():
        stats = [e for e in es if e.tf_name.rsplit("/", 1)[-1] in BN_STATS]
        train = [e for e in es if e.tf_name.rsplit("/", 1)[-1] not in BN_STATS]
        out[layer] = _tree_order(train) + _tree_order(stats)
    return out


def _h5_strings(values: list[str]) -> np.ndarray:
    import h5py

    return np.array([v.encode("ascii") for v in values], dtype=h5py.string_dtype("ascii"))


def weight_names_chunks(names: list[str]) -> int:
    """How many attributes tf_keras splits a layer's ``weight_names`` into: the fewest equal
    ``np.array_split`` parts whose fixed-width byte arrays each fit ``H5_ATTR_LIMIT``."""
    fixed = np.asarray([n.encode("ascii") for n in names]) if names else np.zeros((0,), "S1")
    chunks = 1
    while any(c.nbytes > H5_ATTR_LIMIT for c in np.array_split(fixed, chunks)):
        chunks += 1
    return chunks


def _set_weight_names(group, names: list[str]) -> None:
    """tf_keras ``save_attributes_to_hdf5_group``: one attribute, or ``weight_names0..N`` chunks."""
    if not names:
        group.attrs["weight_names"] = np.zeros((0,), np.float64)  # what tf_keras writes for no weights
        return
    chunks = weight_names_chunks(names)
    if chunks == 1:
        group.attrs["weight_names"] = _h5_strings(names)
        return
    for i, part in enumerate(np.array_split(np.asarray(names, dtype=object), chunks)):
        group.attrs[f"weight_names{i}"] = _h5_strings(list(part))


def write_keras_h5(state: Mapping[str, torch.Tensor], variant: str, path: str | os.PathLike,
                   force: bool = False, source: str = "state dict", anchors: AnchorConfig | None = None) -> Path:
    """Write ``state`` (a model with ``anchors``, default the official ones) as the official Keras
    ``model.save_weights('x.h5')`` file, atomically."""
    import h5py

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; pass --force (force=True) to overwrite")
    entries, arrays = official_arrays(state, variant, source, anchors)
    layers = keras_layer_names(variant)
    order = keras_weight_order(entries)
    unknown = [k for k in order if k not in layers]
    if unknown:  # pragma: no cover - the map and the layer walk come from the same modules
        raise RuntimeError(f"internal error: weights of {unknown} outside the top-level layers {layers}")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            for k, v in H5_ROOT_ATTRS.items():
                f.attrs.create(k, v.encode("ascii"), dtype=h5py.string_dtype("ascii"))
            f.attrs["layer_names"] = _h5_strings(layers)
            for layer in layers:
                g = f.create_group(layer)
                es = order.get(layer, [])
                _set_weight_names(g, [e.tf_name + ":0" for e in es])
                for e in es:
                    g.create_dataset(e.tf_name + ":0", data=arrays[e.tf_name])
            _set_weight_names(f.create_group(H5_TOP_LEVEL_GROUP), [])

    atomic_write(path, write)
    return path
