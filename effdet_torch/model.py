"""The EfficientDet network and the ``create_model`` factory."""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .backbone import EfficientNetBackbone
from .bifpn import BiFpn
from .checkpoint import CheckpointError, load_checkpoint, num_classes_of
from .config import AnchorConfig, EfficientDetConfig, get_config
from .float_env import flush_denormals
from .head import HeadNet
from .ops import tf_batch_norm
from .postprocess import flatten_outputs

__all__ = ["EfficientDet", "compile_network", "create_model", "iter_network", "load_checkpoint", "load_pretrained",
           "run_network"]


class EfficientDet(nn.Module):
    """EfficientDet network: backbone → BiFPN → class/box heads.

    ``forward([B, 3, H, W] normalised image) → (class_outputs, box_outputs)``, each a list over
    levels ``min_level..max_level`` of ``[B, A·num_classes, H_l, W_l]`` / ``[B, A·4, H_l, W_l]``
    logits / box codes (NCHW; the official NHWC tensors are these permuted).
    Any input size works; level sizes follow the official ``(n - 1) // 2 + 1`` halving.
    """

    def __init__(self, config: EfficientDetConfig) -> None:
        super().__init__()
        self.config = config
        norm = tf_batch_norm(config.bn_eps, config.bn_momentum)  # the BiFPN reads the same two fields
        self.backbone = EfficientNetBackbone(config.backbone, config.act_type, norm=norm)
        self.fpn = BiFpn(config, self.backbone.out_channels)
        levels = config.levels
        self.class_net = HeadNet("class", config.fpn_channels, config.head_repeats, levels,
                                 config.num_anchors, config.num_classes, config.act_type, norm)
        self.box_net = HeadNet("box", config.fpn_channels, config.head_repeats, levels,
                               config.num_anchors, 4, config.act_type, norm)

    @property
    def fused_for_inference(self) -> bool:
        return getattr(self, "_fused", False)

    def fuse_for_inference(self) -> "EfficientDet":
        """Inference only, in place: every BN folded into the conv before it (the heads' per-level BNs
        into per-level copies of their shared pointwise convs), conv → act pairs of the backbone and
        heads single oneDNN calls on the CPU (:class:`~effdet_torch.ops.ConvAct`) and the SE gates
        applied to the project convs' weights (:class:`~effdet_torch.backbone.ExcitedProjection`).
        d0 at 512² on 2 CPU threads: 89 → ~62 ms per image; each step in README "Speed".
        Outputs change by fp32 rounding only: the bundled d0 goldens pass through it
        (``tests/test_golden_parity.py``), and at every tap it is as close to the official float64
        run as the official fp32 run is (``tests/test_fp64_parity.py``). The model can no longer
        train, and its state dict is no longer the official layout: convert and save unfused models."""
        if not self.fused_for_inference:
            self.eval()
            self.backbone.fuse_for_inference()
            self.fpn.fuse_for_inference()
            self.class_net.fuse_for_inference()
            self.box_net.fuse_for_inference()
            self._fused = True
        return self

    def train(self, mode: bool = True) -> "EfficientDet":
        if mode and self.fused_for_inference:
            raise RuntimeError("this model is fused for inference (fuse_for_inference: batch norms folded): it cannot train")
        return super().train(mode)

    def level_sizes(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
        """``[(H_l, W_l)]`` for ``l = min_level..max_level`` of an input of size ``hw``."""
        sizes = self.config.feature_sizes(hw)
        return [sizes[lvl] for lvl in self.config.levels]

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        stem = next(self.backbone.parameters())  # the stem conv's [C, 3, 3, 3] kernel (fused or not)
        if stem.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the layout the weights are in
        sizes = self.level_sizes((int(x.shape[-2]), int(x.shape[-1])))
        feats = self.backbone(x)
        feats = self.fpn(feats, sizes)
        return self.class_net(feats), self.box_net(feats)

    def tf_names(self) -> dict[str, str]:
        return {"backbone": self.backbone.name, "fpn": "", "class_net": "class_net", "box_net": "box_net"}

    def reset_class_head(self, num_classes: int) -> None:
        """Replace the class predictor for ``num_classes`` (fine-tuning on another label set)."""
        old = self.class_net.predict.conv_pw.weight
        new = self.class_net.make_predict(self.config.fpn_channels, num_classes)
        fmt = torch.channels_last if old.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        self.class_net.predict = new.to(device=old.device, dtype=old.dtype, memory_format=fmt)
        self.config = replace(self.config, num_classes=num_classes)


def iter_network(model: nn.Module, x: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Inference forward of a batch ``[B, 3, H, W]`` in chunks: yields ``(first image, cls [b, N, C],
    box [b, N, 4])``, the heads flattened in the official anchor order
    (:func:`~effdet_torch.postprocess.flatten_outputs`).

    On the CPU the chunks are single images, so the caller can finish each image (post-processing,
    candidate reduction) before the next: a layer-by-layer forward of a batch keeps ``B`` images'
    activations in flight, which outgrow the caches, and then every op is slower per element
    (measured, d0 at 512², one thread: 136 ms per image at batch 1, 245 ms at batch 8 — SiLU 33→58,
    BN 23→45, convs 47→75 ms per image), and gathering a batch's heads (``[8, 49104, 90]`` floats,
    141 MB) costs page faults of its own. An image's outputs then do not depend on its batch. GPUs
    (and training) take the batch whole: one chunk. On the CPU the network runs with denormals
    flushed to zero, as TensorFlow's CPU kernels do (:func:`~effdet_torch.float_env.flush_denormals`).
    """
    c = model.config.num_classes

    def heads(x: Tensor) -> tuple[Tensor, Tensor]:
        with flush_denormals(x.device):  # TF's CPU float environment (effdet_torch/float_env.py)
            return flatten_outputs(*model(x), c)

    if x.device.type != "cpu" or x.shape[0] <= 1 or model.training:
        yield (0, *heads(x))
        return
    for i in range(x.shape[0]):
        yield (i, *heads(x[i:i + 1]))


def run_network(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The heads of a whole batch: ``[B, N, C]`` logits and ``[B, N, 4]`` codes (see :func:`iter_network`)."""
    parts = list(iter_network(model, x))
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def compile_network(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model in place (its ``forward``; the module, its ``config`` and state dict
    stay as they are) with static shapes: one graph per input size (on the CPU :func:`iter_network`
    feeds single images, so one per size). Inductor fuses BN and activations into the convolutions,
    which changes only fp32 rounding (``tests/test_compile.py`` holds it to our measured fp32 noise)."""
    model.compile(dynamic=False)
    return model


def create_model(name: str, num_classes: int | None = None, checkpoint: str | os.PathLike | None = None,
                 image_size: int | str | Sequence[int] | None = None, ema: bool = True,
                 anchors: AnchorConfig | None = None) -> EfficientDet:
    """Build an official EfficientDet variant, optionally loading weights.

    Args:
        name: ``'d0'``…``'d7x'``, ``'lite0'``…``'lite4'``, ``'lite3x'`` or the full official name.
        num_classes: classes of the class head; if it differs from the checkpoint's, only the class
            predictor is reset (with a warning) and everything else is loaded.
        checkpoint: a converted ``.pth``/``.safetensors`` or an official checkpoint (TF1 dir, prefix,
            release tarball, Keras ``.h5``). A file written by this project carries the model's
            record (:func:`~effdet_torch.checkpoint.model_record`): its anchors, class names and
            image size are the model's, and a different ``anchors`` or variant is a
            :class:`~effdet_torch.checkpoint.CheckpointError` naming both. Files without a record
            are official-configuration files (their anchors: ``anchors`` or the official ones).
        image_size: int, ``(H, W)`` or the official ``'WxH'`` string; default the size the weights
            were trained at (their record), else the variant's.
        ema: for official checkpoints, take the ExponentialMovingAverage shadows (the official
            loader's choice); ``False`` takes the raw variables.
        anchors: the anchor configuration (default: the record's, else the official one).
    The model is returned in ``eval()`` mode, its weights in ``channels_last`` (NHWC strides: the
    same numbers, 0.66–0.72× the time of NCHW on CPU, measured in ``benchmarks/``);
    ``model.to(memory_format=torch.contiguous_format)`` gives the NCHW layout back.
    """
    if checkpoint is None:
        model = EfficientDet(get_config(name, image_size=image_size, num_classes=num_classes, anchors=anchors))
        return model.eval().to(memory_format=torch.channels_last)
    variant = get_config(name).name
    ckpt = load_checkpoint(checkpoint, variant, ema=ema, anchors=anchors)
    class_names = None
    if ckpt.record is not None:
        rec = ckpt.record
        if rec["variant"] != variant:
            raise CheckpointError(f"{checkpoint}: holds {rec['variant']} weights (its record), not {variant}")
        if anchors is not None and anchors != rec["anchors"]:
            raise CheckpointError(f"{checkpoint}: trained with anchors {rec['anchors'].describe()}; "
                                  f"asked to run them with {anchors.describe()}")
        anchors, class_names = rec["anchors"], rec["class_names"]
        image_size = rec["image_size"] if image_size is None else image_size
    anchors = anchors or get_config(name).anchors
    ckpt_classes = num_classes_of(ckpt.state, anchors.num_anchors, source=str(checkpoint))
    model = EfficientDet(get_config(name, image_size=image_size, num_classes=ckpt_classes, anchors=anchors,
                                    class_names=class_names if class_names and len(class_names) == ckpt_classes
                                    else None))
    _strict_load(model, ckpt.state, str(checkpoint))
    if num_classes is not None and num_classes != ckpt_classes:
        warnings.warn(
            f"{checkpoint}: checkpoint has {ckpt_classes} classes, asked for {num_classes}; "
            f"the class predictor (class_net.predict) is reset, every other weight is loaded",
            stacklevel=2,
        )
        model.reset_class_head(num_classes)
    return model.eval().to(memory_format=torch.channels_last)


PREDICT_LAYERS = ("class_net.predict.", "box_net.predict.")  # the only weights whose shapes anchors/classes set


def load_pretrained(model: EfficientDet, checkpoint: str | os.PathLike, ema: bool = True) -> list[str]:
    """Fine-tuning start: load ``checkpoint`` into ``model`` (a freshly built model of the run's
    configuration), except the class/box predictor whose shape the run's classes or anchors change —
    those keep their initialisation. Returns one message per reset or difference worth a warning
    (another class count or anchor count, other anchors, another image size); every other weight must fit
    (:class:`~effdet_torch.checkpoint.CheckpointError` otherwise).
    """
    cfg = model.config
    ckpt = load_checkpoint(checkpoint, cfg.name, ema=ema)
    rec = ckpt.record
    if rec is not None and rec["variant"] != cfg.name:
        raise CheckpointError(f"{checkpoint}: holds {rec['variant']} weights (its record), not {cfg.name}")
    their_anchors = rec["anchors"] if rec is not None else get_config(cfg.name).anchors
    own = model.state_dict()
    state = dict(ckpt.state)
    notes = []
    for prefix, what in zip(PREDICT_LAYERS, ("class", "box")):
        keys = [k for k in own if k.startswith(prefix)]
        if all(k in state and state[k].shape == own[k].shape for k in keys):
            continue
        for k in keys:
            state.pop(k, None)
        width = int(ckpt.state[prefix + "conv_pw.bias"].shape[0]) if prefix + "conv_pw.bias" in ckpt.state else 0
        per, unit = their_anchors.num_anchors, "classes" if what == "class" else "box codes"
        theirs = f"{per} anchors x {width // per} {unit}" if width % per == 0 else f"{width} outputs"
        mine = f"{cfg.num_anchors} anchors x {cfg.num_classes if what == 'class' else 4} {unit}"
        notes.append(f"{checkpoint}: the {what} predictor ({prefix.rstrip('.')}) is reset (checkpoint {theirs}, this "
                     f"model {mine}); every other weight is loaded")
    if rec is not None and tuple(rec["image_size"]) != tuple(cfg.image_size):
        notes.append(f"{checkpoint}: trained at {rec['image_size'][0]}x{rec['image_size'][1]} (H x W); this run "
                     f"trains at {cfg.image_size[0]}x{cfg.image_size[1]}")
    if their_anchors != cfg.anchors:
        notes.append(f"{checkpoint}: trained with anchors {their_anchors.describe()}; this run uses "
                     f"{cfg.anchors.describe()} (box regressions start from the other anchors' where shapes fit)")
    parts = state_dict_mismatch(state, {k: tuple(v.shape) for k, v in own.items() if k in state or
                                        not k.startswith(PREDICT_LAYERS)})
    if parts:
        raise CheckpointError(f"{checkpoint}: does not fit {cfg.name}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return notes


def state_dict_mismatch(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``state`` from loading into a model whose keys have ``shapes``: one phrase each for
    the first misshapen key (and their count), the missing keys and the unexpected keys; empty when it fits."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [(k, tuple(state[k].shape), tuple(v)) for k, v in shapes.items()
             if k in state and tuple(state[k].shape) != tuple(v)]
    parts = []
    if wrong:
        k, got, want = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es), first {k}: checkpoint {got} vs model {want}")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
    return parts


def _strict_load(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    parts = state_dict_mismatch(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if parts:
        raise CheckpointError(f"{source}: does not fit {model.config.name}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
