"""ONNX export: the network (``torch.onnx.export`` on a ``torch.export`` program), optionally the
official pre-NMS tensors and hard NMS as the ONNX ``NonMaxSuppression`` operator.

Opset 20: the native opset of the ``torch.onnx`` (dynamo) exporter of torch 2.14, so no version
conversion step runs; everything the graph needs (``Resize`` with ``asymmetric``/``floor`` nearest
for the TF1 upsample, ``Pad`` with ``-inf`` before ``MaxPool``, ``NonMaxSuppression``) is unchanged
since opset 11–19, and onnxruntime ≥ 1.17 runs it.

The official inference post-processing is a Gaussian soft-NMS (``NonMaxSuppressionV5`` with
``soft_nms_sigma``); ONNX has no soft-NMS operator. The ``nms`` outputs are the official
*hard* NMS (``nms_configs.method='hard'``: IoU > 0.5 suppresses, no score threshold, 100 per image,
class-agnostic, boxes clipped to the input); for the official soft-NMS run
:func:`effdet_torch.postprocess.postprocess_global` on the ONNX heads (see :func:`postprocess_onnx`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from effdet_torch.anchors import generate_anchors
from effdet_torch.checkpoint import RECORD_KEY, model_record
from effdet_torch.files import atomic_write
from effdet_torch.model import EfficientDet
from effdet_torch.postprocess import flatten_outputs, postprocess_global

from .network import export_program, output_names

__all__ = ["NMS_OUTPUTS", "OPSET", "add_hard_nms", "export_onnx", "onnx_to_torch_outputs", "postprocess_onnx"]

OPSET = 20
NMS_OUTPUTS = ("nms_batch", "nms_boxes", "nms_scores", "nms_classes")


def add_hard_nms(proto, image_size: tuple[int, int], max_detections: int = 100, iou_threshold: float = 0.5):
    """Append class-agnostic hard NMS to a graph with ``boxes [B, N, 4]``, ``scores [B, N]``,
    ``classes [B, N]`` outputs. New outputs, ``K`` rows over the whole batch, best first per image:
    ``nms_batch [K]`` (int64 image index), ``nms_boxes [K, 4]`` (ymin, xmin, ymax, xmax clipped to
    the input size), ``nms_scores [K]``, ``nms_classes [K]`` (int64, 1-based as the official output).
    """
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph

    def const(name: str, value) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    h, w = image_size
    nodes = [
        helper.make_node("Unsqueeze", ["scores", const("nms/axis1", np.array([1], np.int64))], ["nms/scores_b1n"]),
        helper.make_node("NonMaxSuppression",
                         ["boxes", "nms/scores_b1n", const("nms/max_out", np.array([max_detections], np.int64)),
                          const("nms/iou", np.array([iou_threshold], np.float32))],
                         ["nms/selected"], center_point_box=0),
        helper.make_node("Gather", ["nms/selected", const("nms/col0", np.array(0, np.int64))], ["nms_batch"], axis=1),
        helper.make_node("Gather", ["nms/selected", const("nms/col2", np.array(2, np.int64))], ["nms/box_index"], axis=1),
        helper.make_node("Unsqueeze", ["nms_batch", "nms/axis1"], ["nms/b1"]),
        helper.make_node("Unsqueeze", ["nms/box_index", "nms/axis1"], ["nms/n1"]),
        helper.make_node("Concat", ["nms/b1", "nms/n1"], ["nms/bn"], axis=1),
        helper.make_node("GatherND", ["boxes", "nms/bn"], ["nms/boxes_raw"]),
        helper.make_node("Max", ["nms/boxes_raw", const("nms/zero", np.zeros(4, np.float32))], ["nms/boxes_lo"]),
        helper.make_node("Min", ["nms/boxes_lo", const("nms/limit", np.array([h, w, h, w], np.float32))], ["nms_boxes"]),
        helper.make_node("GatherND", ["scores", "nms/bn"], ["nms_scores"]),
        helper.make_node("GatherND", ["classes", "nms/bn"], ["nms/classes0"]),
        helper.make_node("Add", ["nms/classes0", const("nms/one", np.array(1, np.int64))], ["nms_classes"]),
    ]
    g.node.extend(nodes)
    g.output.extend([
        helper.make_tensor_value_info("nms_batch", TensorProto.INT64, ["detections"]),
        helper.make_tensor_value_info("nms_boxes", TensorProto.FLOAT, ["detections", 4]),
        helper.make_tensor_value_info("nms_scores", TensorProto.FLOAT, ["detections"]),
        helper.make_tensor_value_info("nms_classes", TensorProto.INT64, ["detections"]),
    ])
    return proto


def _name_batch_dim(proto, name: str = "batch") -> None:
    """Rename the exporter's batch symbol (``s77``, …) to ``batch`` in the graph's signature."""
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    symbol = dim0.dim_param
    if not symbol:
        return
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = name


def _optimize(proto):
    """The exporter's graph optimisation (onnxscript), folding constant subgraphs of any size: the
    stride-2 SAME convolutions zero-pad their weights (``Conv2dSame``), and a weight ``Pad`` left in
    the graph (the default fold limit is 8192 input elements, e.g. d0's 672-channel 5×5 depthwise
    kernel) makes onnxruntime's own optimiser reject the model ("Node input 'pad_4' is not a graph
    input, initializer, or output of a previous node"; onnxruntime 1.32)."""
    from onnxscript import optimizer

    return optimizer.optimize(proto, input_size_limit=2**31 - 1, output_size_limit=2**31 - 1)


