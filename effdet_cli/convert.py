"""``convert-ckpt``: official EfficientDet checkpoint → PyTorch ``.pth`` / ``.safetensors``."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import golden as golden_data
from converters import EMA_SUFFIX
from converters.convert import convert_checkpoint, save_state_dict
from converters.hparams import parse_hparams
from converters.download import RELEASE_URLS, DownloadError, download, release_url
from converters.name_map import format_map, name_map_for
from converters.sources import RELEASE_SUFFIXES, CheckpointError, find_release_file
from effdet_torch.checkpoint import num_classes_of
from effdet_torch.config import get_config
from effdet_torch.files import sha256_array
from effdet_torch.model import create_model
from parity.golden import run_golden

from .common import EXIT_USAGE, add_device, add_output, add_variant, add_weights, error, parse_args, variant_type

PROG = "convert-ckpt"
EPILOG = """\
examples:
  convert-ckpt --variant d0                  # finds efficientdet-d0/, .tar.gz/.tgz or .h5 here
  convert-ckpt --variant d7x --weights ~/Downloads/efficientdet-d7x.tar.gz -o d7x.pth
  convert-ckpt --variant lite0 --weights efficientdet-lite0/ --format safetensors
  convert-ckpt --variant d0 --weights model.h5 --force    # overwrite an existing output
  convert-ckpt --variant d3 --print-map      # the TF-name -> torch-key table
  convert-ckpt --variant d0 --download       # fetch the official release file here, then convert
  convert-ckpt --variant d0 --verify         # then compare with a recorded golden for these weights
(the earlier spellings `convert-ckpt d0 --ckpt PATH` still work)

The EMA shadows (<name>/ExponentialMovingAverage) are taken, as the official loader does;
--no-ema takes the raw variables. Optimizer slots (/Momentum) and global_step are ignored.
Anything missing, unexpected, of the wrong shape or not finite stops the conversion with the
variables named, and nothing is written. TensorFlow is not needed.

--download fetches the release tarball into the working directory (resuming <file>.part after an
interruption), prints its sha256 and stores it in <file>.sha256. EFFDET_RELEASE_BASE_URL=URL
fetches <URL>/<file name> instead of the official location (a mirror).

