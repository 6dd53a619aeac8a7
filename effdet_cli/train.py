"""``effdet-train``: fine-tune EfficientDet on a COCO-format dataset with the official recipe.

The seed's project ``.yml`` and dataset layout; defaults are the official recipe (Keras SGD momentum
0.9, warm-up + cosine lr scaled to the batch, clipping 10, L2 4e-5 in the loss, EMA 0.9998,
official augmentation and targets). The loop lives in ``training.engine``; this script parses flags.

Files (OUTPUT/PROJECT/): ``last.ckpt`` (the whole training state: resume with ``--weights last``),
``<variant>_<epoch>_<step>.pth`` (EMA weights: what ``create_model``/``effdet-infer``/``effdet-eval``
load), ``best.pth`` (EMA weights of the best val AP); LOG/: ``train_log.csv``, ``tensorboard/`` (when
tensorboard is installed), ``debug/`` (``--debug``). Ctrl+C saves and exits 0.

    effdet-train -c 0 -p shape --data-path datasets/ --batch-size 8 --weights efficientdet-d0.pth
    effdet-train -c 0 -p shape --weights last          # resume exactly where it stopped
    torchrun --nproc-per-node 4 -m effdet_cli.train -c 0 -p shape --batch-size 32 ...   # 4 GPUs

Several GPUs (the project's num_gpus > 1): one process per GPU under torchrun; --batch-size is the
global batch (a multiple of the process count), BN statistics are synchronised over all processes
and every step equals the one-process step on the global batch (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from effdet_torch.config import resolve_variant_name
from evaluation.evaluate import dist_info
from training.engine import Engine, TrainConfig
from training.project import dataset_paths, load_project, pixel_scale, project_anchors

from .common import (EXIT_USAGE, VARIANT_HELP, add_device, add_output, add_weights, error, keep_freed_memory, parse_args,
                     variant_type, worker_message)

PROG = "effdet-train"


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--compound-coef", "--compound_coef", type=int, help="0-7 (d0..d7), 8 = d7x (default 0)")
    g.add_argument("--variant", type=variant_type, metavar="NAME", help=VARIANT_HELP)
    p.add_argument("-p", "--project", default="coco", help="projects/NAME.yml in the seed's format (default coco)")
    p.add_argument("--projects-dir", default="projects", help="folder of the project .yml files (default projects)")
    p.add_argument("--data-path", "--data_path", default="datasets/",
                   help="holds NAME/{train_set,val_set}/ and NAME/annotations/instances_{set}.json (default datasets/)")
    p.add_argument("--image-size", help="network input size (default: the variant's)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=12, help="images per step (default 12)")
    p.add_argument("--optim", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: the official Keras-convention SGD, momentum 0.9, L2 4e-5 in the loss (default); "
                        "adamw: the seed's choice, torch AdamW with decoupled weight decay 0.01 instead of the L2")
    p.add_argument("--lr", type=float,
                   help="base learning rate: sgd uses lr*batch/64 (official 0.08), warm-up from 0.008 over one epoch, "
                        "then cosine; adamw uses lr as given (default 1e-4), warm-up from lr/10, then cosine")
    p.add_argument("--num-epochs", "--num_epochs", type=int, default=300, help="epochs (default 300, official)")
    p.add_argument("--save-interval", "--save_interval", type=int, default=500,
                   help="save last.ckpt and the EMA .pth every N steps (and at the end; default 500)")
    p.add_argument("--val-interval", "--val_interval", type=int, default=1,
                   help="COCO AP of the EMA weights on val_set every N epochs, best kept as best.pth; 0: never (default 1)")
    p.add_argument("--es-min-delta", "--es_min_delta", type=float, default=0.0,
                   help="early stopping: an AP gain must exceed this to count (default 0.0)")
    p.add_argument("--es-patience", "--es_patience", type=int, default=0,
                   help="early stopping: stop after N evaluations without a gain; 0 disables it (default 0)")
    add_weights(p, required=False, aliases=("--load-weights", "--load_weights"),
                help="start from a converted .pth or an official checkpoint, or 'last' to resume OUTPUT/PROJECT/last.ckpt "
                     "exactly (model, optimizer, schedule, EMA, data position, RNG); the seed's --load_weights works too")
    p.add_argument("--jitter", type=float, nargs=2, default=(0.1, 2.0), metavar=("MIN", "MAX"),
                   help="random scale of the output size in the official augmentation (official jitter_min "
                        "jitter_max: 0.1 2.0; 1 1 keeps only the flip)")
    p.add_argument("--head-only", "--head_only", type=_bool, nargs="?", const=True, default=False,
                   help="train only the class/box heads (backbone and BiFPN frozen, as the official var_freeze_expr)")
    add_output(p, default="logs/", help="checkpoints go to OUTPUT/PROJECT/ (the seed's --saved_path; default logs/)")
    for alias in ("--saved-path", "--saved_path"):
        p.add_argument(alias, dest="output", help=argparse.SUPPRESS)
    p.add_argument("--log-path", "--log_path", help="CSV log, TensorBoard scalars and --debug pictures go here "
                   "(default: OUTPUT/PROJECT/)")
    p.add_argument("--debug", type=_bool, nargs="?", const=True, default=False,
                   help="at every evaluation, write pictures of the EMA model's detections (red) against the ground "
                        "truth (green) of the first val images to LOG/debug/")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast on CUDA (no loss scaling needed, so clipping sees the true gradients); "
                        "refused on CPU")
    p.add_argument("--force", action="store_true", help="start a new run in an OUTPUT/PROJECT/ that holds one")
    p.add_argument("--workers", "--num_workers", type=int, default=2, help="data loader processes (default 2)")
    add_device(p)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation draws")
    p.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms (bit-equal reruns)")
    p.add_argument("--max-steps", type=int, help="stop (and save) after this many steps in total")
    p.add_argument("--log-interval", type=int, default=10, help=argparse.SUPPRESS)
    return p


def _variant(args) -> str:
    if args.variant:
        return args.variant
    c = 0 if args.compound_coef is None else args.compound_coef
    if not 0 <= c <= 8:
        raise ValueError(f"--compound-coef {c}: expected 0..8")
    return resolve_variant_name("d7x" if c == 8 else f"d{c}")


def build_config(args):
    """The engine's :class:`~training.engine.TrainConfig` from the flags and the project file."""
    name = _variant(args)
    path = Path(args.projects_dir) / f"{args.project}.yml"
    proj = load_project(path)
    anchors = project_anchors(proj, name, str(path))
    train_ann, train_img = dataset_paths(args.data_path, proj, "train_set")
    val = dataset_paths(args.data_path, proj, "val_set")
    out_dir = Path(args.output) / str(proj["project_name"])
    num_gpus = proj.get("num_gpus") or 1
    return TrainConfig(
        variant=name, obj_list=[str(n) for n in proj["obj_list"]], train_annotations=str(train_ann),
        train_images=str(train_img), out_dir=str(out_dir),
        val_annotations=str(val[0]) if val else None, val_images=str(val[1]) if val else None,
        image_size=args.image_size,
        mean_rgb=pixel_scale(proj.get("mean"), ()) or None, stddev_rgb=pixel_scale(proj.get("std"), ()) or None,
        batch_size=args.batch_size, jitter=tuple(args.jitter), lr=args.lr, optim=args.optim, num_epochs=args.num_epochs,
        save_interval=args.save_interval, val_interval=args.val_interval, es_min_delta=args.es_min_delta,
        es_patience=args.es_patience, weights=args.weights, head_only=args.head_only, device=args.device,
        amp=args.amp, workers=args.workers, seed=args.seed, max_steps=args.max_steps, log_path=args.log_path,
        log_interval=args.log_interval, debug=args.debug, force=args.force, deterministic=args.deterministic,
        anchors=anchors, extra={"num_gpus": num_gpus})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    keep_freed_memory()
    if args.amp and not str(args.device).startswith("cuda"):
        return error(PROG, f"--amp needs a CUDA device (--device cuda), not {args.device!r}; on CPU train without --amp",
                     EXIT_USAGE)
    last = None
    try:
        cfg = build_config(args)
        gpus, world = cfg.extra["num_gpus"], dist_info().world_size
        if gpus > 1 and world == 1:
            argv = sys.argv[1:] if argv is None else argv
            return error(PROG, f"{args.project}.yml asks for num_gpus: {gpus}; one process per GPU runs under torchrun: "
                               f"torchrun --nproc-per-node {gpus} -m effdet_cli.train {shlex.join(argv)} "
                               f"(or set num_gpus: 1 to train in this one process)", EXIT_USAGE)
        engine = Engine(cfg, warn=lambda m: print(f"{PROG}: warning: {m}", file=sys.stderr, flush=True))
        if world > 1:
            engine.info(f"{world} processes, global batch {cfg.batch_size} ({engine.local_batch} per process)"
                        + (f"; the project says num_gpus: {gpus}" if gpus != world else ""))
        last = engine.last_path
        engine.fit()
        if world > 1:  # leave together: no process tears the group down under another's last collective
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:  # incl. a loader worker's
        return error(PROG, worker_message(e))
    except KeyboardInterrupt:
        return error(PROG, "interrupted again: stopped without saving" + (f"; last good checkpoint {last}" if last else ""))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
