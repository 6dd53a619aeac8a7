"""Training: val AP against wall time, our trainer beside the `effdet` package's, in the same run.

    python benchmarks/bench_train.py [--size 128] [--train 64] [--val 16] [--batch 8] [--steps 600]
                                     [--eval-every 100] [--json out.json]

Data: a generated shapes project (``fixtures.shapes``: 3 classes on textured backgrounds, COCO
format, the seed's layout), the same for both trainers. Each trainer gets the same batches (our
loader: the official augmentation, jitter 0.1–2.0 and flips, images normalised by the official
mean/std) for the same number of steps, and is scored on the val images every ``--eval-every`` steps
through the same COCO evaluation (pycocotools). The two runs are interleaved, ``--eval-every`` steps
each in turn, so load that drifts during the run hits both alike; wall time counts training steps
only (data loading included, evaluation excluded).

- ours: ``training.engine.Engine`` (the ``effdet-train`` loop) on d0 starting from the synthetic-rule
  weights (``fixtures.synth_ckpt``, an official-format checkpoint; the class head is reset to 3
  classes), official targets/loss/clipping/EMA, ``--optim`` as given (default adamw: the seed's
  optimiser, lr 2e-3 here for a short run), scored with its EMA weights;
- effdet: ``effdet.DetBenchTrain`` (its anchor labeler and loss) on ``tf_efficientdet_d0`` from its own
  initialisation (it cannot read the official-format checkpoint), torch AdamW with the same lr values
  per step (our warm-up + cosine schedule), weight decay 0.01, gradient norm clipped to 10 (its
  train script's default), scored with its raw weights through ``DetBenchPredict`` (its own
  post-processing).

Reports per evaluation the steps, seconds of training and AP of both, and the time each needed to first
reach the AP levels both reached (ratio ours / effdet). Needs ``pip install effdet`` (the ``bench``
extra); without it only our rows are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.coco import CocoEvalImages, evaluate_coco, rows_to_array
from fixtures.shapes import SHAPE_CLASSES, make_shapes_project
from fixtures.synth_ckpt import write_synth_checkpoint
from training.data import collate
from training.engine import Engine, TrainConfig
from training.targets import batch_targets


def _ours(root: Path, args, ckpt: str) -> Engine:
    d = root / "datasets" / "shapes"
    cfg = TrainConfig(variant="d0", obj_list=list(SHAPE_CLASSES), train_annotations=str(d / "annotations" / "instances_train.json"),
                      train_images=str(d / "train"), out_dir=str(root / "ours"),
                      val_annotations=str(d / "annotations" / "instances_val.json"), val_images=str(d / "val"),
                      image_size=args.size, batch_size=args.batch, lr=args.lr, optim=args.optim,
                      num_epochs=max(1, -(-args.steps * args.batch // args.train)), save_interval=10 ** 9,
                      val_interval=10 ** 9, weights=ckpt, workers=0, seed=args.seed, progress=False, force=True)
    return Engine(cfg, warn=lambda m: None, info=lambda m: None)


class EffdetTrainer:
    """The effdet package's model, labeler and loss, stepped on our batches."""

    def __init__(self, eng: Engine, args) -> None:
        from effdet import DetBenchPredict, DetBenchTrain, create_model

        torch.manual_seed(args.seed)
        net = create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False, num_classes=len(SHAPE_CLASSES),
                           image_size=(args.size, args.size))
        self.bench = DetBenchTrain(net).train()
        self.predict = DetBenchPredict(net)
        self.opt = torch.optim.AdamW(net.parameters(), lr=eng.schedule(0), weight_decay=0.01)
        self.schedule = eng.schedule
        self.step = 0

    def train_step(self, images, boxes, classes) -> float:
        for g in self.opt.param_groups:
            g["lr"] = self.schedule(self.step)
        self.bench.train()
        out = self.bench(images, {"bbox": boxes, "cls": classes})
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.bench.parameters(), 10.0)
        self.opt.step()
        self.step += 1
        return float(out["loss"])

    @torch.no_grad()
    def evaluate(self, val: CocoEvalImages, doc: dict, cat_map: np.ndarray) -> float:
        self.predict.eval()
        rows = []
        for k in range(len(val)):
            _, image_id, x, scale = val[k]
            det = self.predict(x[None], img_info={"img_scale": scale.reshape(1), "img_size": torch.tensor([[1e9, 1e9]])})[0]
            det = det[det[:, 4] > 0].numpy()  # [x1, y1, x2, y2, score, class] in original pixels
            rows.append(rows_to_array(image_id, det[:, [1, 0, 3, 2]], det[:, 4], det[:, 5]))
        stats, _, _ = evaluate_coco(doc, np.concatenate(rows), cat_map, val.image_ids, verbose=False)
        return float(stats[0])


