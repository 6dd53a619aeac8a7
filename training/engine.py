"""The training loop of ``effdet-train``: build from a :class:`TrainConfig`, :meth:`Engine.fit`,
:meth:`Engine.save`, :meth:`Engine.resume`.

What one run does (defaults = the official recipe, see :mod:`training.step` / :mod:`training.optim`):
- data: :class:`~training.data.CocoTrainDataset`; the order of an epoch is a permutation drawn
  from ``(seed, epoch)`` alone, and each sample's augmentation draws from ``(seed, epoch, index)``
  alone, so "where we are in the data" is ``(epoch, batch index in the epoch)`` — a resumed run
  continues with exactly the batches the uninterrupted run would have seen;
- every ``save_interval`` steps and when the run ends (finished, ``max_steps``, early stop, Ctrl+C)
  :meth:`save` writes ``last.ckpt`` (raw model, EMA shadows, optimizer, schedule, step, epoch, the
  data position, RNG states of torch/CUDA/numpy/python, best AP and early-stopping state) and the
  EMA weights as ``<variant>_<epoch>_<step>.pth`` (the epoch the step ran in) together with :func:`~effdet_torch.files.atomic_write_many`:
  a crash or ``kill -9`` leaves the previous pair or the new pair, never a partial file;
- every ``val_interval`` epochs: COCO AP of the EMA weights on the val set through the evaluation
  path (:func:`evaluation.evaluate.run_eval` + :func:`evaluation.coco.evaluate_coco`), the best as
  ``best.pth``; early stopping after ``es_patience`` evaluations without an AP gain above ``es_min_delta``;
- logs: ``LOG/train_log.csv`` (a row per step and per evaluation, with the AP of each class as
  ``AP_/<name>`` columns), TensorBoard scalars under
  ``LOG/tensorboard/`` when ``torch.utils.tensorboard`` imports, a tqdm bar on a terminal (a plain
  line every ``log_interval`` steps otherwise), ``--debug`` pictures under ``LOG/debug/``;
- Ctrl+C: the step in flight finishes, the state is saved, :meth:`fit` returns ``"interrupted"``;
- under ``torchrun`` (``WORLD_SIZE > 1``): ``batch_size`` is the global batch, each process takes
  its equal slice of every batch, the model runs as ``DistributedDataParallel`` with
  :class:`~training.distributed.SyncBatchNorm2d` (one step = the one-process step on the global
  batch, :mod:`training.distributed`); process 0 alone writes checkpoints and logs and evaluates.
"""
from __future__ import annotations

import copy
import csv
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from effdet_torch.anchors import generate_anchors
from effdet_torch.config import AnchorConfig, get_config
from effdet_torch.checkpoint import RECORD_KEY, model_record, torch_writer, weights_writer
from effdet_torch.files import atomic_write, atomic_write_many
from effdet_torch.model import EfficientDet, load_pretrained
from evaluation.coco import (CocoEvalImages, ap_per_class, check_scorable, evaluate_coco, load_annotations,
                             read_image_rgb)
from evaluation.evaluate import broadcast_from_rank0, gather_to_rank0, init_distributed, run_eval

from .data import CocoTrainDataset, collate
from .debug import draw_debug_picture
from .distributed import any_rank, convert_sync_batchnorm
from .loss import LossConfig
from .optim import CosineSchedule, KerasSGD, ModelEma
from .step import Trainer
from .targets import batch_targets

__all__ = ["TrainConfig", "Engine", "CHECKPOINT_FORMAT", "CSV_FIELDS"]

CHECKPOINT_FORMAT = "effdet-train/1"
CSV_FIELDS = ("step", "epoch", "loss", "cls_loss", "box_loss", "reg_l2_loss", "lr", "gradient_norm",
              "images_per_s", "val_ap", "val_ap50")
