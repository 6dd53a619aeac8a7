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
import json
import sys
import time
from pathlib import Path

from converters.sources import CheckpointError
from effdet_torch.config import parse_image_size
from effdet_torch.model import create_model
from fixtures.synth_ckpt import DEFAULT_SEED, RULE_VERSION, write_synth_checkpoint
from golden import GOLDEN_ENV
from parity import commands
from parity.golden import format_results, run_golden, write_json
from parity.references import GoldenError
from training import golden as train_golden

from .common import (EXIT_USAGE, HPARAMS_HELP, add_device, add_hparams, add_output, add_variant, add_weights, error,
                     hparams_of, parse_args)

GOLDEN_EPILOG = """\
example:
  effdet-parity golden --variant d0 --image-size 256 \\
      --weights ../shared/golden/efficientdet-d0/ckpt \\
      --golden ../shared/golden/efficientdet-d0/tensors_chelsea.npz --json report.json

Cases: 'random' (input/random, or regenerated from --seed when absent), every image stored as
input/<name>_raw_uint8 (run through the official preprocessing) and every recorded
input/<name>_preprocessed without a raw image (fed as recorded). Every key of the file is compared
and reported (rule tolerance, our measured noise and its allowance); the exit status is 0 only if
all pass. The rules (parity/rules.py) say why each bound has its size:
  fp32 recordings:    |ours - official| <= max(1e-4*(1+max|official|), 5 * our fp32-vs-fp64 gap)
  float64 recordings (../shared/golden/fp64, recognised by dtype): our model runs in float64;
                      |ours - official| <= max(2**-50*(1+max|official|), 10 * our float64 noise)
  detections:         our post-processing on the official heads: strictly equal; end to end: within
                      8 x our detections' fp32 noise, after taking the official choice where fp32
                      could make either (class near-ties, soft-NMS order near-ties), with up to
                      2 L rows unmatched, L = rows our fp32 list loses to our float64 list. When 2 L
                      covers every row the input is NOISE-DOMINATED and the taps decide. The lines
                      after the table say how each detection list was decided.
"""


def _golden(args: argparse.Namespace) -> int:
    import torch


    if not Path(args.golden).is_file():
        return error("effdet-parity golden", f"{args.golden}: no such file")
    t0 = time.time()
    try:
        hw = parse_image_size(args.image_size) if args.image_size else None
        hp = hparams_of(args, args.variant)
        model = create_model(args.variant, checkpoint=args.weights, image_size=hw, ema=not args.no_ema,
                             anchors=hp and hp.anchors)
    except (CheckpointError, ValueError) as e:
        return error("effdet-parity golden", str(e))
    torch.set_grad_enabled(False)
    try:
        results = run_golden(model, args.golden, image_size=hw, seed=args.seed, device=args.device)
    except GoldenError as e:
        return error("effdet-parity golden", str(e))
    print(format_results(results))
    print(f"{model.config.name} on {args.golden} in {time.time() - t0:.1f} s")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


COMPARE_EPILOG = """\
examples:
  # live: the official model from your google/automl checkout (needs tensorflow + tf-keras)
  effdet-parity compare --variant d0 --weights efficientdet-d0 --automl-dir ~/src/automl --image cat.png
  # recorded: a golden written by `effdet-parity record` (or the bundled ones); no TensorFlow
  effdet-parity compare --variant d0 --weights efficientdet-d0 --golden golden/efficientdet-d0/tensors_random.npz

Every backbone block, BiFPN node, head repeat per level, class/box output, pre-NMS tensor and the
detections are compared in execution order (per tap: max abs / relative error, cosine similarity,
tolerance max(1e-4*(1+max|ref|), 5 x our fp32-vs-fp64 gap), pass/fail); the first divergent tap is named with the module of ours
and the official layer behind it. Writes OUT/report.json, OUT/report.html (self-contained) and, for
image inputs, OUT/detections_<case>.png. Exit status 1 when any tap fails, 2 on usage errors.
The official code is imported from DIR/efficientdet at run time, in a subprocess; nothing of it is
shipped with this project.
"""

