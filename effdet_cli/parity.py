"""``effdet-parity``: prove a converted model equal to the official EfficientDet.

Subcommands:
  golden      compare every tap of a recorded official golden .npz (no TensorFlow needed)
  compare     layer-by-layer comparison with the LIVE official model (--automl-dir) or a golden,
              with a terminal table, report.json and a self-contained report.html
  record      record a golden (.npz + meta.json) from the live official model, for any checkpoint
  visualize   official detections and ours side by side, with an overlay and a table of pairs
  synth-ckpt  write an official-format TF1 checkpoint by the golden weights rule
  train-golden  compare our training step with a recording of the official trainer (training/golden.py)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

GOLDEN_EPILOG = """\
example:
  effdet-parity golden --variant d0 --image-size 256 \\
      --ckpt ../shared/golden/efficientdet-d0/ckpt \\
      --golden ../shared/golden/efficientdet-d0/tensors_chelsea.npz --json report.json

Cases: 'random' (input/random, or regenerated from --seed when absent), every image stored as
input/<name>_raw_uint8 (run through the official preprocessing) and every recorded
input/<name>_preprocessed without a raw image (fed as recorded). Every key of the file is compared
and reported (rule tolerance, our measured noise and its allowance); the exit status is 0 only if
all pass. The rules (parity/rules.py) say why each bound has its size:
  fp32 recordings:    |ours - official| <= max(1e-4*(1+max|official|), 3 * our fp32-vs-fp64 gap)
  float64 recordings (../shared/golden/fp64, recognised by dtype): our model runs in float64;
                      |ours - official| <= max(2**-50*(1+max|official|), 10 * our float64 noise)
"""


def _golden(args: argparse.Namespace) -> int:
    import torch

    from converters.sources import CheckpointError
    from effdet_torch.config import parse_image_size
    from effdet_torch.model import create_model

    from parity.golden import format_results, run_golden, write_json

    if not Path(args.golden).is_file():
        print(f"effdet-parity golden: {args.golden}: no such file", file=sys.stderr)
        return 2
    hw = parse_image_size(args.image_size) if args.image_size else None
    t0 = time.time()
    try:
        model = create_model(args.variant, checkpoint=args.ckpt, image_size=hw, ema=not args.no_ema)
    except (CheckpointError, ValueError) as e:
        print(f"effdet-parity golden: {e}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    results = run_golden(model, args.golden, image_size=hw, seed=args.seed, device=args.device)
    print(format_results(results))
    print(f"{model.config.name} on {args.golden} in {time.time() - t0:.1f} s")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


COMPARE_EPILOG = """\
examples:
  # live: the official model from your google/automl checkout (needs tensorflow + tf-keras)
  effdet-parity compare --variant d0 --ckpt efficientdet-d0 --automl-dir ~/src/automl --image cat.png
  # recorded: a golden written by `effdet-parity record` (or the bundled ones); no TensorFlow
  effdet-parity compare --variant d0 --ckpt efficientdet-d0 --golden golden/efficientdet-d0/tensors_random.npz

Every backbone block, BiFPN node, head repeat per level, class/box output, pre-NMS tensor and the
detections are compared in execution order (per tap: max abs / relative error, cosine similarity,
tolerance max(1e-4*(1+max|ref|), 3 x our fp32-vs-fp64 gap), pass/fail); the first divergent tap is named with the module of ours
and the official layer behind it. Writes OUT/report.json, OUT/report.html (self-contained) and, for
image inputs, OUT/detections_<case>.png. Exit status 1 when any tap fails, 2 on usage errors.
The official code is imported from DIR/efficientdet at run time, in a subprocess; nothing of it is
shipped with this project.
"""

RECORD_EPILOG = """\
example:
  effdet-parity record --variant d0 --ckpt my-finetuned-d0/ --automl-dir ~/src/automl \\
      --random --image cat.png --image-size 512 -o goldens/my-d0
  effdet-parity golden --variant d0 --ckpt my-finetuned-d0/ --golden goldens/my-d0/tensors.npz

Writes OUT/tensors.npz (the keys of the shared golden format) and OUT/meta.json (provenance,
versions, load report, conventions); --detailed adds OUT/tensors_detailed.npz (every block, BiFPN
node and head repeat) for `compare --golden OUT/tensors.npz --golden OUT/tensors_detailed.npz`.
Unless --no-check, our model is then checked against the recording (exit 1 if it does not match).
"""

VISUALIZE_EPILOG = """\
examples:
  effdet-parity visualize cat.png --variant d0 --ckpt efficientdet-d0 --automl-dir ~/src/automl
  effdet-parity visualize chelsea.png --variant d0 --ckpt efficientdet-d0 \\
      --golden golden/efficientdet-d0/tensors_chelsea.npz -o chelsea_d0.png

