"""Run Google's official EfficientDet (TF2 Keras) from a user's google/automl checkout and write its
taps to an ``.npz`` — the reference side of ``effdet-parity compare`` / ``record``.

Run as a subprocess (``python -m parity.official_worker SPEC.json``): tf_keras uniquifies the variable
names of a second model built in one process, so the official loader would no longer find its keys;
one model per process avoids that, and TensorFlow stays out of the parent (which runs PyTorch).

Nothing of the official code is copied here: ``<automl-dir>/efficientdet`` is put on ``sys.path`` and
its modules are imported at run time. Intermediate tensors are captured by wrapping the ``call``
methods of the imported official Keras layer classes (``Stem``, ``MBConvBlock``,
``ResampleFeatureMap``, ``FNode``, ``FPNCell``, ``FPNCells``, ``ClassNet``/``BoxNet`` and their
``_conv_bn_act``); a wrapper records only layers registered by identity after the model is built and
only while a case runs, so the official computation itself is untouched.

SPEC (JSON): ``automl_dir``, ``variant`` (full name), ``ckpt`` (TF1 dir/prefix or Keras ``.h5``),
``image_size`` (int, ``'WxH'`` or null = the variant's), ``num_classes`` (or null), ``anchors`` (the
official ``num_scales``/``anchor_scale``/``aspect_ratios``, or null), ``cases``
(``{"name", "kind": "random", "input_npz"}`` — the network input, NHWC, under ``input/random`` — or
``{"name", "kind": "image", "path"}``), ``eval_detections`` (bool), ``out`` (npz path),
``out_meta`` (json path). Output keys follow ``shared/golden/README.md`` (NHWC, ``<case>/...``,
``detections/<case>/...``, ``eval_detections/<case>/...``, ``anchors``) plus the detailed taps
(``<case>/backbone/stem``, ``<case>/backbone/block{i}``, ``<case>/fpn/cell{i}/fnode{j}``,
``<case>/{class,box}_net/repeat{r}/level{l}``). Progress goes to stdout as ``@@progress {json}`` lines.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from converters import EMA_SUFFIX

PROGRESS_PREFIX = "@@progress "
OFFICIAL_FILES = ("tf2/efficientdet_keras.py", "tf2/postprocess.py", "tf2/anchors.py", "tf2/util_keras.py",
                  "backbone/efficientnet_model.py", "hparams_config.py", "dataloader.py", "utils.py")


def progress(step: str, **kw) -> None:
    print(PROGRESS_PREFIX + json.dumps({"step": step, **kw}), flush=True)


class _Capture:
    """Registry of official layers (by identity) → tap names, and the taps of the running case."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # id(layer) → tap name or prefix
        self.layer_paths: dict[str, str] = {}  # tap name → official layer path
        self.active = False
        self.taps: dict[str, np.ndarray] = {}

    def put(self, name: str, tensor) -> None:
        if self.active:
            self.taps[name] = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)


CAP = _Capture()


def _wrap(cls, method: str, on_output=None, on_input=None) -> None:
    """Wrap ``cls.method``: ``on_input(self, args, kwargs)`` sees every registered layer's call
    arguments, ``on_output(self, args, kwargs, result)`` its result."""
    orig = getattr(cls, method)
    if getattr(orig, "_effdet_parity_wrapped", False):
        return

    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        watched = CAP.active and id(self) in CAP.names
        if watched and on_input is not None:
            on_input(self, args, kwargs)
        out = orig(self, *args, **kwargs)
        if watched and on_output is not None:
            on_output(self, args, kwargs, out)
        return out

    wrapper._effdet_parity_wrapped = True
    setattr(cls, method, wrapper)


