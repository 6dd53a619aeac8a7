"""Official checkpoint → torch state dict, checked variable by variable.

The official loader (``util_keras.restore_ckpt``) assigns the raw key then
``<name>/ExponentialMovingAverage``, so the EMA shadow wins; ``/Momentum`` slots and ``global_step``
are unused. Conversion does the same by default (``ema=False`` takes the raw values) and refuses
anything missing, unexpected, of the wrong shape, or not finite — naming the variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effdet_torch.checkpoint import load_state_dict_file, register_checkpoint_loader, weights_writer
from effdet_torch.config import VARIANTS, AnchorConfig, EfficientDetConfig, resolve_variant_name
from effdet_torch.files import atomic_write, sha256_file

from . import EMA_SUFFIX, OFFICIAL_CLASS_BIAS
from .name_map import MapEntry, name_map_for
from .sources import CheckpointError, CheckpointSource, open_checkpoint

__all__ = [
    "ConversionError",
    "ConversionResult",
    "convert_checkpoint",
    "load_official",
    "load_state_dict_file",
    "official_num_classes",
    "save_state_dict",
]

IGNORED_SUFFIXES = ("/Momentum",)
IGNORED_KEYS = ("global_step",)


class ConversionError(CheckpointError):
    """The checkpoint does not fit the requested variant, or holds bad values."""


@dataclass
class ConversionResult:
    state_dict: dict[str, torch.Tensor]
    variant: str
    source: str
    source_kind: str  # 'tf1' or 'h5'
    ema: bool | None  # None for .h5 (weights as the Keras model held them)
    n_mapped: int
    ignored: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(v.numel() for k, v in self.state_dict.items() if "running_" not in k)


def _fmt(names: list[str], n: int = 5) -> str:
    more = f" … and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _guess_variant(source: CheckpointSource, ema_suffix: str) -> str | None:
    """The variant whose map fits the checkpoint's names and shapes, if any."""
    keys = source._keyset
    for name in VARIANTS:
        entries = name_map_for(name)
        if all(e.tf_name in keys and tuple(source.shape(e.tf_name)) == e.tf_shape for e in entries):
            return name
    return None


def _check_fit(source: CheckpointSource, entries: list[MapEntry], variant: str, ema: bool) -> list[str]:
    """Raise a ConversionError if the checkpoint does not fit; return the ignored keys."""
    keys = source._keyset
    where = str(source.path)
    wanted = {e.tf_name for e in entries}
    if source.kind == "tf1":
        allowed = wanted | {n + EMA_SUFFIX for n in wanted}
    else:
        allowed = wanted
    ignored = sorted(k for k in keys if k in IGNORED_KEYS or k.endswith(IGNORED_SUFFIXES))
    unexpected = sorted(k for k in keys if k not in allowed and k not in ignored)
    missing = [e.tf_name for e in entries if e.tf_name not in keys]
    bad_shapes = [(e.tf_name, tuple(source.shape(e.tf_name)), e.tf_shape)
                  for e in entries if e.tf_name in keys and tuple(source.shape(e.tf_name)) != e.tf_shape]
    missing_ema: list[str] = []
    if source.kind == "tf1" and ema:
        missing_ema = [e.tf_name + EMA_SUFFIX for e in entries if e.tf_name + EMA_SUFFIX not in keys]
    if not (missing or unexpected or bad_shapes or missing_ema):
        return ignored
    guess = _guess_variant(source, EMA_SUFFIX)
    lines = [f"{where}: does not fit {variant}"]
    if guess and guess != variant:
        lines[0] += f" (it looks like {guess}: try `convert-ckpt {guess.removeprefix('efficientdet-')}`)"
    if bad_shapes:
        n, got, want = bad_shapes[0]
        lines.append(f"first shape mismatch: {n}: checkpoint {list(got)} vs {variant} {list(want)}"
                     f" ({len(bad_shapes)} variables of the wrong shape)")
        box = [(g, w) for name, g, w in bad_shapes if name.endswith("box-predict/bias")]
        if box and box[0][0][-1] % 4 == 0:
            lines.append(f"its box predictor has {box[0][0][-1] // 4} anchors per location, this configuration "
                         f"{box[0][1][-1] // 4}: it was trained with other anchors; give them with --hparams "
                         "(the run's config.yaml, or e.g. 'num_scales=3,aspect_ratios=1.0*2.0*0.5*4.0')")
    if missing:
        lines.append(f"{len(missing)} variables missing: {_fmt(missing)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected variables: {_fmt(unexpected)}")
    if missing_ema and not missing:
        if len(missing_ema) == len(entries):
            lines.append("the checkpoint has no ExponentialMovingAverage shadows; use --no-ema (ema=False) "
                         "to convert its raw values")
        else:
            lines.append(f"{len(missing_ema)} EMA shadows missing: {_fmt(missing_ema)}")
    raise ConversionError("; ".join(lines))  # one line: file, fault, first variable and shapes