#: the seed's AdamW learning rate (not batch-scaled); SGD uses the official 0.08 · batch / 64
ADAMW_LR = 1e-4
ADAMW_WEIGHT_DECAY = 0.01  # torch's (and the seed's) AdamW default, decoupled; replaces the in-loss L2


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI fills it from its flags. Defaults: the official recipe."""

    variant: str
    obj_list: list[str]
    train_annotations: str
    train_images: str
    out_dir: str
    val_annotations: str | None = None
    val_images: str | None = None
    image_size: int | str | Sequence[int] | None = None
    mean_rgb: Sequence[float] | None = None  # 0-255 scale; None: the variant's
    stddev_rgb: Sequence[float] | None = None
    batch_size: int = 12
    jitter: tuple[float, float] = (0.1, 2.0)  # official jitter_min, jitter_max: random scale of the output size
    lr: float | None = None  # sgd: base lr used as lr · batch / 64 (official 0.08); adamw: as given (1e-4)
    optim: str = "sgd"
    num_epochs: int = 300
    save_interval: int = 500
    val_interval: int = 1
    es_min_delta: float = 0.0
    es_patience: int = 0
    weights: str | None = None  # a checkpoint to start from, or "last" (resume)
    head_only: bool = False
    device: str = "cpu"
    amp: bool = False
    workers: int = 2
    seed: int = 0
    max_steps: int | None = None
    log_path: str | None = None  # default: out_dir
    log_interval: int = 10
    debug: bool = False
    debug_images: int = 4
    force: bool = False
    deterministic: bool = False
    progress: bool | None = None  # None: a tqdm bar when stderr is a terminal
    anchors: AnchorConfig | None = None  # the project's anchors; None: the variant's official ones
    extra: dict = field(default_factory=dict)


def _out(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Engine:
    """``Engine(cfg).fit()`` → ``"done"``, ``"max-steps"``, ``"early-stopped"`` or ``"interrupted"``.

    Raises ``ValueError``/``FileNotFoundError``/``OSError`` for bad input (one-line messages),
    ``FloatingPointError`` for a non-finite loss (naming the step, the loss parts and the last good
    checkpoint). ``warn``/``info`` receive one-line messages (default: stderr/stdout).
    """

    def __init__(self, cfg: TrainConfig, warn: Callable[[str], None] = _warn, info: Callable[[str], None] = _out) -> None:
        self.cfg, self.warn, self.info = cfg, warn, info
        if cfg.optim not in ("sgd", "adamw"):
            raise ValueError(f"optimizer {cfg.optim!r}: expected sgd or adamw")
        if cfg.batch_size < 1 or cfg.num_epochs < 1 or cfg.save_interval < 1 or cfg.val_interval < 0:
            raise ValueError("batch size, epochs and save interval must be >= 1, val interval >= 0")
        self.dist = init_distributed(cfg.device)
        self.is_main = self.dist.is_main
        if self.dist.enabled and cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch size {cfg.batch_size} is the global batch: it must be a multiple of the "
                             f"{self.dist.world_size} processes")
        self.local_batch = cfg.batch_size // self.dist.world_size
        device = cfg.device
        if self.dist.enabled and device == "cuda":  # one GPU per process
            device = f"cuda:{self.dist.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        if not self.is_main:  # one voice: process 0 prints and writes
            self.info = self.warn = lambda msg: None
        if cfg.amp and self.device.type != "cuda":
            raise ValueError("--amp needs a CUDA device (bfloat16 autocast); on CPU train in float32")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.out_dir = Path(cfg.out_dir)
        self.log_dir = Path(cfg.log_path) if cfg.log_path else self.out_dir
        self.last_path = self.out_dir / "last.ckpt"
        self.best_path = self.out_dir / "best.pth"
        self.csv_path = self.log_dir / "train_log.csv"
        resuming = cfg.weights == "last"
        self._check_run_dir(resuming)
        if self.is_main:
            for d in {self.out_dir, self.log_dir}:
                _check_writable(d)

        # data
        self.obj_list = list(cfg.obj_list)
        self.model_cfg = get_config(cfg.variant, image_size=cfg.image_size, anchors=cfg.anchors,
                                    class_names=self.obj_list)
        self.mean = list(cfg.mean_rgb or self.model_cfg.mean_rgb)
        self.std = list(cfg.stddev_rgb or self.model_cfg.stddev_rgb)
        if not 0 < cfg.jitter[0] <= cfg.jitter[1]:
            raise ValueError(f"jitter {cfg.jitter}: expected 0 < min <= max (official 0.1, 2.0)")
        self.train_set = CocoTrainDataset(cfg.train_annotations, cfg.train_images, self.obj_list,
                                          self.model_cfg.image_size, self.mean, self.std,
                                          jitter=tuple(cfg.jitter), seed=cfg.seed)
        ds = self.train_set
        if ds.dropped or ds.clipped or ds.orphans:
            self.warn(f"{cfg.train_annotations}: {ds.dropped} zero-area, non-finite or out-of-image box(es) dropped, "
                      f"{ds.clipped} clipped to the image, {ds.orphans} annotation(s) of unknown images ignored")
        self.steps_per_epoch = len(ds) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the {len(ds)} training image(s)")
        self.val_doc = self.val_set = None
        if cfg.val_interval and cfg.val_annotations:
            if Path(cfg.val_annotations).is_file():
                self.val_doc = load_annotations(cfg.val_annotations)
                check_scorable(self.val_doc, str(cfg.val_annotations))
                # validates the val set now (bad input fails before the first step, not after an epoch)
                CocoTrainDataset(self.val_doc, cfg.val_images, self.obj_list, self.model_cfg.image_size, self.mean,
                                 self.std)
                self.val_set = CocoEvalImages(self.val_doc, cfg.val_images, self.model_cfg.image_size, self.mean, self.std)
            else:
                self.warn(f"{cfg.val_annotations} not found: no validation AP during training")
        # model class i (1-based) = obj_list[i-1] -> the val file's category id of that name
        self.cat_map = None
        if self.val_doc is not None:
            by_name = {c["name"]: int(c["id"]) for c in self.val_doc.get("categories", [])}
            self.cat_map = np.array([-1] + [by_name.get(n, -1) for n in self.obj_list], np.int64)

        # model, optimizer, schedule, EMA
        _seed_everything(cfg.seed)
        ckpt = self._read_checkpoint(self.last_path) if resuming else None
        model = EfficientDet(self.model_cfg)
        if cfg.weights and not resuming:
            for note in load_pretrained(model, cfg.weights):  # predictors another class/anchor count changes: reset
                self.warn(note)
        if self.dist.enabled:
            convert_sync_batchnorm(model)
        # one memory format for every run (fresh, from weights, resumed), so resumed steps are bit-equal
        self.model = model.to(self.device).to(memory_format=torch.channels_last).train()
        if cfg.head_only:
            for mod in (self.model.backbone, self.model.fpn):
                for p in mod.parameters():
                    p.requires_grad_(False)
        module = self.model
        if self.dist.enabled:  # parameters and buffers broadcast from process 0 once; SyncBN keeps the buffers equal
            module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False)
            torch.manual_seed(cfg.seed + self.dist.rank)  # drop-connect draws differ per slice
        params = [p for p in self.model.parameters() if p.requires_grad]
        b, spe = cfg.batch_size, self.steps_per_epoch
        if cfg.optim == "sgd":
            self.schedule = CosineSchedule.official(b, spe, cfg.num_epochs, learning_rate=0.08 if cfg.lr is None else cfg.lr)
            self.optimizer = KerasSGD(params, lr=self.schedule(0), momentum=0.9)
            loss_cfg = LossConfig()
        else:
            lr = ADAMW_LR if cfg.lr is None else cfg.lr
            self.schedule = CosineSchedule(lr, lr / 10.0, spe, spe * cfg.num_epochs)
            self.optimizer = torch.optim.AdamW(params, lr=self.schedule(0), weight_decay=ADAMW_WEIGHT_DECAY)
            loss_cfg = LossConfig(weight_decay=0.0)
        self.ema = ModelEma(self.model)
        self.trainer = Trainer(self.model, self.optimizer, self.schedule, loss_cfg=loss_cfg, ema=self.ema, module=module)
        if cfg.amp:  # the heads' outputs back to float32, so the loss is computed in float32
            self.model.register_forward_hook(
                lambda m, i, o: ([c.float() for c in o[0]], [x.float() for x in o[1]]) if torch.is_autocast_enabled() else o)
        self.anchors = torch.from_numpy(generate_anchors(self.model_cfg)).to(self.device)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_ap: float | None = None
        self.best_step = -1
        self.evals_since_best = 0
        self.last_good: tuple[Path, int] | None = None
        self._stop_requested = False
        self._hard_stop = False
        self._critical = False
        if ckpt is not None:
            self.resume(ckpt)
        self._tb = None
        if self.is_main:
            self._csv_start(truncate_after=self.step if ckpt is not None else None)
            self._tb = _tensorboard(self.log_dir / "tensorboard")

    # ------------------------------------------------------------------ state
    @property
    def step(self) -> int:
        return self.trainer.step_count

    def _check_run_dir(self, resuming: bool) -> None:
        if resuming or self.cfg.force or not self.out_dir.is_dir():
            return
        used = [p.name for p in (self.last_path, self.best_path, self.out_dir / "train_log.csv") if p.exists()]
        used += [p.name for p in self.out_dir.glob(f"{self.cfg.variant}_*_*.pth")][:1]
        if used:
            raise ValueError(f"{self.out_dir} already holds a run ({', '.join(used)}): resume it with --weights last, "
                             f"or start over with --force")

    def _read_checkpoint(self, path: Path) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume (--weights last)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one message
            raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not an effdet-train checkpoint ({CHECKPOINT_FORMAT})")
        mine = {"variant": self.cfg.variant, "obj_list": self.obj_list,
                "image_size": list(self.model_cfg.image_size), "optim": self.cfg.optim,
                "anchors": self.model_cfg.anchors.to_dict()}
        for k, v in mine.items():
            # runs saved before anchors were recorded trained with the official ones
            theirs = ckpt.get(k, get_config(self.cfg.variant).anchors.to_dict() if k == "anchors" else None)
            if theirs != v:
                if k == "anchors":
                    raise ValueError(f"{path}: the run was trained with anchors {AnchorConfig.from_dict(theirs).describe()}, "
                                     f"not {self.model_cfg.anchors.describe()}; resume with the same anchors")
                raise ValueError(f"{path}: the run was trained with {k} {ckpt[k]!r}, not {v!r}; resume with the same setting")
        for k in ("batch_size", "num_epochs", "lr", "seed", "head_only"):
            if ckpt["config"].get(k) != getattr(self.cfg, k):
                self.warn(f"{path}: {k} was {ckpt['config'].get(k)!r}, now {getattr(self.cfg, k)!r}: "
                          f"the resumed run is not the continuation of the original one")
        return ckpt

    def state_dict(self) -> dict:
        """The whole training state: what :meth:`resume` needs to continue bit for bit."""
        return {
            "format": CHECKPOINT_FORMAT, "variant": self.cfg.variant, "obj_list": self.obj_list,
            "image_size": list(self.model_cfg.image_size), "optim": self.cfg.optim,
            "anchors": self.model_cfg.anchors.to_dict(), RECORD_KEY: model_record(self.model_cfg),
            "config": {k: v for k, v in asdict(self.cfg).items() if isinstance(v, (int, float, str, bool, type(None)))},
            "model": self.model.state_dict(), "ema": self.ema.shadow, "optimizer": self.optimizer.state_dict(),
            "schedule": asdict(self.schedule), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "steps_per_epoch": self.steps_per_epoch,
            "best_ap": self.best_ap, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
            "rng": _rng_state(), "rng_by_rank": gather_to_rank0(_rng_state()) if self.dist.enabled else None,
        }

    def resume(self, ckpt: dict | str | os.PathLike) -> None:
        """Load a :meth:`state_dict` (or the file holding one) into this engine."""
        if not isinstance(ckpt, dict):
            ckpt = self._read_checkpoint(Path(ckpt))
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.ema.shadow = {k: v.to(self.device) for k, v in ckpt["ema"].items()}
        self.trainer.step_count = int(ckpt["step"])
        self.epoch, self.batch_in_epoch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        if int(ckpt["steps_per_epoch"]) != self.steps_per_epoch:
            self.warn(f"steps per epoch changed ({ckpt['steps_per_epoch']} -> {self.steps_per_epoch}): "
                      f"the resumed run starts the next epoch at its first batch")
            self.batch_in_epoch = min(self.batch_in_epoch, self.steps_per_epoch)
        self.best_ap, self.best_step = ckpt["best_ap"], int(ckpt["best_step"])
        self.evals_since_best = int(ckpt["evals_since_best"])
        by_rank = ckpt.get("rng_by_rank")
        if by_rank and len(by_rank) == self.dist.world_size:
            _set_rng_state(by_rank[self.dist.rank])
        else:
            if self.dist.rank or by_rank:
                self.warn(f"the run was saved by {len(by_rank or [0])} process(es), now {self.dist.world_size}: "
                          f"random draws (drop-connect) do not continue as they would have")
            _set_rng_state(ckpt["rng"])
        self.last_good = (self.last_path, self.step)
        self.info(f"resumed {self.last_path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def save(self) -> Path:
        """``last.ckpt`` + the EMA ``.pth`` of this step, atomically together; returns the ``.pth``."""
        state = self.state_dict()  # every process: it gathers their RNG states
        if not self.is_main:
            return self.out_dir / "last.ckpt"
        # named (as the seed does) after the epoch the last step ran in, 0-based
        ran_in = self.epoch - 1 if self.batch_in_epoch == 0 and self.step > 0 else self.epoch
        weights = self.out_dir / f"{self.cfg.variant}_{ran_in}_{self.step}.pth"
        ema_weights = self.ema.state_dict(self.model)
        was = self._critical
        self._critical = True  # a Ctrl+C waits for the renames (the files are consistent either way)
        try:
            atomic_write_many([(self.last_path, torch_writer(state)),
                               (weights, weights_writer(ema_weights, self.model_cfg, weights))])
        finally:
            self._critical = was
        self.last_good = (self.last_path, self.step)
        return weights

    # ------------------------------------------------------------------ the loop
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's sample indices of every step of ``epoch`` (drawn from ``(seed, epoch)`` alone)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        b, lb, r = self.cfg.batch_size, self.local_batch, self.dist.rank
        return [perm[i * b + r * lb:i * b + (r + 1) * lb] for i in range(self.steps_per_epoch)]

    def fit(self) -> str:
        handler_installed = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            handler_installed = True
        try:
            return self._fit()
        except KeyboardInterrupt:
            if self._hard_stop:  # a second Ctrl+C: no save (the last good checkpoint stays as it is)
                raise
            self.save()
            self.info(f"interrupted: saved {self.last_path} at step {self.step}")
            return "interrupted"
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
            if self._tb is not None:
                self._tb.flush()

    def _on_sigint(self, signum, frame) -> None:  # noqa: ARG002
        if self.dist.enabled and not self._stop_requested:
            # every process stops at the same step (they agree after each one), so never mid-step
            self._stop_requested = True
            self.warn("interrupted: saving after the current step (press Ctrl+C again to stop without saving)")
            return
        if self._stop_requested or not self._critical:
            self._hard_stop = self._stop_requested
            self._stop_requested = True
            raise KeyboardInterrupt
        self._stop_requested = True  # the step in flight finishes, then the loop saves and stops
        self.warn("interrupted: saving after the current step (press Ctrl+C again to stop without saving)")

    def _fit(self) -> str:
        cfg = self.cfg
        bar = None
        t_last = time.perf_counter()
        while self.epoch < cfg.num_epochs:
            self.train_set.epoch = self.epoch
            batches = self.epoch_batches(self.epoch)[self.batch_in_epoch:]
            loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=batches, num_workers=cfg.workers,
                                                 collate_fn=collate, generator=torch.Generator(),
                                                 pin_memory=self.device.type == "cuda")
            bar = self._bar(bar)
            for images, boxes, classes in loader:
                if cfg.max_steps and self.step >= cfg.max_steps:
                    return self._finish("max-steps", bar)
                images = images.to(self.device, non_blocking=True)
                targets = batch_targets(boxes.to(self.device), classes.to(self.device), self.anchors)
                self._critical = True
                try:
                    out = self._train_step(images, targets)
                    self.batch_in_epoch += 1
                finally:
                    self._critical = False
                now = time.perf_counter()
                ips = images.shape[0] / max(now - t_last, 1e-9)
                t_last = now
                self._log_step(out.losses, ips, bar)
                if self._stop_wanted():
                    raise KeyboardInterrupt
                if self.step % cfg.save_interval == 0:
                    self.save()
            self._critical = True  # the epoch's bookkeeping and its evaluation are not split by a Ctrl+C
            try:
                self.epoch += 1
                self.batch_in_epoch = 0
                stop = False
                if cfg.val_interval and self.epoch % cfg.val_interval == 0:
                    if self.is_main:  # the others wait for its verdict
                        stop = self._validate()
                        if cfg.debug:
                            self._debug_pictures()
                    stop = broadcast_from_rank0(stop)
            finally:
                self._critical = False
            if self._stop_wanted():
                raise KeyboardInterrupt
            if stop:
                return self._finish("early-stopped", bar)
            if cfg.max_steps and self.step >= cfg.max_steps:
                return self._finish("max-steps", bar)
        return self._finish("done", bar)

    def _stop_wanted(self) -> bool:
        """A Ctrl+C seen by this process (or, under torchrun, by any)."""
        return any_rank(self._stop_requested, self.device)

    def _finish(self, reason: str, bar) -> str:
        if bar is not None:
            bar.close()
        self.save()
        self.info(f"{reason}: step {self.step}, epoch {self.epoch}; saved {self.last_path}"
                  + (f"; best val AP {self.best_ap:.4f} at step {self.best_step} ({self.best_path})"
                     if self.best_ap is not None else ""))
        return reason

    def _train_step(self, images, targets):
        try:
            if self.cfg.amp:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return self.trainer.step(images, targets)
            return self.trainer.step(images, targets)
        except FloatingPointError as e:
            parts = str(e).split(": ", 1)[-1]
            last = (f"last good checkpoint: {self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                    else "no checkpoint written yet")
            raise FloatingPointError(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}) in {parts}; "
                                     f"stopped without saving; {last}") from None

    # ------------------------------------------------------------------ evaluation
    def ema_model(self) -> EfficientDet:
        """A copy of the model holding the EMA weights (what ``best.pth`` and the ``.pth`` files hold),
        ready for inference as ``effdet-eval`` runs it (fused: ``EfficientDet.fuse_for_inference``)."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict(self.model))
        for p in model.parameters():
            p.requires_grad_(False)
        return model.fuse_for_inference()

    def evaluate(self) -> tuple[np.ndarray, dict[str, float]] | None:
        """The 12 COCO stats of the EMA weights on the val set and the AP of each class
        (``{"AP_/<name>": AP}``, :func:`evaluation.coco.ap_per_class`); None without a val set."""
        if self.val_set is None:
            return None
        out = run_eval(self.ema_model(), self.val_set, device=self.device, batch_size=self.cfg.batch_size,
                       num_workers=0, post_workers=0, progress=False)
        scores = evaluate_coco(self.val_doc, out.rows, self.cat_map, out.image_ids, out.row_image_ids, verbose=False)
        return scores.stats, ap_per_class(scores, self.cat_map, self.obj_list, self.val_doc.get("categories", []))

    def _validate(self) -> bool:
        """Evaluate, log, keep ``best.pth``; True when early stopping says stop."""
        result = self.evaluate()
        if result is None:
            return False
        stats, per_class = result
        ap = float(stats[0])
        done = self.epoch - 1  # the 0-based epoch just finished (the CSV's epoch column is 0-based throughout)
        self._csv_row({"step": self.step, "epoch": done, "val_ap": repr(ap), "val_ap50": repr(float(stats[1])),
                       **{k: repr(v) for k, v in per_class.items()}})
        if self._tb is not None:
            self._tb.add_scalar("val/AP", ap, self.step)
            self._tb.add_scalar("val/AP50", float(stats[1]), self.step)
            for k, v in per_class.items():
                self._tb.add_scalar(f"val/{k}", v, self.step)
        improved = self.best_ap is None or ap > self.best_ap + self.cfg.es_min_delta
        if improved:
            self.best_ap, self.best_step, self.evals_since_best = ap, self.step, 0
            atomic_write(self.best_path, weights_writer(self.ema.state_dict(self.model), self.model_cfg, self.best_path))
        else:
            self.evals_since_best += 1
        self.info(f"epoch {done} step {self.step}: val AP {ap:.4f} AP50 {float(stats[1]):.4f} "
                  f"(best {self.best_ap:.4f} at step {self.best_step}{', saved ' + str(self.best_path) if improved else ''})"
                  + ("; per class " + ", ".join(f"{k[4:]} {v:.4f}" if v >= 0 else f"{k[4:]} n/a"
                                                for k, v in per_class.items()) if per_class else ""))
        return bool(self.cfg.es_patience) and self.evals_since_best >= self.cfg.es_patience

    def _debug_pictures(self) -> None:
        doc = self.val_doc or load_annotations(self.cfg.train_annotations)
        images_dir = self.cfg.val_images if self.val_doc is not None else self.cfg.train_images
        ds = CocoEvalImages(doc, images_dir, self.model_cfg.image_size, self.mean, self.std,
                            max_images=self.cfg.debug_images)
        out = run_eval(self.ema_model(), ds, device=self.device, batch_size=self.cfg.batch_size, num_workers=0,
                       post_workers=0, progress=False)
        names = {int(c["id"]): c["name"] for c in doc.get("categories", [])}
        folder = self.log_dir / "debug"
        for it in ds.items:
            gt = [(a["bbox"], names.get(int(a["category_id"]), "?")) for a in doc.get("annotations", [])
                  if int(a["image_id"]) == it.image_id]
            draw_debug_picture(read_image_rgb(it.path), gt, out.per_image.get(it.image_id, np.zeros((0, 7))),
                               self.obj_list, folder / f"epoch{self.epoch - 1:04d}_step{self.step}_img{it.image_id}.png")

    # ------------------------------------------------------------------ logs
    def _csv_start(self, truncate_after: int | None) -> None:
        """A fresh log, or (resuming) the existing one without rows past the checkpoint's step
        (a killed run may have logged steps that the resumed run repeats)."""
        rows = []
        if truncate_after is not None and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= truncate_after]
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.csv_fields)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in self.csv_fields} for r in rows)

        atomic_write(self.csv_path, write)

    @property
    def csv_fields(self) -> tuple[str, ...]:
        """:data:`CSV_FIELDS`, then ``AP_/<class name>`` of every class (filled on evaluation rows)."""
        return CSV_FIELDS + tuple(f"AP_/{n}" for n in self.obj_list)

    def _csv_row(self, row: dict) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.csv_fields).writerow({k: row.get(k, "") for k in self.csv_fields})

    def _bar(self, bar):
        if bar is not None:
            bar.close()
        from tqdm import tqdm

        disable = (not self.cfg.progress) if self.cfg.progress is not None else not sys.stderr.isatty()
        disable = disable or not self.is_main
        return tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.num_epochs}",
                    unit="step", dynamic_ncols=True, disable=disable, leave=False)

    def _log_step(self, losses: dict, ips: float, bar) -> None:
        if not self.is_main:
            return
        ips *= self.dist.world_size  # images of the global batch
        row = {"step": self.step, "epoch": self.epoch, "loss": repr(losses["loss"]), "cls_loss": repr(losses["cls_loss"]),
               "box_loss": repr(losses["box_loss"]), "reg_l2_loss": repr(losses["reg_l2_loss"]),
               "lr": repr(losses["learning_rate"]), "gradient_norm": repr(losses["gradient_norm"]),
               "images_per_s": f"{ips:.2f}"}
        self._csv_row(row)
        if self._tb is not None:
            for k in ("loss", "cls_loss", "box_loss", "reg_l2_loss"):
                self._tb.add_scalar(f"train/{k}", losses[k], self.step)
            self._tb.add_scalar("train/lr", losses["learning_rate"], self.step)
            self._tb.add_scalar("train/images_per_s", ips, self.step)
        text = (f"loss {losses['loss']:.4f} cls {losses['cls_loss']:.4f} box {losses['box_loss']:.5f} "
                f"lr {losses['learning_rate']:.5f} {ips:.1f} img/s")
        if bar is not None and not bar.disable:
            bar.update(1)
            bar.set_postfix_str(text, refresh=False)
        elif self.step % self.cfg.log_interval == 0 or self.step == 1:
            self.info(f"epoch {self.epoch} step {self.step} {text}")


# ---------------------------------------------------------------------- helpers
def _check_writable(folder: Path) -> None:
    """Fail before training when ``folder`` cannot be created or written (one line)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".effdet-train-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{folder}: cannot write there ({e.strerror or e})") from None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _tensorboard(folder: Path):
    """A SummaryWriter when tensorboard is installed (it is optional: skipped quietly otherwise)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