RECORD_EPILOG = """\
example:
  effdet-parity record --variant d0 --weights my-finetuned-d0/ --automl-dir ~/src/automl \\
      --random --image cat.png --image-size 512 -o goldens/my-d0
  effdet-parity golden --variant d0 --weights my-finetuned-d0/ --golden goldens/my-d0/tensors.npz

Writes OUT/tensors.npz (the keys of the shared golden format) and OUT/meta.json (provenance,
versions, load report, conventions); --detailed adds OUT/tensors_detailed.npz (every block, BiFPN
node and head repeat) for `compare --golden OUT/tensors.npz --golden OUT/tensors_detailed.npz`.
Unless --no-check, our model is then checked against the recording (exit 1 if it does not match).
"""

VISUALIZE_EPILOG = """\
examples:
  effdet-parity visualize cat.png --variant d0 --weights efficientdet-d0 --automl-dir ~/src/automl
  effdet-parity visualize chelsea.png --variant d0 --weights efficientdet-d0 \\
      --golden golden/efficientdet-d0/tensors_chelsea.npz -o chelsea_d0.png

Panels: official | ours | overlay (matched thin green, near pairs orange, unmatched thick red =
official only, magenta = ours only), and a table of the pairs (COCO class, scores, delta score, IoU).
"""