--verify runs the golden parity check (effdet-parity golden) on the written file with every
recorded golden of the variant (./golden/<variant>/*.npz, this project's golden/<variant>/, or
--golden FILE). A golden is recorded with particular weights: where a model.values_sha256.json
lies beside it, the converted weights are checked against it first, and a golden recorded with
other weights (the bundled ones use the synthetic seed-1234 weights) is reported as not
applicable instead of run. No applicable golden is not an error.

exit status: 0 done, 1 bad input (no or a broken checkpoint, an existing output without --force,
a failed download) or --verify failed (the converted file is kept), 2 usage error.
"""


WEIGHTS_SHA_NAME = "model.values_sha256.json"


def find_goldens(variant: str, explicit: Path | None = None) -> list[Path]:
    """``--golden FILE``, else ``./golden/<variant>/*.npz``, else ``<variant>/*.npz`` in the recorded goldens
    (:func:`golden.golden_dirs`: ``$EFFDET_GOLDEN_DIR``, the installed package data, the shared recordings)."""
    if explicit is not None:
        return [explicit]
    for root in (Path.cwd() / "golden", *golden_data.golden_dirs()):
        found = sorted((root / variant).glob("*.npz"))
        if found:
            return found
    return []


def _weights_sha_for(npz: Path) -> Path | None:
    """The ``model.values_sha256.json`` of the weights a golden was recorded with, if it lies beside it."""
    for cand in (npz.parent / WEIGHTS_SHA_NAME, npz.parent / "ckpt" / WEIGHTS_SHA_NAME):
        if cand.is_file():
            return cand
    return None


def weights_mismatch(state: dict, variant: str, sha_json: Path) -> str | None:
    """None when ``state`` holds exactly the weights of ``sha_json`` (EMA values, as the goldens were
    recorded); otherwise why not, in a few words."""
    import json


    doc = json.loads(sha_json.read_text())
    if doc.get("variant") not in (None, variant):
        return f"it was recorded for {doc['variant']}"
    values = doc.get("values", {})
    entries = name_map_for(variant, num_classes=None)
    n_ema = n_raw = 0
    for e in entries:
        if e.torch_key not in state:
            return f"the converted model has no {e.torch_key}"
        ours = sha256_array(e.layout.to_tf(state[e.torch_key].numpy()))
        ema = values.get(e.tf_name + EMA_SUFFIX, values.get(e.tf_name, {})).get("sha256")
        raw = values.get(e.tf_name, {}).get("sha256")
        n_ema += ours == ema
        n_raw += ours == raw
    if n_ema == len(entries):
        return None
    if n_raw == len(entries):
        return "these are the raw weights (--no-ema); the golden was recorded with the EMA shadows"
    rule = doc.get("rule_version")
    made = f" ({rule} synthetic weights, seed {doc.get('seed')})" if rule else ""
    return f"{len(entries) - n_ema} of {len(entries)} weights differ from those it was recorded with{made}"


def verify_output(out: Path, variant: str, state: dict, golden: Path | None, device: str = "cpu") -> int:
    """``--verify``: the golden parity check on the written file. 0 passed or nothing to verify with,
    1 failed (or an explicit ``--golden`` recorded with other weights)."""
    goldens = find_goldens(variant, golden)
    if not goldens:
        looked = ", ".join(f"{d / variant}/" for d in (Path("golden"), *golden_data.golden_dirs()))
        print(f"verify      no golden recorded for {variant} (looked in {looked}; pass --golden FILE): not verified")
        return 0

    model = None
    ran = failed = 0
    for npz in goldens:
        sha = _weights_sha_for(npz)
        why = weights_mismatch(state, variant, sha) if sha is not None else None
        if why is not None:
            line = f"verify      {npz}: not applicable, {why}"
            if golden is not None:
                return error(PROG, line.removeprefix("verify      ") + "; cannot verify with it")
            print(line)
            continue
        if model is None:
            model = create_model(variant, checkpoint=out).to(device)  # the file as written, not the in-memory dict
        try:
            results = run_golden(model, npz, device=device)
        except (KeyError, ValueError, OSError) as e:
            return error(PROG, f"{npz}: cannot run the golden check ({type(e).__name__}: {e})")
        n_fail = sum(not r.passed for r in results)
        worst = max((r.max_rel_err for r in results if r.max_rel_err == r.max_rel_err and r.max_rel_err != float("inf")),
                    default=0.0)
        verdict = "PASS" if n_fail == 0 and results else "FAIL"
        print(f"verify      {npz}: {verdict}, {len(results)} taps compared, {len(results) - n_fail} passed, "
              f"{n_fail} failed (worst relative error {worst:.1e})")
        if verdict == "FAIL":
            bad = [r for r in results if not r.passed][:3]
            for r in bad:
                print(f"  {r.key}: max abs err {r.max_abs_err:.3e} > tolerance {r.tolerance:.3e} {r.note}".rstrip(),
                      file=sys.stderr)
            failed += 1
        ran += 1
    if failed:
        return error(PROG, f"--verify failed on {failed} golden file(s); {out} was written but does not "
                           f"reproduce the recorded official outputs")
    if not ran:
        print(f"verify      no golden recorded with these weights for {variant}: not verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an official google/automl EfficientDet checkpoint (TF1 release "
                    "directory or tarball, or Keras .h5) into a PyTorch state dict for effdet_torch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_variant(p, required=False)
    p.add_argument("variant_positional", nargs="?", type=variant_type, help=argparse.SUPPRESS)  # the old spelling
    add_weights(p, required=False, help="the official checkpoint: directory, prefix, .index, .tar.gz/.tgz or .h5 "
                                        "(default: look for the release file in the working directory)")
    add_output(p, help="output file (default: <variant>.pth / .safetensors)", type=Path)
    p.add_argument("--format", choices=("pth", "safetensors"), default=None,
                   help="output format (default: from the -o suffix, else pth)")
    p.add_argument("--no-ema", action="store_true", help="take the raw variables instead of the EMA shadows")
    p.add_argument("--hparams", metavar="FILE|STRING",
                   help="what the checkpoint was trained with, in the official --hparams forms: the run's config.yaml, "
                        "or a string such as 'aspect_ratios=1.0*2.0*0.5,num_scales=3,anchor_scale=4.0,num_classes=7' "
                        "(lists spelled with *; aspect-ratio pairs [x, y] only in YAML). Sets the anchors, classes, "
                        "class names (a label_map dict) and image size, recorded in the output")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--print-map", action="store_true", help="print the TF-name -> torch-key map and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--download", action="store_true",
                   help="download the official release file into the working directory first (resumable; "
                        "its sha256 goes to <file>.sha256); EFFDET_RELEASE_BASE_URL overrides the base URL")
    p.add_argument("--verify", action="store_true",
                   help="after writing, run the golden parity check when a golden for these weights is available")
    p.add_argument("--golden", type=Path, metavar="FILE",
                   help="golden .npz for --verify (default: ./golden/<variant>/*.npz, then the project's golden/)")
    add_device(p, help="where --verify runs the model: cpu, cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    variant = args.variant or args.variant_positional
    if variant is None:
        parser.print_usage(sys.stderr)
        return error(PROG, "the following arguments are required: --variant", EXIT_USAGE)
    args.ckpt = Path(args.weights) if args.weights is not None else None
    try:
        hp = parse_hparams(args.hparams, variant) if args.hparams else None
    except (OSError, ValueError) as e:
        return error(PROG, str(e), EXIT_USAGE)
    if args.print_map:
        print(format_map(name_map_for(variant, num_classes=hp and hp.num_classes, anchors=hp and hp.anchors)))
        return 0
    if args.download and args.ckpt is not None:
        return error(PROG, "--download fetches the release file into the working directory; "
                           "it cannot be combined with --weights", EXIT_USAGE)
    if args.golden is not None and not args.verify:
        args.verify = True  # --golden FILE implies --verify
    if args.golden is not None and not args.golden.is_file():
        return error(PROG, f"--golden {args.golden}: no such file")
    fmt = args.format or ("safetensors" if args.output and args.output.suffix == ".safetensors" else "pth")
    out = args.output or Path(f"{variant}.{fmt}")
    progress = not args.quiet and sys.stderr.isatty()
    if args.download:
        if out.exists() and not args.force:  # refuse before fetching hundreds of MB
            return error(PROG, f"{out} already exists; pass --force to overwrite")

        url = release_url(variant, RELEASE_URLS[variant])
        ckpt = Path.cwd() / url.rsplit("/", 1)[-1]
        print(f"download    {url}")
        try:
            digest = download(url, ckpt, progress=progress)
        except DownloadError as e:
            return error(PROG, str(e))
        print(f"download    {ckpt.name} sha256 {digest} (stored in {ckpt.name}.sha256)")
    else:
        ckpt = args.ckpt or find_release_file(variant, Path.cwd())
    if ckpt is None:
        tried = ", ".join(f"{variant}{suf or '/'}" for suf in RELEASE_SUFFIXES)
        return error(PROG, f"no checkpoint for {variant} in {Path.cwd()} (looked for {tried}).\n"
                           f"  Download the official release file:\n    {RELEASE_URLS[variant]}\n"
                           f"  then run this again in its folder, or pass --weights PATH (or use --download).")
    if out.exists() and not args.force:
        return error(PROG, f"{out} already exists; pass --force to overwrite")

    try:
        anchors = hp.anchors if hp else None
        res = convert_checkpoint(ckpt, variant, ema=not args.no_ema, progress=progress, anchors=anchors,
                                 num_classes=hp.num_classes if hp else None)
        cfg = hp.config(variant) if hp else get_config(variant)
        classes = num_classes_of(res.state_dict, cfg.num_anchors, source=str(ckpt))
        names = cfg.class_names if cfg.class_names is not None and len(cfg.class_names) == classes else None
        cfg = replace(cfg, num_classes=classes, class_names=names)
        digest = save_state_dict(res.state_dict, out, cfg, force=args.force)
    except (CheckpointError, FileExistsError, ValueError) as e:
        return error(PROG, str(e))
    weights = {None: "as saved in the .h5", True: "EMA shadows", False: "raw (no EMA)"}[res.ema]
    official = get_config(variant)
    print(f"variant     {variant}\n"
          + (f"hparams     {args.hparams}: {cfg.num_classes} classes, {cfg.image_size[0]}x{cfg.image_size[1]} (H x W), "
             f"{cfg.anchors.describe()}" + (" (official)" if cfg.anchors == official.anchors else "") + "\n"
             if hp else "")
          + f"source      {ckpt} ({'TF1 checkpoint' if res.source_kind == 'tf1' else 'Keras h5'})\n"
          f"weights     {weights}\n"
          f"variables   {res.n_mapped} mapped, {len(res.ignored)} ignored (optimizer slots / global_step)\n"
          f"parameters  {res.num_params:,}\n"
          f"output      {out}\n"
          f"sha256      {digest}")
    if args.verify:
        return verify_output(out, variant, res.state_dict, args.golden, device=args.device)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
