"""Checkpoints and resume (issue 10 item 2): ``kill -9`` then ``--weights last`` continues bit for bit,
Ctrl+C saves and exits 0, and a failed save never replaces the last good checkpoint.

Expected values come from an uninterrupted run of the same command (same process setup: a fresh
subprocess on the same CPU with the same thread count), never from the resumed run itself.
"""
from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effdet_cli.train import main
from tests.test_train_cli import make_seed_layout

ROOT = Path(__file__).resolve().parents[1]


def _args(root, out, *extra):
    return ["-c", "0", "-p", "shape", "--projects-dir", str(root / "projects"), "--data-path",
            str(root / "datasets"), "--image-size", "64", "--batch-size", "2", "--workers", "0",
            "-o", str(out), "--num-epochs", "20", "--val-interval", "0", *extra]


def _spawn(args):
    # one thread: the same kernels and reduction order in every run, and no oversubscribed cores
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "effdet_cli.train", *args, "--deterministic"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r["loss"]}


def _wait_for_step(log: Path, proc, step: int, timeout: float = 120.0) -> None:
    t0 = time.time()
    while max(_rows(log), default=0) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the run did not reach the step in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    # 8 images, batch 2: 4 steps per epoch; saving every 3 steps puts checkpoints mid-epoch
    return make_seed_layout(tmp_path_factory.mktemp("resume"), num_images=8)[0]


def test_kill_9_then_resume_is_bit_equal(layout, tmp_path):
    killed_out, straight_out = tmp_path / "killed", tmp_path / "straight"
    run = _spawn(_args(layout, killed_out, "--save-interval", "3", "--max-steps", "1000"))
    log = killed_out / "shape" / "train_log.csv"
    _wait_for_step(log, run, 4)  # step 3 was saved, step 4 (and maybe more) is in flight or done
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    ckpt = torch.load(killed_out / "shape" / "last.ckpt", weights_only=True)
    s = ckpt["step"]
    assert s % 3 == 0 and s % 4 != 0, f"checkpoint at step {s} should be mid-epoch"  # resume inside an epoch
    assert ckpt["batch_in_epoch"] == s % 4 and ckpt["epoch"] == s // 4
    for args in (_args(layout, killed_out, "--weights", "last", "--max-steps", str(s + 3)),
                 _args(layout, straight_out, "--max-steps", str(s + 3))):
        p = _spawn(args)  # one after the other: two at once oversubscribe 2 cores
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = _rows(log), _rows(straight_out / "shape" / "train_log.csv")
    # the killed run's rows after step s were dropped from the log on resume and re-logged
    assert sorted(a) == sorted(b) == list(range(1, s + 4))
    # bit-equal on CPU: same data order and augmentation draws (from seed, epoch, index), same
    # weights/momentum/EMA/BN statistics restored exactly, same kernels and one thread -> tolerance 0
    for step in range(s + 1, s + 4):
        for k in ("loss", "cls_loss", "box_loss", "reg_l2_loss", "lr", "gradient_norm"):
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])
    ka = torch.load(killed_out / "shape" / "last.ckpt", weights_only=True)
    kb = torch.load(straight_out / "shape" / "last.ckpt", weights_only=True)
    for part in ("model", "ema"):
        for name, t in kb[part].items():
            assert torch.equal(ka[part][name], t), (part, name)
    ma, mb = ka["optimizer"]["state"], kb["optimizer"]["state"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[i]["momentum"], mb[i]["momentum"]) for i in mb)
    assert (ka["step"], ka["epoch"], ka["batch_in_epoch"]) == (kb["step"], kb["epoch"], kb["batch_in_epoch"])


def test_ctrl_c_saves_and_exits_0(layout, tmp_path):
    run = _spawn(_args(layout, tmp_path, "--max-steps", "1000", "--save-interval", "1000"))
    log = tmp_path / "shape" / "train_log.csv"
    _wait_for_step(log, run, 2)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "interrupted: saved" in out
    ckpt = torch.load(tmp_path / "shape" / "last.ckpt", weights_only=True)
    # the state saved is the one after the last logged step: nothing trained is lost
    assert ckpt["step"] == max(_rows(log)) >= 2
    assert len(list((tmp_path / "shape").glob(f"efficientdet-d0_*_{ckpt['step']}.pth"))) == 1


def test_failed_save_keeps_the_last_good_checkpoint(layout, tmp_path, monkeypatch, capsys):
    assert main(_args(layout, tmp_path, "--max-steps", "2")) == 0
    run_dir = tmp_path / "shape"
    last = run_dir / "last.ckpt"
    good = hashlib.sha256(last.read_bytes()).hexdigest()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):  # writes part of the file, then the disk is "full"
        real_save({"partial": torch.zeros(10)}, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    capsys.readouterr()
    assert main(_args(layout, tmp_path, "--weights", "last", "--max-steps", "3")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("effdet-train: error:") and "No space left" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == good
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("*_3.pth"))
    assert torch.load(last, weights_only=True)["step"] == 2