Panels: official | ours | overlay (matched thin green, near pairs orange, unmatched thick red =
official only, magenta = ours only), and a table of the pairs (COCO class, scores, delta score, IoU).
"""


def _add_common(p: argparse.ArgumentParser, official: str) -> None:
    p.add_argument("--variant", required=True, help="d0..d7x, lite0..lite4, lite3x or the full name")
    p.add_argument("--ckpt", required=True, help="the official checkpoint (TF1 dir/prefix, release tarball, "
                                                 "Keras .h5); ours converts the same file")
    p.add_argument("--image-size", help="network input size: N or the official 'WxH' (default: the variant's)")
    p.add_argument("--device", default="cpu", help="device of OUR model: cpu or cuda (the official side runs on TF's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if official == "either":
        return
    p.add_argument("--automl-dir", required=True, help="a google/automl checkout (its efficientdet/ is imported)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effdet-parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("golden", help="compare a converted model with a recorded official golden .npz",
                       epilog=GOLDEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--variant", required=True, help="d0..d7x, lite0..lite4, lite3x or the full name")
    g.add_argument("--ckpt", required=True, help="converted .pth/.safetensors or any official checkpoint")
    g.add_argument("--golden", required=True, help="golden tensors .npz")
    g.add_argument("--image-size", help="network input size: N, HxW as 'WxH' (default: from the golden inputs)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the random case when input/random is absent")
    g.add_argument("--json", type=Path, help="write one entry per compared key to this JSON file")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--no-ema", action="store_true", help="load raw variables instead of EMA (must FAIL)")
    g.set_defaults(func=_golden)
    c = sub.add_parser("compare", help="layer-by-layer comparison with the live official model or a golden",
                       epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(c, "either")
    c.add_argument("--automl-dir", help="a google/automl checkout: run the official model live")
    c.add_argument("--golden", action="append", help="a recorded golden .npz instead (repeatable: merged)")
    c.add_argument("--image", action="append", help="input image (official decode and preprocessing)")
    c.add_argument("--random", action="store_true", help="a seeded N(0,1) input fed as a normalised image (default)")
    c.add_argument("--seed", type=int, default=1234, help="seed of the random input")
    c.add_argument("--out", default="parity-report", help="folder for report.json / report.html / pictures")
    c.add_argument("--strict", action="store_true",
                   help="no fp32-noise measurement: every tensor must meet 1e-4*(1+max|ref|)")
    c.add_argument("--coarse", action="store_true", help="only the golden taps (no per-block/node/repeat taps)")
    c.add_argument("--quiet", action="store_true", help="print only failing taps and the summary")
    c.add_argument("--no-pictures", action="store_true", help="no detection pictures for image inputs")
    c.add_argument("--save-official", action="store_true",
                   help="keep the official run as a golden in OUT/official/ (tensors.npz, tensors_detailed.npz, "
                        "meta.json) to compare again later without TensorFlow")
    c.set_defaults(func=_lazy("cmd_compare"))
    r = sub.add_parser("record", help="record a golden .npz + meta.json from the live official model",
                       epilog=RECORD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(r, "required")
    r.add_argument("--image", action="append", help="an input image (repeatable); its decode is stored")
    r.add_argument("--random", action="store_true", help="record the seeded random case too (default if no image)")
    r.add_argument("--seed", type=int, default=1234, help="seed of the random input")
    r.add_argument("-o", "--out", required=True, help="output folder (tensors.npz, meta.json)")
    r.add_argument("--detailed", action="store_true", help="also write tensors_detailed.npz (every block/node/repeat)")
    r.add_argument("--no-check", action="store_true", help="do not check our model against the recording")
    r.set_defaults(func=_lazy("cmd_record"))
    v = sub.add_parser("visualize", help="official detections and ours side by side (PNG)",
                       epilog=VISUALIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("image", help="the image")
    _add_common(v, "either")
    v.add_argument("--automl-dir", help="a google/automl checkout: official detections from the live model")
    v.add_argument("--golden", help="a recorded golden .npz holding this image's detections")
    v.add_argument("--case", help="the golden case to use (default: the one whose recorded image equals IMAGE)")
    v.add_argument("-o", "--output", help="output PNG (default <case>_<variant>_parity.png)")
    v.add_argument("--top", type=int, default=20, help="draw the N highest-scoring detections of each side")
    v.add_argument("--min-score", type=float, default=0.0, help="draw only detections with at least this score")
    v.set_defaults(func=_lazy("cmd_visualize"))
    s = sub.add_parser("synth-ckpt", help="write an official-format checkpoint by the golden weights rule",
                       add_help=False)
    s.set_defaults(func=None)
    t = sub.add_parser("train-golden", help="compare our training step with a recording of the official trainer",
                       add_help=False)
    t.set_defaults(func=None)
    return p


def _lazy(name: str):
    def run(args: argparse.Namespace) -> int:
        from parity import commands

        return getattr(commands, name)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth-ckpt":
        from fixtures.synth_ckpt import main as synth_main

        return synth_main(argv[1:])
    if argv and argv[0] == "train-golden":  # lives in the training package, which sits above parity
        from training.golden import main as train_golden_main

        return train_golden_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
