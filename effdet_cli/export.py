"""``effdet-export``: an EfficientDet to ONNX or ``torch.export`` (.pt2), or back to the official
TensorFlow formats (TF1 release checkpoint, Keras ``.h5``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from converters.sources import CheckpointError
from converters.hparams import hparams_for
from converters.writers import write_keras_h5, write_tf1_checkpoint
from effdet_torch.checkpoint import num_classes_of
from effdet_torch.config import VARIANTS, get_config, parse_image_size, resolve_variant_name
from effdet_torch.files import atomic_write
from effdet_torch.model import create_model, load_checkpoint
from export.network import export_program, save_program
from export.onnx_export import OPSET, export_onnx

from .common import add_device, add_output, add_variant, add_weights, error, parse_args

PROG = "effdet-export"

EPILOG = """\
examples:
  effdet-export onnx --variant d0 --weights efficientdet-d0.pth --image-size 512 -o d0.onnx
  effdet-export onnx --variant d0 --weights efficientdet-d0.pth --nms -o d0-nms.onnx
  effdet-export torch-export --variant lite0 --weights lite0.pth -o lite0.pt2
  effdet-export tf1 --variant d0 --weights finetuned.pth -o finetuned-d0/
  effdet-export h5 --variant d0 --weights finetuned.pth -o finetuned-d0.h5

onnx / torch-export: a fixed input size (--image-size, default the variant's; TF SAME paddings
become constants), a dynamic batch; input 'image' [B, 3, H, W], normalised RGB (the official
mean/std). Outputs class_p{l} [B, A*C, H_l, W_l] and box_p{l} [B, A*4, H_l, W_l] per level;
--decode adds the official pre-NMS tensors boxes [B, N, 4] (ymin, xmin, ymax, xmax, input pixels),
scores [B, N] and classes [B, N] (0-based); onnx --nms adds hard NMS (ONNX NonMaxSuppression):
nms_batch, nms_boxes, nms_scores, nms_classes (1-based). The official Gaussian soft-NMS has no
ONNX operator: run effdet_torch's post-processing on the heads (README, section Export).

tf1 / h5: no TensorFlow needed. tf1 writes DIR/checkpoint, DIR/model.index and
DIR/model.data-00000-of-00001 with the official variable names, /ExponentialMovingAverage shadows
equal to the weights and global_step; h5 writes the official Keras save_weights layout. A model
with another class count prints the --hparams the official scripts need.

--weights: a converted .pth/.safetensors, or any official checkpoint (converted on the fly).
Outputs are written atomically; an existing output needs --force.
exit status: 0 done, 1 bad input or a failed check, 2 usage error.
"""


def _err(msg: str) -> None:
    error(PROG, msg)


def _common(p: argparse.ArgumentParser, image: bool, device: bool = False) -> None:
    add_variant(p)
    add_weights(p)
    add_output(p, required=True, type=Path, help="output file (onnx, pt2, h5) or folder (tf1)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    if image:
        p.add_argument("--image-size", help="input size: N or the official 'WxH' (default: the variant's)")
        p.add_argument("--decode", action="store_true",
                       help="also output the official pre-NMS boxes, scores (max class) and classes")
    if device:
        add_device(p, help="device the program is exported for: cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="An EfficientDet to ONNX or torch.export (.pt2), or back "
                                "to the official TensorFlow formats (TF1 release checkpoint, Keras .h5).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{onnx,torch-export,tf1,h5}")
    o = sub.add_parser("onnx", help="ONNX (opset 20), checked with onnx.checker and run once with onnxruntime",
                       description="Export the network to ONNX (opset 20) with a fixed input size and a dynamic batch.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(o, image=True)
    o.add_argument("--nms", action="store_true",
                   help="also hard NMS as ONNX NonMaxSuppression (implies --decode; the official soft-NMS has no "
                        "ONNX operator)")
    t = sub.add_parser("torch-export", help="torch.export ExportedProgram (.pt2), checked against eager",
                       description="Save the network as a torch.export program (.pt2): load it with "
                                   "torch.export.load(path).module(); AOTInductor compiles it for C++.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(t, image=True, device=True)
    f = sub.add_parser("tf1", help="official TF1 checkpoint folder (checkpoint, .index, .data)",
                       description="Write an official TF1 release-format checkpoint (no TensorFlow needed).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(f, image=False)
    f.add_argument("--global-step", type=int, default=0, help="value of global_step (default 0)")
    h = sub.add_parser("h5", help="official Keras .h5 (save_weights layout)",
                       description="Write the official Keras model.save_weights .h5 layout (no TensorFlow needed).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(h, image=False)
    return p


def _load_model(args: argparse.Namespace):
    """The model at its export size, or an error string."""
    import torch


    hw = parse_image_size(args.image_size) if args.image_size else None
    model = create_model(args.variant, checkpoint=args.weights, image_size=hw)
    return model.to(torch.device(getattr(args, "device", "cpu"))), tuple(model.config.image_size)


def _max_rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (1.0 + np.abs(b).max()))


def _check_against_eager(model, run, hw, n: int) -> float:
    """Largest ``|exported − eager| / (1 + max|eager|)`` over the heads on a seeded N(0, 1) batch of 2."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, *hw)).astype(np.float32))
    with torch.no_grad():
        cls, box = model(x.to(next(model.parameters()).device))
    ref = [t.cpu().numpy() for t in (*cls, *box)]
    got = run(x)
    return max(_max_rel(g, r) for g, r in zip(got[:n], ref))


#: exported vs eager on a random input: measured ≤ 1e-6 (ONNX Runtime's conv/BN folding rounding);
#: a wrong padding or a lost layer moves the heads by O(1).
CHECK_TOL = 1e-4