def export_onnx(model: EfficientDet, image_size: tuple[int, int], path: str | os.PathLike | None = None,
                decode: bool = False, nms: bool = False, program: torch.export.ExportedProgram | None = None):
    """Export ``model`` at ``image_size`` (``nms`` implies ``decode``); check it with
    ``onnx.checker`` (full check, with shape inference) and write it atomically when ``path`` is given.
    ``program``: an already exported :func:`export_program` of the same settings (saves the trace).
    Returns the ``onnx.ModelProto``."""
    import onnx

    decode = decode or nms
    if program is None:
        program = export_program(model, image_size, decode)
    names = output_names(model, decode)
    x = torch.zeros(2, 3, *image_size)
    onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=OPSET, input_names=["image"],
                                     output_names=names, optimize=False, verbose=False)
    proto = _optimize(onnx_program.model_proto)
    _name_batch_dim(proto)
    if nms:
        proto = add_hard_nms(proto, tuple(image_size), model.config.max_detections, model.config.nms_iou_threshold)
    proto.doc_string = (f"{model.config.name} at {image_size[0]}x{image_size[1]} (HxW), {model.config.num_classes} "
                        f"classes; input: normalised RGB NCHW (mean {list(model.config.mean_rgb)}, std "
                        f"{list(model.config.stddev_rgb)}); effdet-parity export")
    # the model's record (effdet_torch.checkpoint.model_record: anchors, classes and their names, image
    # size), as the .pth/.safetensors files carry it; onnx.load(path).metadata_props holds it
    entry = proto.metadata_props.add()
    entry.key, entry.value = RECORD_KEY, json.dumps(model_record(model.config))
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:

        atomic_write(Path(path), lambda tmp: onnx.save(proto, tmp))
    return proto


def onnx_to_torch_outputs(outputs: Sequence[np.ndarray], num_levels: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``2 · num_levels`` ONNX outputs as the model's ``(class_outputs, box_outputs)``."""
    t = [torch.from_numpy(np.asarray(o)) for o in outputs[: 2 * num_levels]]
    return t[:num_levels], t[num_levels:]


def postprocess_onnx(model_config, outputs: Sequence[np.ndarray], image_size: tuple[int, int],
                     image_scale=None):
    """The official inference post-processing (global Gaussian soft-NMS, NMSV5 semantics) on the
    raw heads of an ONNX run: the same :class:`~effdet_torch.postprocess.Detections` as
    :class:`~effdet_torch.Detector`."""
    cls, box = onnx_to_torch_outputs(outputs, len(model_config.levels))
    c, b = flatten_outputs(cls, box, model_config.num_classes)
    anchors = torch.from_numpy(generate_anchors(model_config, tuple(image_size)))
    return postprocess_global(model_config, c.float(), b.float(), anchors, tuple(image_size), image_scale)
