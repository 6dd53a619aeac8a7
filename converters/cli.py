"""``convert-ckpt``: official EfficientDet checkpoint → PyTorch ``.pth`` / ``.safetensors``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effdet_torch.config import VARIANTS, resolve_variant_name

RELEASE_URLS = {
    **{f"efficientdet-d{i}": f"https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d{i}.tar.gz"
       for i in range(8)},
    "efficientdet-d7x": "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/efficientdet-d7x.tar.gz",
    **{f"efficientdet-lite{i}": f"https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite{i}.tgz"
       for i in (0, 1, 2, 3, 4)},
    "efficientdet-lite3x": "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/efficientdet-lite3x.tgz",
}

EPILOG = """\
examples:
  convert-ckpt d0                            # finds efficientdet-d0/, .tar.gz/.tgz or .h5 here
  convert-ckpt d7x --ckpt ~/Downloads/efficientdet-d7x.tar.gz -o d7x.pth
  convert-ckpt lite0 --ckpt efficientdet-lite0/ --format safetensors
  convert-ckpt d0 --ckpt model.h5 --force    # overwrite an existing output
  convert-ckpt --print-map d3                # the TF-name -> torch-key table

The EMA shadows (<name>/ExponentialMovingAverage) are taken, as the official loader does;
--no-ema takes the raw variables. Optimizer slots (/Momentum) and global_step are ignored.
Anything missing, unexpected, of the wrong shape or not finite stops the conversion with the
variables named, and nothing is written. TensorFlow is not needed.
"""


def _candidates(variant: str, where: Path) -> list[Path]:
    return [where / variant, where / f"{variant}.tar.gz", where / f"{variant}.tgz", where / f"{variant}.h5"]


def find_release_file(variant: str, where: Path) -> Path | None:
    for p in _candidates(variant, where):
        if p.exists():
            return p
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert-ckpt",
        description="Convert an official google/automl EfficientDet checkpoint (TF1 release "
                    "directory or tarball, or Keras .h5) into a PyTorch state dict for effdet_torch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("variant", help="d0..d7, d7x, lite0..lite4, lite3x, or the full name (efficientdet-d0)")
    p.add_argument("--ckpt", type=Path, help="checkpoint: directory, prefix, .index, .tar.gz/.tgz or .h5 "
                                             "(default: look for the release file in the working directory)")
    p.add_argument("-o", "--output", type=Path, help="output file (default: <variant>.pth / .safetensors)")
    p.add_argument("--format", choices=("pth", "safetensors"), default=None,
                   help="output format (default: from the -o suffix, else pth)")
    p.add_argument("--no-ema", action="store_true", help="take the raw variables instead of the EMA shadows")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--print-map", action="store_true", help="print the TF-name -> torch-key map and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        variant = resolve_variant_name(args.variant)
    except ValueError as e:
        print(f"convert-ckpt: {e}", file=sys.stderr)
        return 2
    if args.print_map:
        from .name_map import format_map, name_map_for

        print(format_map(name_map_for(variant)))
        return 0
    ckpt = args.ckpt or find_release_file(variant, Path.cwd())
    if ckpt is None:
        tried = ", ".join(str(p.name) + ("/" if i == 0 else "") for i, p in enumerate(_candidates(variant, Path.cwd())))
        print(f"convert-ckpt: no checkpoint for {variant} in {Path.cwd()} (looked for {tried}).\n"
              f"  Download the official release file:\n    {RELEASE_URLS[variant]}\n"
              f"  then run this again in its folder, or pass --ckpt PATH.", file=sys.stderr)
        return 2
    fmt = args.format or ("safetensors" if args.output and args.output.suffix == ".safetensors" else "pth")
    out = args.output or Path(f"{variant}.{fmt}")
    if out.exists() and not args.force:
        print(f"convert-ckpt: {out} already exists; pass --force to overwrite", file=sys.stderr)
        return 2
    from .convert import convert_checkpoint, save_state_dict
    from .sources import CheckpointError

    try:
        res = convert_checkpoint(ckpt, variant, ema=not args.no_ema, progress=not args.quiet and sys.stderr.isatty())
        meta = {"variant": variant, "source": str(ckpt), "ema": str(res.ema)}
        digest = save_state_dict(res.state_dict, out, force=args.force,
                                 metadata=meta if fmt == "safetensors" else None)
    except (CheckpointError, FileExistsError) as e:
        print(f"convert-ckpt: {e}", file=sys.stderr)
        return 1
    weights = {None: "as saved in the .h5", True: "EMA shadows", False: "raw (no EMA)"}[res.ema]
    print(f"variant     {variant}\n"
          f"source      {ckpt} ({'TF1 checkpoint' if res.source_kind == 'tf1' else 'Keras h5'})\n"
          f"weights     {weights}\n"
          f"variables   {res.n_mapped} mapped, {len(res.ignored)} ignored (optimizer slots / global_step)\n"
          f"parameters  {res.num_params:,}\n"
          f"output      {out}\n"
          f"sha256      {digest}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