def _add_common(p: argparse.ArgumentParser, official: str) -> None:
    add_variant(p)
    add_weights(p, help="the official checkpoint (TF1 dir/prefix, release tarball, Keras .h5); ours converts "
                        "the same file")
    p.add_argument("--image-size", help="network input size: N or the official 'WxH' (default: the variant's)")
    add_hparams(p, help=HPARAMS_HELP + "; passed to the official model too")
    add_device(p, help="device of OUR model: cpu, cuda or cuda:N (the official side runs on TF's)")
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
    add_variant(g)
    add_weights(g)
    g.add_argument("--golden", required=True, help="golden tensors .npz")
    g.add_argument("--image-size", help="network input size: N, HxW as 'WxH' (default: from the golden inputs)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the random case when input/random is absent")
    g.add_argument("--json", type=Path, help="write one entry per compared key to this JSON file")
    add_device(g)
    g.add_argument("--no-ema", action="store_true", help="load raw variables instead of EMA (must FAIL)")
    add_hparams(g)
    g.set_defaults(func=_golden)
    c = sub.add_parser("compare", help="layer-by-layer comparison with the live official model or a golden",
                       epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(c, "either")
    c.add_argument("--automl-dir", help="a google/automl checkout: run the official model live")
    c.add_argument("--golden", action="append", help="a recorded golden .npz instead (repeatable: merged)")
    c.add_argument("--image", action="append", help="input image (official decode and preprocessing)")
    c.add_argument("--random", action="store_true", help="a seeded N(0,1) input fed as a normalised image (default)")
    c.add_argument("--seed", type=int, default=1234, help="seed of the random input")
    add_output(c, default="parity-report", help="folder for report.json / report.html / pictures (default parity-report)")
    c.add_argument("--strict", action="store_true",
                   help="no fp32-noise measurement: every tensor must meet 1e-4*(1+max|ref|)")
    c.add_argument("--coarse", action="store_true", help="only the golden taps (no per-block/node/repeat taps)")
    c.add_argument("--quiet", action="store_true", help="print only failing taps and the summary")
    c.add_argument("--no-pictures", action="store_true", help="no detection pictures for image inputs")
    c.add_argument("--save-official", action="store_true",
                   help="keep the official run as a golden in OUT/official/ (tensors.npz, tensors_detailed.npz, "
                        "meta.json) to compare again later without TensorFlow")
    c.set_defaults(func=commands.cmd_compare)
    r = sub.add_parser("record", help="record a golden .npz + meta.json from the live official model",
                       epilog=RECORD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(r, "required")
    r.add_argument("--image", action="append", help="an input image (repeatable); its decode is stored")
    r.add_argument("--random", action="store_true", help="record the seeded random case too (default if no image)")
    r.add_argument("--seed", type=int, default=1234, help="seed of the random input")
    add_output(r, required=True, help="output folder (tensors.npz, meta.json)")
    r.add_argument("--detailed", action="store_true", help="also write tensors_detailed.npz (every block/node/repeat)")
    r.add_argument("--no-check", action="store_true", help="do not check our model against the recording")
    r.set_defaults(func=commands.cmd_record)
    v = sub.add_parser("visualize", help="official detections and ours side by side (PNG)",
                       epilog=VISUALIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("image", help="the image")
    _add_common(v, "either")
    v.add_argument("--automl-dir", help="a google/automl checkout: official detections from the live model")
    v.add_argument("--golden", help="a recorded golden .npz holding this image's detections")
    v.add_argument("--case", help="the golden case to use (default: the one whose recorded image equals IMAGE)")
    add_output(v, help="output PNG (default <case>_<variant>_parity.png)")
    v.add_argument("--top", type=int, default=20, help="draw the N highest-scoring detections of each side")
    v.add_argument("--min-score", type=float, default=0.0, help="draw only detections with at least this score")
    v.set_defaults(func=commands.cmd_visualize)
    s = sub.add_parser("synth-ckpt", help="write an official-format checkpoint by the golden weights rule",
                       description=SYNTH_DESCRIPTION, epilog=SYNTH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant(s, required=False)
    s.add_argument("variant_positional", nargs="?", help=argparse.SUPPRESS)  # the old spelling: a name or a manifest
    s.add_argument("--manifest", metavar="FILE", help="a manifest .json/.json.gz instead of a variant's")
    add_output(s, required=True, help="output folder (created if missing; must be empty unless --force)")
    s.add_argument("--out-dir", dest="output", help=argparse.SUPPRESS)
    s.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                   help=f"rule seed (default {DEFAULT_SEED}, the seed of every golden)")
    s.add_argument("--bn-stats", metavar="FILE", default=None,
                   help="BN-statistics side-car bn_stats/<variant>.npz that replaces every moving_mean/"
                        "moving_variance key (raw and EMA), or 'auto' to take it from the golden folders. Without "
                        "it the BN statistics keep the raw rule values (NOT the golden weights)")
    s.add_argument("--momentum", action="store_true",
                   help="also write the <trainable>/Momentum optimizer slots (not in release checkpoints)")
    s.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing the checkpoint files")
    s.add_argument("--golden-dir", metavar="DIR", default=None,
                   help=f"folder with manifests/ and bn_stats/ (default: ${GOLDEN_ENV}, the installed golden "
                        "package data, <checkout>/../shared/golden)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    add_hparams(s, help="a head for other anchors or classes, in the official --hparams forms (config.yaml or "
                        "'num_classes=7,aspect_ratios=1.0*2.0*0.5*4.0'): the predictors get their shapes, every "
                        "other variable is the variant's")
    s.set_defaults(func=_synth_ckpt)
    t = sub.add_parser("train-golden", help="compare our training step with a recording of the official trainer",
                       description="Compare our training step with a recording of the official TF trainer.",
                       epilog=TRAIN_GOLDEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant(t)
    t.add_argument("--image-size", help="network input size: N or the official 'WxH' (default: the recording's)")
    add_weights(t, help="the step-0 weights: converted .pth/.safetensors or an official checkpoint")
    t.add_argument("--golden", required=True, help="folder with train_step.npz, meta.json (and augment.npz)")
    t.add_argument("--json", type=Path, help="write one entry per npz key (max error, tolerance, verdict)")
    t.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    t.add_argument("--quiet", action="store_true", help="print only failing keys and the family summary")
    add_hparams(t)
    t.set_defaults(func=_train_golden)
    return p


SYNTH_DESCRIPTION = f"""\
Regenerate a synthetic official-format EfficientDet release checkpoint with the
bit-reproducible rule {RULE_VERSION} (fixtures/synth_ckpt.py; golden/README.md): raw variables,
their /ExponentialMovingAverage shadows and global_step, optionally /Momentum slots.
No TensorFlow is needed. A test fixture, not a model: its weights are random by rule.

Writes into DIR: model.index, model.data-00000-of-00001, checkpoint (TF state
file) and model.values_sha256.json (sha256 of every array, the format of the
golden sha lists, so `diff` against golden/<variant>/ckpt/model.values_sha256.json
checks bit-exactness)."""

SYNTH_EPILOG = """\
examples:
  effdet-parity synth-ckpt --variant d0 --bn-stats ../shared/golden/bn_stats/efficientdet-d0.npz -o /tmp/d0
  effdet-parity synth-ckpt --variant lite0 --bn-stats auto -o /tmp/lite0
  effdet-parity synth-ckpt --manifest path/to/manifest.json.gz --seed 7 -o /tmp/x --force
"""

TRAIN_GOLDEN_EPILOG = """\
example:
  effdet-parity train-golden --variant d0 --image-size 256 \\
      --weights ../shared/golden/efficientdet-d0/ckpt \\
      --golden ../shared/golden/train/efficientdet-d0_256 --json train-golden.json

Runs our target assignment, training-mode forward, loss, clipped gradients and the recorded number
of optimizer steps from the checkpoint's weights (in fp32, and again in fp64 to measure our own
rounding), and our augmentation with the recorded forced draws; compares every key of
train_step.npz and augment.npz. Exit 0 only if every key passes; 1 on a failed key or bad input;
2 on usage errors. Tolerances: see training/golden.py.
"""


def _synth_ckpt(args: argparse.Namespace) -> int:
    prog = "effdet-parity synth-ckpt"
    what = args.manifest or args.variant or args.variant_positional
    if what is None:
        return error(prog, "give --variant NAME or --manifest FILE", EXIT_USAGE)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        return error(prog, f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        return error(prog, f"output folder {out} is not empty; refusing to write into it (pass --force to "
                           "replace the checkpoint files there)")
    t0 = time.perf_counter()
    try:
        head = None
        if args.hparams:
            if not (args.variant or args.variant_positional):
                return error(prog, "--hparams needs --variant NAME (it shapes that variant's head)", EXIT_USAGE)
            cfg = hparams_of(args, args.variant or args.variant_positional).config(args.variant or args.variant_positional)
            head = (cfg.num_classes, cfg.num_anchors)
        path = write_synth_checkpoint(what, out, seed=args.seed, bn_stats_path=args.bn_stats, momentum=args.momentum,
                                      golden_dir=args.golden_dir, progress=False if args.quiet else None, head=head)
    except (FileNotFoundError, ValueError) as exc:
        return error(prog, str(exc))
    if not args.quiet:
        doc = json.loads((path / "model.values_sha256.json").read_text())
        print(f"wrote {doc['n']} tensors of {doc['variant']} (rule {RULE_VERSION}, seed {args.seed}, "
              f"bn_stats {doc['bn_stats']}) to {path / 'model'} in {time.perf_counter() - t0:.1f} s")
    return 0


def _train_golden(args: argparse.Namespace) -> int:
    prog = "effdet-parity train-golden"
    t0 = time.time()
    try:
        meta, _, _ = train_golden.load_recording(args.golden)
        hw = parse_image_size(args.image_size) if args.image_size else tuple(meta["image_hw"])
        if args.json and args.json.exists() and not args.force:
            return error(prog, f"{args.json}: exists (pass --force to overwrite)")
        hp = hparams_of(args, args.variant)
        model = create_model(args.variant, checkpoint=args.weights, image_size=hw, anchors=hp and hp.anchors)
        if meta.get("variant") and meta["variant"] != model.config.name:
            return error(prog, f"{args.golden}: recorded for {meta['variant']}, not {model.config.name}")
        results = train_golden.run_train_golden(model, args.golden)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        return error(prog, str(e) if not isinstance(e, KeyError) else f"{args.golden}/meta.json: missing field {e}")
    print(train_golden.format_results(results, quiet=args.quiet))
    print(f"{model.config.name} on {args.golden} in {time.time() - t0:.1f} s")
    if args.json:
        train_golden.write_json(results, args.json, force=args.force)
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
