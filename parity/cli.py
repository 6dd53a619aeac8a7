"""``effdet-parity``: prove a converted model equal to the official EfficientDet.

Subcommands:
  golden      compare every tap of a recorded official golden .npz (no TensorFlow needed)
  synth-ckpt  write an official-format TF1 checkpoint by the golden weights rule
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

Cases: 'random' (input/random, or regenerated from --seed when absent) and every image stored as
input/<name>_raw_uint8 (run through the official preprocessing). Every tap present in the file is
compared; the exit status is 0 only if all are within tolerance (see parity/golden.py for the
tolerances and why they have their size).
"""


def _golden(args: argparse.Namespace) -> int:
    import torch

    from converters.sources import CheckpointError
    from effdet_torch.config import parse_image_size
    from effdet_torch.model import create_model

    from .golden import format_results, run_golden, write_json

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
    s = sub.add_parser("synth-ckpt", help="write an official-format checkpoint by the golden weights rule",
                       add_help=False)
    s.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth-ckpt":
        from converters.synth import main as synth_main

        return synth_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