def _batches(eng: Engine):
    """Our loader's batches, epoch after epoch (the same ones both trainers get)."""
    epoch = 0
    while True:
        eng.train_set.epoch = epoch
        for idx in eng.epoch_batches(epoch):
            yield collate([eng.train_set[i] for i in idx])
        epoch += 1


def _time_to(curve: list[dict], key: str, level: float) -> float | None:
    return next((r[f"{key}_s"] for r in curve if r[f"{key}_ap"] >= level), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--val", type=int, default=16, help="val images")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--optim", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the curves here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = make_shapes_project(Path(tmp), num_train=args.train, num_val=args.val, size=args.size, seed=args.seed)
        bn = Path(__file__).resolve().parents[1] / "golden" / "bn_stats" / "efficientdet-d0.npz"
        ckpt = write_synth_checkpoint("efficientdet-d0", Path(tmp) / "ckpt", bn_stats_path=bn, progress=False)
        eng = _ours(root, args, str(ckpt))
        try:
            base = EffdetTrainer(eng, args)
        except ImportError:
            base = None
            print("effdet is not installed (pip install effdet): our rows only", file=sys.stderr)
        ours_batches, base_batches = _batches(eng), _batches(eng)
        curve, t_ours, t_base = [], 0.0, 0.0
        for done in range(args.eval_every, args.steps + 1, args.eval_every):
            t = time.perf_counter()
            for _ in range(args.eval_every):
                images, boxes, classes = next(ours_batches)
                eng.trainer.step(images.contiguous(memory_format=torch.channels_last),
                                 batch_targets(boxes, classes, eng.anchors))
            t_ours += time.perf_counter() - t
            row = {"step": done, "ours_s": round(t_ours, 2), "ours_ap": float(eng.evaluate()[0])}
            if base is not None:
                t = time.perf_counter()
                for _ in range(args.eval_every):
                    base.train_step(*next(base_batches))
                t_base += time.perf_counter() - t
                row.update(effdet_s=round(t_base, 2), effdet_ap=base.evaluate(eng.val_set, eng.val_doc, eng.cat_map))
            curve.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nd0 at {args.size}x{args.size}, batch {args.batch}, {args.train} train / {args.val} val shapes images, "
          f"{args.optim} lr {args.lr}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'step':>6} {'ours s':>8} {'ours AP':>8}" + (f" {'effdet s':>9} {'effdet AP':>9}" if base else ""))
    for r in curve:
        print(f"{r['step']:>6} {r['ours_s']:>8.1f} {r['ours_ap']:>8.3f}"
              + (f" {r['effdet_s']:>9.1f} {r['effdet_ap']:>9.3f}" if base else ""))
    summary = {"args": vars(args), "curve": curve, "time_to_ap": []}
    if base is not None:
        top = min(max(r["ours_ap"] for r in curve), max(r["effdet_ap"] for r in curve))
        for level in sorted({round(top * f, 3) for f in (0.5, 0.75, 1.0)} - {0.0}):
            a, b = _time_to(curve, "ours", level), _time_to(curve, "effdet", level)
            summary["time_to_ap"].append({"ap": level, "ours_s": a, "effdet_s": b, "ratio": a / b if a and b else None})
            fmt = lambda v: "not reached" if v is None else f"{v:.1f} s"  # noqa: E731
            print(f"time to AP {level:.3f}: ours {fmt(a)}, effdet {fmt(b)}"
                  + (f", ratio {a / b:.2f}" if a and b else ""))
        print(f"seconds per step: ours {t_ours / args.steps:.3f}, effdet {t_base / args.steps:.3f}, "
              f"ratio {t_ours / t_base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
