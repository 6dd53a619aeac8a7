"""``effdet-anchors``: how well the anchors fit a COCO-format training set, and anchors that fit better.

Reads the boxes the training would see (``-p NAME --data-path DIR`` as ``effdet-train``, or
``--annotations FILE --images DIR``), places them as the official letterbox scaling does at the
variant's input size, and reports for the project's anchors and for a suggested set: the share of
boxes whose best anchor reaches IoU 0.5 (the others are only force-matched to one anchor), by COCO
size and by aspect ratio, and the positives per box of the official matcher. The suggestion keeps the
official form (octave scales, float ratios, one anchor_scale; method: training/anchor_fit.py) and is
printed as lines to paste into the project file and as the official --hparams.

    effdet-anchors -c 0 -p poles --data-path datasets/
    effdet-anchors --variant d0 --annotations instances_train.json --images train/ -o anchors.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effdet_torch.config import get_config, parse_image_size, resolve_variant_name

from .common import EXIT_USAGE, VARIANT_HELP, add_output, error, parse_args, variant_type

PROG = "effdet-anchors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--compound-coef", "--compound_coef", type=int, help="0-7 (d0..d7), 8 = d7x (default 0)")
    g.add_argument("--variant", type=variant_type, metavar="NAME", help=VARIANT_HELP)
    p.add_argument("-p", "--project", help="projects/NAME.yml in the seed's format: its anchors and train_set")
    p.add_argument("--projects-dir", default="projects", help="folder of the project .yml files (default projects)")
    p.add_argument("--data-path", "--data_path", default="datasets/",
                   help="holds NAME/{train_set}/ and NAME/annotations/instances_{set}.json (default datasets/)")
    p.add_argument("--set", choices=("train_set", "val_set"), default="train_set",
                   help="which set of the project (default train_set)")
    p.add_argument("--annotations", help="a COCO instances_*.json instead of a project (with --images)")
    p.add_argument("--images", help="the folder its file_name entries are in")
    p.add_argument("--image-size", help="network input size (default: the variant's)")
    p.add_argument("--num-ratios", type=int, help="aspect ratios of the suggestion (default: as many as now)")
    p.add_argument("--max-boxes", type=int, default=5000, help="boxes the search samples (default 5000; the "
                   "report counts them all)")
    p.add_argument("--no-search", action="store_true", help="only report the current anchors")
    add_output(p, help="write the report (both configurations, every bucket) as JSON here", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _pct(v: float) -> str:
    return "   n/a" if v != v else f"{100 * v:5.1f}%"


def format_report(rows: list, variant: str, hw: tuple[int, int]) -> str:
    """The table: a column per configuration (``Coverage``), a row per measure and bucket."""
    head = f"{'':<28}" + "".join(f"{name:>14}" for name, _ in rows)
    lines = [f"anchors at {hw[0]}x{hw[1]} (H x W) of {variant}, boxes after the official letterbox scaling", head]
    cov = [c for _, c in rows]
    lines.append(f"{'boxes':<28}" + "".join(f"{len(c.best_iou):>14}" for c in cov))
    lines.append(f"{'best IoU >= 0.5':<28}" + "".join(f"{_pct(c.share):>14}" for c in cov))
    lines.append(f"{'mean best IoU':<28}" + "".join(f"{c.mean_best_iou:>14.3f}" for c in cov))
    lines.append(f"{'positives per box':<28}" + "".join(
        f"{c.positives_per_box:>14.2f}" if c.positives_per_box is not None else f"{'-':>14}" for c in cov))
    for title, key in (("size", "by_size"), ("aspect", "by_aspect")):
        for i, (bucket, n, _) in enumerate(getattr(cov[0], key)):
            label = f"  {title} {bucket} ({n})"
            lines.append(f"{label:<28}" + "".join(f"{_pct(getattr(c, key)[i][2]):>14}" for c in cov))
    return "\n".join(lines)


def yml_lines(anchors, variant: str) -> list[str]:
    """The project-file lines of ``anchors`` (official form) and the official --hparams."""
    from converters.hparams import hparams_for

    n = anchors.num_scales
    scales = "[" + ", ".join("2 ** 0" if i == 0 else f"2 ** ({i}.0 / {n}.0)" for i in range(n)) + "]"
    ratios = "[" + ", ".join(repr(r) for r in anchors.aspect_ratios) + "]"
    out = [f"anchors_scales: '{scales}'", f"anchors_ratios: '{ratios}'"]
    if anchors.anchor_scale != get_config(variant).anchors.anchor_scale:
        out.append(f"anchor_scale: {anchors.anchor_scale!r}")
    hp, _ = hparams_for(get_config(variant, anchors=anchors))
    out.append(f"# the official scripts: --hparams=\"{hp}\"" if hp else "# the official default anchors")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    from tqdm import tqdm

    from effdet_torch.files import write_json
    from training.anchor_fit import coverage, letterboxed, suggest_anchors
    from training.data import CocoTrainDataset
    from training.project import dataset_paths, load_project, project_anchors

    c = 0 if args.compound_coef is None else args.compound_coef
    try:
        variant = args.variant or resolve_variant_name("d7x" if c == 8 else f"d{c}")
        hw = parse_image_size(args.image_size) if args.image_size else get_config(variant).image_size
    except ValueError as e:
        return error(PROG, str(e), EXIT_USAGE)
    if (args.project is None) == (args.annotations is None):
        return error(PROG, "give either -p NAME (a project) or --annotations FILE --images DIR", EXIT_USAGE)
    if args.annotations and not args.images:
        return error(PROG, "--annotations needs --images DIR (the boxes are read as effdet-train reads them)",
                     EXIT_USAGE)
    if args.output and args.output.exists() and not args.force:
        return error(PROG, f"{args.output} already exists; pass --force to overwrite")
    if args.num_ratios is not None and not 1 <= args.num_ratios <= 9:
        return error(PROG, f"--num-ratios {args.num_ratios}: expected 1..9", EXIT_USAGE)
    try:
        if args.project:
            path = Path(args.projects_dir) / f"{args.project}.yml"
            proj = load_project(path)
            anchors = project_anchors(proj, variant, str(path))
            paths = dataset_paths(args.data_path, proj, args.set)
            if paths is None:
                return error(PROG, f"{path}: no {args.set}")
            ann, images = paths
            names = [str(n) for n in proj["obj_list"]]
        else:
            ann, images, anchors, names = Path(args.annotations), Path(args.images), get_config(variant).anchors, None
        if names is None:
            from evaluation.coco import load_annotations

            names = [str(cat["name"]) for cat in load_annotations(ann).get("categories", [])]
        ds = CocoTrainDataset(ann, images, names, hw, (0, 0, 0), (1, 1, 1))
    except (ValueError, FileNotFoundError, OSError) as e:
        return error(PROG, str(e))
    items = []
    for (_, arr), im in zip(ds.items, ds.sizes):
        keep = arr[:, 5] == 0  # crowd boxes: the official training skips them (skip_crowd_during_training)
        items.append((im[0], im[1], arr[keep, :4]))
    gt = letterboxed(items, hw)
    if not len(gt.boxes):
        return error(PROG, f"{ann}: no boxes to fit anchors to (after dropping crowd and degenerate boxes)")
    cfg = get_config(variant, image_size=hw, anchors=anchors)
    bar = tqdm(total=2 * gt.num_images, desc="official matcher", unit="image", disable=args.no_progress or
               not sys.stderr.isatty(), leave=False)
    rows = [("current", coverage(cfg, gt, hw, progress=bar.update))]
    if not args.no_search:
        bar.set_description("searching anchors")
        suggested = suggest_anchors(cfg, gt, hw, num_ratios=args.num_ratios, max_boxes=args.max_boxes)
        bar.set_description("official matcher")
        rows.append(("suggested", coverage(get_config(variant, image_size=hw, anchors=suggested), gt, hw,
                                           progress=bar.update)))
    bar.close()
    print(format_report(rows, variant, hw))
    for name, cov in rows:
        print(f"\n{name}: {cov.anchors.describe()}")
    if not args.no_search:
        best = rows[-1][1]
        gain = best.share - rows[0][1].share
        verdict = ("they cover more boxes: paste into projects/NAME.yml" if gain > 0 else
                   "the current anchors cover as many boxes: no change needed")
        print(f"\nsuggested ({verdict}):")
        print("\n".join(yml_lines(best.anchors, variant)))
    if args.output:
        write_json(args.output, {"variant": variant, "image_size": list(hw), "annotations": str(ann),
                                 **{name: cov.to_json() for name, cov in rows}})
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