def _install_wrappers(effnet_model, keras_mod) -> None:
    def single(self, args, kwargs, out):
        CAP.put(CAP.names[id(self)], out)

    for cls_name in ("Stem", "MBConvBlock", "MBConvBlockWithoutDepthwise"):
        if hasattr(effnet_model, cls_name):
            _wrap(getattr(effnet_model, cls_name), "call", single)
    _wrap(keras_mod.ResampleFeatureMap, "call", single)

    def fnode(self, args, kwargs, out):  # FNode.call returns feats + [new_node]
        CAP.put(CAP.names[id(self)], out[-1])

    _wrap(keras_mod.FNode, "call", fnode)

    def cell_inputs(self, args, kwargs):
        # The input of cell i > 0 is the per-level output of cell i - 1 as FPNCells.call selected it;
        # the input of cell 0 holds the backbone levels EfficientDetNet.call passes on.
        prefix, lv = CAP.names[id(self)]
        feats = args[0] if args else kwargs["feats"]
        for lvl, t in zip(lv, feats):
            CAP.put(f"{prefix}/level{lvl}", t)

    _wrap(keras_mod.FPNCell, "call", on_input=cell_inputs)

    def cells_out(self, args, kwargs, out):
        prefix, lv = CAP.names[id(self)]
        for lvl, t in zip(lv, out):
            CAP.put(f"{prefix}/level{lvl}", t)

    _wrap(keras_mod.FPNCells, "call", cells_out)

    def head_out(self, args, kwargs, out):
        prefix, lv = CAP.names[id(self)]
        for lvl, t in zip(lv, out):
            CAP.put(f"{prefix}/level{lvl}", t)

    def head_repeat(self, args, kwargs, out):  # _conv_bn_act(self, image, i, level_id, training)
        prefix, lv = CAP.names[id(self)]
        i, level_id = args[1], args[2]
        CAP.put(f"{prefix}/repeat{i}/level{lv[level_id]}", out)

    for cls in (keras_mod.ClassNet, keras_mod.BoxNet):
        _wrap(cls, "call", head_out)
        _wrap(cls, "_conv_bn_act", head_repeat)


def _register(model, config) -> None:
    """Name the official layers of ``model`` by the tap names of ``effdet_torch.taps``."""
    levels = list(range(config.min_level, config.max_level + 1))
    bb = model.backbone
    root = bb.name

    def reg(layer, name, path):
        CAP.names[id(layer)] = name
        CAP.layer_paths[name] = path

    reg(bb._stem, "backbone/stem", f"{root}/{bb._stem.name}")
    for i, block in enumerate(bb._blocks):
        reg(block, f"backbone/block{i}", f"{root}/{block.name}")
    for j, layer in enumerate(model.resample_layers):
        reg(layer, f"resample/level{6 + j}", layer.name)
    cells = model.fpn_cells.cells
    n_bb = 5 - config.min_level + 1  # backbone levels min_level..5
    for i, cell in enumerate(cells):
        prefix = "backbone" if i == 0 else f"fpn/cell{i - 1}"
        CAP.names[id(cell)] = (prefix, levels[:n_bb] if i == 0 else levels)
        for lvl in (levels[:n_bb] if i == 0 else levels):
            CAP.layer_paths[f"{prefix}/level{lvl}"] = (f"{root} reduction_{lvl} (input of fpn_cells/{cell.name})"
                                                       if i == 0 else f"fpn_cells/{cells[i - 1].name} → level {lvl}")
        for j, node in enumerate(cell.fnodes):
            reg(node, f"fpn/cell{i}/fnode{j}", f"fpn_cells/{cell.name}/{node.name}")
    CAP.names[id(model.fpn_cells)] = (f"fpn/cell{len(cells) - 1}", levels)
    for lvl in levels:
        CAP.layer_paths[f"fpn/cell{len(cells) - 1}/level{lvl}"] = f"fpn_cells/{cells[-1].name} → level {lvl}"
    for head, short, pred in ((model.class_net, "class_net", "class"), (model.box_net, "box_net", "box")):
        CAP.names[id(head)] = (short, levels)
        for lvl in levels:
            CAP.layer_paths[f"{short}/level{lvl}"] = f"{head.name}/{pred}-predict"
        for r in range(head.repeats):
            for lvl in levels:
                CAP.layer_paths[f"{short}/repeat{r}/level{lvl}"] = f"{head.name}/{pred}-{r} + {pred}-{r}-bn-{lvl}"