def official_num_classes(source: CheckpointSource, variant: str, anchors: AnchorConfig | None = None) -> int | None:
    """Classes of an official checkpoint: its class predictor's bias (raw or EMA) has ``A · classes``
    channels (``A`` of ``anchors``, default the official ones); None when the checkpoint has neither."""
    per = (anchors or VARIANTS[resolve_variant_name(variant)].anchors).num_anchors
    for key in (OFFICIAL_CLASS_BIAS, OFFICIAL_CLASS_BIAS + EMA_SUFFIX):
        if key in source:
            return int(source.shape(key)[0]) // per
    return None


def convert_checkpoint(path: str | os.PathLike, variant: str, ema: bool = True,
                       num_classes: int | None = None, progress: bool = False,
                       anchors: AnchorConfig | None = None) -> ConversionResult:
    """Convert an official checkpoint of ``variant`` (TF1 dir/prefix/tarball or Keras ``.h5``) trained
    with ``anchors`` (default the official ones: they set the box/class predictors' shapes)."""
    variant = resolve_variant_name(variant)
    with open_checkpoint(path) as source:
        classes = num_classes if num_classes is not None else official_num_classes(source, variant, anchors)
        entries = name_map_for(variant, num_classes=classes, anchors=anchors)
        ignored = _check_fit(source, entries, variant, ema)
        take_ema = source.kind == "tf1" and ema
        it = entries
        if progress:
            from tqdm import tqdm

            it = tqdm(entries, desc=f"converting {Path(path).name}", unit="var")
        state: dict[str, torch.Tensor] = {}
        for e in it:
            name = e.tf_name + EMA_SUFFIX if take_ema else e.tf_name
            arr = source.read(name)
            if arr.dtype != np.float32:
                if not np.issubdtype(arr.dtype, np.floating):
                    raise ConversionError(f"{source.path}: {name} has dtype {arr.dtype}, expected a float")
                arr = arr.astype(np.float32)
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise ConversionError(f"{source.path}: {name} holds {bad} NaN/Inf value(s); refusing to convert")
            state[e.torch_key] = torch.from_numpy(e.layout.to_torch(arr))
        return ConversionResult(state, variant, str(path), source.kind, take_ema if source.kind == "tf1" else None,
                                len(entries), ignored)


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, cfg: EfficientDetConfig,
                    force: bool = False) -> str:
    """Write ``.pth`` (torch.save) or ``.safetensors`` atomically with the record of ``cfg`` (the model
    the weights belong to: :func:`effdet_torch.checkpoint.model_record`); return the file's sha256
    (the same weights and record give the same bytes)."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists; pass --force (force=True) to overwrite")
    atomic_write(path, weights_writer(state, cfg, path))
    return sha256_file(path)


@register_checkpoint_loader
def load_official(path: str, variant: str, ema: bool = True, anchors: AnchorConfig | None = None) -> dict[str, torch.Tensor]:
    """The reader ``effdet_torch.create_model``/``load_checkpoint`` use for official checkpoints
    (registered as the ``effdet_torch.checkpoint_loaders`` entry point)."""
    return convert_checkpoint(path, variant, ema=ema, anchors=anchors).state_dict
