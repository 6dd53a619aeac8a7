"""``effdet-train``: fine-tune EfficientDet on a COCO-format dataset with the official recipe.

A minimal first version (issue 10 item 1): the seed's project ``.yml`` and dataset layout, official
defaults (Keras SGD momentum 0.9, warm-up + cosine lr scaled to the batch, clipping 10, L2 4e-5 in
the loss, EMA 0.9998, official augmentation and targets), ``--head-only``, ``--weights
PATH|last`` (the seed's ``--load_weights``); every save writes ``last.ckpt`` (model, EMA, optimizer, step, epoch, RNG) and the EMA
weights as ``efficientdet-<variant>_<epoch>_<step>.pth`` (what ``create_model``/``effdet-infer``
load), atomically. Not yet: validation AP, early stopping, logs, AdamW, AMP, multi-GPU, debug
pictures, ``kill -9`` resume proof.

    effdet-train -c 0 -p shape --data-path datasets/ --batch-size 8 --weights efficientdet-d0.pth
"""
from __future__ import annotations

import argparse
import ast
import operator
import sys
import time
from pathlib import Path

from .common import VARIANT_HELP, add_device, add_output, add_weights, error, parse_args, variant_type

PROG = "effdet-train"

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def parse_number_list(text) -> list:
    """The seed's ``anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'`` and
    ``anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'``: numbers, tuples/lists and
    + - * / ** only (no ``eval``)."""
    if not isinstance(text, str):
        return text

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not a number expression: {ast.dump(node)[:60]}")

    return ev(ast.parse(text, mode="eval"))