def _onnx(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401  (checked for: the exporter writes with it)
        import onnxruntime as ort
    except ImportError as e:
        _err(f"ONNX export needs onnx and onnxruntime ({e.name} missing): pip install -e .[export]")
        return 1
    model, hw = _load_model(args)
    t0 = time.time()
    decode = args.decode or args.nms
    program = export_program(model, hw, decode)
    proto = export_onnx(model, hw, None, decode=decode, nms=args.nms, program=program)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    n = 2 * len(model.config.levels)
    err = _check_against_eager(model, lambda x: sess.run(None, {"image": x.numpy()}), hw, n)
    if not err <= CHECK_TOL:
        _err(f"onnxruntime's heads differ from the PyTorch model by {err:.2e} (relative) > {CHECK_TOL:g}; "
             f"nothing written")
        return 1
    atomic_write(args.output, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    outs = [o.name for o in proto.graph.output]
    print(f"variant     {model.config.name} ({model.config.num_classes} classes)\n"
          f"input       image [batch, 3, {hw[0]}, {hw[1]}] float32, normalised RGB\n"
          f"outputs     {', '.join(outs)}\n"
          f"opset       {OPSET}; onnx.checker passed\n"
          f"check       onnxruntime vs PyTorch heads, random batch of 2: max rel. error {err:.1e}\n"
          f"output      {args.output} ({args.output.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.0f} s)")
    return 0


def _torch_export(args: argparse.Namespace) -> int:
    import torch


    model, hw = _load_model(args)
    t0 = time.time()
    program = export_program(model, hw, args.decode)
    dev = next(model.parameters()).device
    n = 2 * len(model.config.levels)
    with torch.no_grad():
        err = _check_against_eager(model, lambda x: [t.cpu().numpy() for t in program.module()(x.to(dev))], hw, n)
    if not err <= CHECK_TOL:
        _err(f"the exported program differs from eager by {err:.2e} (relative) > {CHECK_TOL:g}; nothing written")
        return 1
    atomic_write(args.output, lambda tmp: save_program(program, tmp))
    print(f"variant     {model.config.name} ({model.config.num_classes} classes), input [batch, 3, {hw[0]}, {hw[1]}]\n"
          f"check       exported program vs eager heads, random batch of 2: max rel. error {err:.1e}\n"
          f"output      {args.output} (torch.export.load(path).module()(x); {time.time() - t0:.0f} s)")
    return 0


def _official(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.weights, args.variant)
    variant = resolve_variant_name(args.variant)
    rec = ckpt.record or {}
    if rec and rec["variant"] != variant:
        raise CheckpointError(f"{args.weights}: holds {rec['variant']} weights (its record), not {variant}")
    anchors = rec.get("anchors") or VARIANTS[variant].anchors
    classes = num_classes_of(ckpt.state, anchors.num_anchors, source=str(args.weights))
    cfg = get_config(variant, image_size=rec.get("image_size"), num_classes=classes, anchors=anchors,
                     class_names=rec.get("class_names"))
    hp, hp_yaml = hparams_for(cfg)  # before writing: anchors the official code cannot build are refused
    yaml_path = (args.output / "config.yaml" if args.command == "tf1" else args.output.with_suffix(".yaml"))
    if hp is None and yaml_path.exists() and not args.force:
        raise FileExistsError(f"{yaml_path} already exists; pass --force to overwrite")
    if args.command == "tf1":
        out = write_tf1_checkpoint(ckpt.state, variant, args.output, global_step=args.global_step,
                                   force=args.force, source=str(args.weights), anchors=anchors)
        what = "TF1 checkpoint (raw = EMA shadows, global_step %d)" % args.global_step
    else:
        out = write_keras_h5(ckpt.state, variant, args.output, force=args.force, source=str(args.weights),
                             anchors=anchors)
        what = "Keras .h5 (official save_weights layout)"
    if hp is None:  # aspect-ratio pairs: only the YAML form of --hparams spells them
        import yaml

        atomic_write(yaml_path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(hp_yaml, sort_keys=False)))
        flag = f" --hparams={yaml_path}"
    else:
        flag = f' --hparams="{hp}"' if hp else " (the official configuration: no --hparams needed)"
    print(f"variant     {variant} ({classes} classes{', ' + anchors.describe() if anchors != VARIANTS[variant].anchors else ''})\n"
          f"format      {what}\n"
          f"variables   {len(ckpt.state)}\n"
          f"output      {out}" + (f" and {yaml_path} (the anchors' pairs need the YAML form)" if hp is None else "") + "\n"
          f"official    --model_name={variant}{flag}\n"
          f"parity      effdet-parity compare --variant {variant} --weights {out} --automl-dir DIR"
          + (f" --hparams {yaml_path}" if hp is None else (f' --hparams "{hp}"' if hp else "")))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    try:
        if getattr(args, "image_size", None):
            parse_image_size(args.image_size)
    except ValueError as e:
        _err(str(e))
        return 2
    if args.output.exists() and not args.force:
        if not (args.command == "tf1" and args.output.is_dir() and not any(args.output.iterdir())):
            _err(f"{args.output} already exists; pass --force to overwrite")
            return 1
    if getattr(args, "device", "cpu") != "cpu":
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            _err(f"--device {args.device}: {e}")
            return 2
        if dev.type == "cuda" and not torch.cuda.is_available():
            _err(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
            return 1
    run = {"onnx": _onnx, "torch-export": _torch_export, "tf1": _official, "h5": _official}[args.command]
    try:
        return run(args)
    except (CheckpointError, ValueError, FileExistsError, OSError) as e:
        _err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
