"""``torchrun --nproc-per-node 2 -m effdet_cli.train`` (gloo, CPU): DistributedDataParallel with
SyncBatchNorm takes the same steps as one process on the same global batch.

The one-process reference is computed here, in float32 and in float64, from the same engine the CLI
builds (same seed, data, augmentation draws). The allowed difference is the measured fp32 noise of
that reference (|fp32 − fp64| of each logged value) times 4, with a floor of 8 float32 ulps of the
value: the two runs differ only in summation order (per-process partial sums, all-reduced BN
statistics, one thread per process), which is rounding of the same size as fp32 vs fp64. A real
mistake is far larger; the test shows that per-process (unsynchronised) BN statistics alone would
already miss the step-1 loss by more than 10× the allowance.
"""
from __future__ import annotations

import copy
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.shapes import make_shapes_project
from effdet_cli.train import build_config, build_parser
from training.data import collate
from training.engine import Engine
from training.optim import KerasSGD
from training.step import Trainer
from training.targets import batch_targets

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
STEPS = 2
LOGGED = ("loss", "cls_loss", "box_loss", "reg_l2_loss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root: Path, out: str) -> list[str]:
    return ["-c", "0", "-p", "shapes", "--projects-dir", str(root / "projects"), "--data-path", str(root / "datasets"),
            "--image-size", "64", "--batch-size", "4", "--max-steps", str(STEPS), "--val-interval", "0",
            "--workers", "0", "--jitter", "1", "1", "-o", str(root / out)]


def _state_errors(got: dict, ref: dict) -> dict[str, float]:
    """‖got − ref‖₂ per kind of tensor (conv/BN weights, biases, BN moving means, moving variances).

    Whole-kind norms, not per-tensor ratios: some tensors are zero in exact arithmetic (e.g. the
    bias of a BN whose output only feeds another BN gets a zero gradient), so only rounding moves them.
    """
    sq: dict[str, float] = {}
    for k, v in ref.items():
        if v.is_floating_point():
            kind = k.rsplit(".", 1)[-1]
            sq[kind] = sq.get(kind, 0.0) + float(((got[k].double() - v.double()) ** 2).sum())
    return {kind: s ** 0.5 for kind, s in sq.items()}


class Reference:
    """The one-process steps from the engine the CLI builds: float32 with ``threads`` threads (summation
    order differs with the thread count), float64, and the step-1 loss with per-process BN statistics."""

    def __init__(self, root: Path, threads: int, float64: bool = False) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self._run(root, float64)
        finally:
            torch.set_num_threads(before)

    def _run(self, root: Path, float64: bool) -> None:
        cfg = build_config(build_parser().parse_args(_args(root, "reference")))
        cfg.force = True
        eng = Engine(cfg, warn=lambda m: None, info=lambda m: None)
        batches = []
        for epoch in range(STEPS):  # 4 images, batch 4: one step per epoch
            eng.train_set.epoch = epoch
            images, boxes, classes = collate([eng.train_set[i] for i in eng.epoch_batches(epoch)[0]])
            batches.append((images.contiguous(memory_format=torch.channels_last),
                            batch_targets(boxes, classes, eng.anchors)))
        trainer, model = eng.trainer, eng.model
        if float64:
            model = copy.deepcopy(eng.model).double()
            trainer = Trainer(model, KerasSGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9),
                              eng.schedule, loss_cfg=eng.trainer.loss_cfg)
            batches = [(im.double(), type(t)(t.cls, t.box.double(), t.matches, t.num_positives)) for im, t in batches]
        # two processes that did NOT share BN statistics: each half normalised by its own slice
        unsynced = copy.deepcopy(model)
        images, tg = batches[0]
        total_pos = float(tg.num_positives.sum()) + 1.0
        self.unsynced_loss = 0.0
        for sl in (slice(0, 2), slice(2, 4)):
            sub = type(tg)(tg.cls[sl], tg.box[sl], tg.matches[sl], tg.num_positives[sl])
            losses, _, _ = Trainer(unsynced, trainer.optimizer, eng.schedule, loss_cfg=eng.trainer.loss_cfg
                                   ).forward_loss(images[sl], sub)
            # the global normaliser (positives of the whole batch + 1), as the real run uses
            self.unsynced_loss += float(losses["det_loss"].detach()) * (float(sub.num_positives.sum()) + 1.0) / total_pos
        self.unsynced_loss += float(losses["reg_l2_loss"].detach())
        self.losses = {step: trainer.step(images, tg).losses for step, (images, tg) in enumerate(batches, start=1)}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_processes_take_the_one_process_step(tmp_path):
    root = make_shapes_project(tmp_path, num_train=4, num_val=0, size=64)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(_free_port()), "-m", "effdet_cli.train",
                        *_args(root, "two")], capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
    assert p.stdout.count("max-steps: step 2") == 1, "process 0 alone reports"
    assert "2 processes, global batch 4 (2 per process)" in p.stdout
    with open(root / "two" / "shapes" / "train_log.csv", newline="") as f:
        two = {int(r["step"]): {k: float(r[k]) for k in LOGGED} for r in csv.DictReader(f)}
    assert sorted(two) == list(range(1, STEPS + 1)), "process 0 alone logs, one row per step"
    ckpt = torch.load(root / "two" / "shapes" / "last.ckpt", weights_only=True)
    assert ckpt["step"] == STEPS and len(ckpt["rng_by_rank"]) == 2

    exact = Reference(root, 1, float64=True)
    f32 = [Reference(root, 1), Reference(root, 2)]
    for step in range(1, STEPS + 1):
        # fp32 noise of this step: the largest relative distance of a one-process fp32 value from fp64
        rel = max(abs(r.losses[step][k] - exact.losses[step][k]) / abs(exact.losses[step][k]) for r in f32 for k in LOGGED)
        for k in LOGGED:
            ref = exact.losses[step][k]
            allow = max(4 * rel * abs(ref), 8 * float(np.spacing(np.float32(abs(ref)))))
            err = abs(two[step][k] - ref)
            assert err <= allow, f"step {step} {k}: 2 processes {two[step][k]!r}, exact one-process {ref!r} " \
                                 f"(fp32 noise {rel:.2e} relative, allowed {allow:.2e})"
            if step == 1 and k == "loss":
                step1_allow = allow
    # the rule sees a real mistake: unsynchronised BN statistics move the step-1 loss by far more
    assert abs(exact.unsynced_loss - exact.losses[1]["loss"]) > 100 * step1_allow

    # after 2 steps the weights and BN moving statistics are the one-process ones, as close to exact as fp32 runs are
    noise = [_state_errors(r.state, exact.state) for r in f32]
    for kind, err in _state_errors(ckpt["model"], exact.state).items():
        allow = 4 * max(n[kind] for n in noise)
        assert err <= allow, f"{kind}: ‖2 processes − exact‖ {err:.2e}, fp32 one-process noise x4 {allow:.2e}"


def test_num_gpus_outside_torchrun_names_the_command(tmp_path, capsys, monkeypatch):
    from effdet_cli.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root = make_shapes_project(tmp_path, num_train=2, num_val=0, size=64)
    yml = root / "projects" / "shapes.yml"
    yml.write_text(yml.read_text().replace("num_gpus: 1", "num_gpus: 4"))
    args = _args(root, "out")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effdet-train: error: shapes.yml asks for num_gpus: 4")
    assert "torchrun --nproc-per-node 4 -m effdet_cli.train -c 0 -p shapes" in err and "num_gpus: 1" in err
    assert not (root / "out").exists(), "nothing written"