def load_project(path: Path) -> dict:
    import yaml

    try:
        p = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the project file ({e})") from None
    if not isinstance(p, dict):
        raise ValueError(f"{path}: not a project mapping")
    for key in ("project_name", "train_set", "obj_list"):
        if key not in p:
            raise ValueError(f"{path}: missing {key!r}")
    for key in ("anchors_scales", "anchors_ratios"):
        if key in p:
            p[key] = parse_number_list(p[key])
    return p


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-c", "--compound-coef", "--compound_coef", type=int, help="0-7 (d0..d7), 8 = d7x")
    g.add_argument("--variant", type=variant_type, metavar="NAME", help=VARIANT_HELP)
    p.add_argument("-p", "--project", default="coco", help="projects/NAME.yml in the seed's format")
    p.add_argument("--projects-dir", default="projects", help="folder of the project .yml files")
    p.add_argument("--data-path", "--data_path", default="datasets/", help="holds NAME/{train_set}/ and NAME/annotations/")
    p.add_argument("--image-size", help="network input size (default: the variant's)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=12, help="images per step")
    p.add_argument("--lr", type=float, default=0.08, help="official base lr; used as lr * batch / 64")
    p.add_argument("--num-epochs", "--num_epochs", type=int, default=300)
    p.add_argument("--save-interval", "--save_interval", type=int, default=500, help="save every N steps")
    add_weights(p, required=False, aliases=("--load-weights", "--load_weights"),
                help="a converted .pth, an official checkpoint, or 'last' (resume from SAVED_PATH/PROJECT/); "
                     "the seed's --load_weights works too")
    p.add_argument("--head-only", "--head_only", type=_bool, nargs="?", const=True, default=False,
                   help="train only the class/box heads (backbone and BiFPN frozen)")
    add_output(p, default="logs/", help="checkpoints go to OUTPUT/PROJECT/ (the seed's --saved_path; default logs/)")
    for alias in ("--saved-path", "--saved_path"):
        p.add_argument(alias, dest="output", help=argparse.SUPPRESS)
    p.add_argument("--workers", "--num_workers", type=int, default=2, help="data loader processes")
    add_device(p)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and augmentation draws")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    return p


def _variant(args) -> str:
    from effdet_torch.config import resolve_variant_name

    if args.variant:
        return args.variant
    c = 0 if args.compound_coef is None else args.compound_coef
    if not 0 <= c <= 8:
        raise ValueError(f"--compound-coef {c}: expected 0..8")
    return resolve_variant_name("d7x" if c == 8 else f"d{c}")


def _pixel_scale(values, default) -> list[float]:
    if values is None:
        return list(default)
    values = [float(v) for v in values]
    return [v * 255.0 for v in values] if max(values) <= 1.0 else values


def _save(path: Path, obj) -> None:
    import torch

    from effdet_torch.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
        return error(PROG, str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 0


def _run(args) -> int:
    import warnings

    import torch

    from effdet_torch.anchors import generate_anchors
    from effdet_torch.config import get_config
    from effdet_torch.model import EfficientDet, create_model
    from training.data import CocoTrainDataset, collate
    from training.optim import CosineSchedule, KerasSGD, ModelEma
    from training.step import Trainer
    from training.targets import batch_targets

    name = _variant(args)
    proj = load_project(Path(args.projects_dir) / f"{args.project}.yml")
    obj_list = list(proj["obj_list"])
    cfg = get_config(name, image_size=args.image_size, num_classes=len(obj_list))
    scales = proj.get("anchors_scales")
    if scales is not None and not all(abs(s - 2 ** (i / 3)) < 1e-6 for i, s in enumerate(scales)):
        raise ValueError(f"{args.project}.yml: custom anchors_scales {scales} are not supported yet (official 2^(i/3))")
    # the seed writes mean/std on the 0-1 scale; the official pipeline normalises 0-255 pixels
    mean, std = (_pixel_scale(proj.get(k), d) for k, d in (("mean", cfg.mean_rgb), ("std", cfg.stddev_rgb)))
    root = Path(args.data_path) / proj["project_name"]
    train_set = proj["train_set"]
    ds = CocoTrainDataset(root / "annotations" / f"instances_{train_set}.json", root / train_set, obj_list,
                          cfg.image_size, mean, std, seed=args.seed)
    if ds.dropped:
        warnings.warn(f"{ds.dropped} zero-area or out-of-image box(es) dropped from {train_set}", stacklevel=1)
    out_dir = Path(args.output) / proj["project_name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "last.ckpt"
    torch.manual_seed(args.seed)
    resume = None
    if args.weights == "last":
        if not last.is_file():
            raise FileNotFoundError(f"{last}: no checkpoint to resume")
        resume = torch.load(last, map_location="cpu", weights_only=True)
        model = EfficientDet(cfg)
        model.load_state_dict(resume["model"])
    elif args.weights:
        model = create_model(name, checkpoint=args.weights, num_classes=len(obj_list), image_size=args.image_size)
    else:
        model = EfficientDet(cfg)
    device = torch.device(args.device)
    model.to(device).train()
    if args.head_only:
        for mod in (model.backbone, model.fpn):
            for p in mod.parameters():
                p.requires_grad_(False)
    steps_per_epoch = max(1, len(ds) // args.batch_size)
    schedule = CosineSchedule.official(args.batch_size, steps_per_epoch, args.num_epochs, learning_rate=args.lr)
    opt = KerasSGD([p for p in model.parameters() if p.requires_grad], lr=schedule(0), momentum=0.9)
    ema = ModelEma(model)
    step, epoch = 0, 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        ema.shadow = {k: v.to(device) for k, v in resume["ema"].items()}
        step, epoch = int(resume["step"]), int(resume["epoch"])
        torch.set_rng_state(resume["torch_rng"])
    trainer = Trainer(model, opt, schedule, ema=ema, start_step=step)
    anchors = torch.from_numpy(generate_anchors(cfg)).to(device)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed + epoch))

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema.shadow, "optimizer": opt.state_dict(), "step": trainer.step_count,
                 "epoch": epoch, "torch_rng": torch.get_rng_state(), "variant": name, "obj_list": obj_list}
        _save(last, state)
        _save(out_dir / f"{name}_{epoch}_{trainer.step_count}.pth", ema.state_dict(model))

    t0 = time.time()
    while epoch < args.num_epochs:
        ds.epoch = epoch
        for images, boxes, classes in loader:
            images = images.to(device)
            targets = batch_targets(boxes.to(device), classes.to(device), anchors)
            out = trainer.step(images, targets)
            if trainer.step_count % 10 == 0 or trainer.step_count == 1:
                print(f"epoch {epoch} step {trainer.step_count} loss {out.losses['loss']:.4f} cls "
                      f"{out.losses['cls_loss']:.4f} box {out.losses['box_loss']:.5f} lr {out.losses['learning_rate']:.5f} "
                      f"{trainer.step_count * args.batch_size / max(time.time() - t0, 1e-9):.1f} img/s", flush=True)
            if trainer.step_count % args.save_interval == 0:
                save()
            if args.max_steps and trainer.step_count >= args.max_steps:
                save()
                return 0
        epoch += 1
    save()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