def _git_commit(d: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _load_report(tf, model, ckpt: str) -> dict:
    """Which checkpoint key each Keras weight equals (the EMA shadow, as the official loader assigns)."""
    if ckpt.endswith((".h5", ".hdf5")):
        return {"loader": "model.load_weights(h5)", "n_keras_weights": len(model.weights)}
    prefix = tf.train.latest_checkpoint(ckpt) if os.path.isdir(ckpt) else ckpt
    reader = tf.train.load_checkpoint(prefix)
    keys = set(reader.get_variable_to_shape_map())
    n_ema, not_ema, used = 0, [], set()
    for w in model.weights:
        name = w.name[:-2] if w.name.endswith(":0") else w.name
        ema = name + EMA_SUFFIX
        src = ema if ema in keys else name
        if src in keys:
            used.update({name, ema} & keys)
            if np.array_equal(reader.get_tensor(src), w.numpy()):
                n_ema += src == ema
                if src != ema:
                    not_ema.append(name)
                continue
        not_ema.append(name)
    return {
        "loader": "util_keras.restore_ckpt(model, ckpt, ema_decay=0.9998, skip_mismatch=False)",
        "checkpoint": prefix,
        "n_keras_weights": len(model.weights),
        "n_ckpt_vars": len(keys),
        "n_weights_equal_to_their_EMA_key": n_ema,
        "weights_not_from_ema": not_ema[:20],
        "ckpt_vars_not_used_by_loader": sorted(k for k in keys - used if not k.endswith("/Momentum"))[:20],
    }


def run(spec: dict) -> dict:
    t0 = time.time()
    automl = Path(spec["automl_dir"]).resolve()
    edet = automl / "efficientdet"
    if not (edet / "tf2" / "efficientdet_keras.py").is_file():
        raise SystemExit(f"official_worker: {edet} has no tf2/efficientdet_keras.py (not a google/automl checkout)")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(edet))
    progress("import", msg="importing TensorFlow and the official code")
    try:
        import hparams_config  # noqa: F401  (official, from the user's checkout)
        import tensorflow as tf
        import utils as official_utils
        from backbone import efficientnet_model
        from tf2 import anchors as official_anchors
        from tf2 import efficientdet_keras, postprocess, util_keras
    except ImportError as e:
        raise SystemExit(f"official_worker: cannot import the official code from {edet}: {e} "
                         "(it needs tensorflow, tf-keras, pyyaml, absl-py, six)") from None
    variant = spec["variant"]
    overrides = {"is_training_bn": False}
    if spec.get("image_size") is not None:
        overrides["image_size"] = spec["image_size"]
    if spec.get("num_classes") is not None:
        overrides["num_classes"] = int(spec["num_classes"])
    overrides.update(spec.get("anchors") or {})  # num_scales, anchor_scale, aspect_ratios (pairs as lists)
    config = hparams_config.get_efficientdet_config(variant)
    config.override(overrides)
    hw = official_utils.parse_image_size(config.image_size)

    progress("build", msg=f"building the official {variant} (Keras)")
    model = efficientdet_keras.EfficientDetModel(config=config)
    model.build((1, hw[0], hw[1], 3))
    progress("restore", msg="official loader")
    ckpt = spec["ckpt"]
    if ckpt.endswith((".h5", ".hdf5")):
        model.load_weights(ckpt)
    else:
        util_keras.restore_ckpt(model, ckpt, ema_decay=0.9998, skip_mismatch=False)
    load_report = _load_report(tf, model, ckpt)
    # Wrapped only now: build() traces call() in a graph (autograph would convert the wrappers);
    # the cases below run eagerly, where Keras calls each layer's call() as is.
    _install_wrappers(efficientnet_model, efficientdet_keras)
    _register(model, config)

    params = config.as_dict()
    eval_config = hparams_config.get_efficientdet_config(variant)
    eval_config.override(overrides)
    eval_config.nms_configs.max_nms_inputs = official_anchors.MAX_DETECTION_POINTS
    eval_config.image_size = official_utils.parse_image_size(eval_config.image_size)
    eval_params = eval_config.as_dict()

    out: dict[str, np.ndarray] = {}
    order: list[str] = []
    a = official_anchors.Anchors(config.min_level, config.max_level, config.num_scales, config.aspect_ratios,
                                 config.anchor_scale, config.image_size)
    out["anchors"] = np.asarray(a.boxes.numpy() if hasattr(a.boxes, "numpy") else a.boxes, np.float32)
    order.append("anchors")
    case_meta = {}
    for ci, case in enumerate(spec["cases"]):
        name = case["name"]
        progress("case", msg=f"official forward pass: {name}", i=ci, n=len(spec["cases"]))
        tc = time.time()
        CAP.taps = {}
        if case["kind"] == "random":
            x = np.load(case["input_npz"])["input/random"]
            out["input/random"] = x
            CAP.active = True
            try:
                boxes, scores, classes, valid = model(tf.constant(x), training=False, pre_mode=None, post_mode="global")
            finally:
                CAP.active = False
            scales = None
            eval_scales = tf.constant([1.0], tf.float32)
        else:
            raw = tf.io.decode_image(tf.io.read_file(case["path"]), channels=3, expand_animations=False)
            raw_np = raw.numpy()
            out[f"input/{name}_raw_uint8"] = raw_np
            pre, scales = model._preprocessing(raw[None], config.image_size, config.mean_rgb, config.stddev_rgb, "infer")
            out[f"input/{name}_preprocessed"] = pre.numpy()
            out[f"{name}/image_scale"] = np.asarray(scales.numpy(), np.float32).reshape(1)
            CAP.active = True
            try:
                boxes, scores, classes, valid = model(raw[None], training=False, pre_mode="infer", post_mode="global")
            finally:
                CAP.active = False
            eval_scales = tf.constant(out[f"{name}/image_scale"], tf.float32)
        taps = dict(CAP.taps)
        for k, v in taps.items():
            out[f"{name}/{k}"] = v
            order.append(f"{name}/{k}")
        levels = list(range(config.min_level, config.max_level + 1))
        cls = [tf.constant(taps[f"class_net/level{l}"]) for l in levels]
        box = [tf.constant(taps[f"box_net/level{l}"]) for l in levels]
        pb, ps, pc = postprocess.pre_nms(params, cls, box)
        for k, v in (("boxes", pb), ("scores", ps), ("classes0", pc)):
            out[f"{name}/pre_nms/{k}"] = np.asarray(v.numpy()[0], np.float32)
            order.append(f"{name}/pre_nms/{k}")
        n = int(valid.numpy()[0])
        for k, v in (("boxes", boxes), ("scores", scores), ("classes", classes)):
            out[f"detections/{name}/{k}"] = np.asarray(v.numpy()[0], np.float32)
            order.append(f"detections/{name}/{k}")
        out[f"detections/{name}/valid_len"] = np.asarray(n, np.float32)
        order.append(f"detections/{name}/valid_len")
        if spec.get("eval_detections", True):
            progress("eval", msg=f"official COCO-eval post-processing: {name}")
            eb, es, ec, ev = postprocess.postprocess_per_class(eval_params, cls, box, eval_scales)
            gd = postprocess.generate_detections(eval_params, cls, box, eval_scales, tf.constant([1.0], tf.float32))
            for k, v in (("boxes", eb), ("scores", es), ("classes", ec)):
                out[f"eval_detections/{name}/{k}"] = np.asarray(v.numpy()[0], np.float32)
                order.append(f"eval_detections/{name}/{k}")
            out[f"eval_detections/{name}/valid_len"] = np.asarray(int(ev.numpy()[0]), np.float32)
            out[f"eval_detections/{name}/generate_detections"] = np.asarray(gd.numpy()[0], np.float32)
            order += [f"eval_detections/{name}/valid_len", f"eval_detections/{name}/generate_detections"]
        case_meta[name] = {"kind": case["kind"], "secs": time.time() - tc, "valid_len": n,
                           "top5_scores": out[f"detections/{name}/scores"][:5].tolist(),
                           "top5_classes": out[f"detections/{name}/classes"][:5].tolist()}
        if case["kind"] == "image":
            case_meta[name]["path"] = str(case["path"])
            case_meta[name]["decoder"] = "tf.io.decode_image(channels=3) (official tf2/inspector.py infer path)"
    progress("write", msg="writing the official taps")
    np.savez(spec["out"], **out)
    import tf_keras

    meta = {
        "variant": variant,
        "official_repo": "google/automl",
        "official_dir": str(edet),
        "official_commit": _git_commit(automl) or _git_commit(edet) or "unknown (not a git checkout)",
        "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__, "numpy": np.__version__,
                     "python": platform.python_version(),
                     "TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS")},
        "patches": ["none (layer calls wrapped to read their outputs; computation unchanged)"],
        "config_overrides": overrides,
        "image_size": list(hw),
        "batch": 1,
        "num_classes": int(config.num_classes),
        "ckpt": ckpt,
        "load_report": load_report,
        "mean_rgb": np.broadcast_to(np.asarray(config.mean_rgb, np.float64), (3,)).tolist(),
        "stddev_rgb": np.broadcast_to(np.asarray(config.stddev_rgb, np.float64), (3,)).tolist(),
        "nms_configs": dict(config.nms_configs),
        "cases": case_meta,
        "order": order,
        "layer_paths": CAP.layer_paths,
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in out.items()},
        "secs": time.time() - t0,
    }
    Path(spec["out_meta"]).write_text(json.dumps(meta, indent=1, default=str))
    progress("done", secs=meta["secs"])
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parity.official_worker SPEC.json", file=sys.stderr)
        return 2
    run(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
