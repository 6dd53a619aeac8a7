"""One official training step (``tf2/train_lib.py`` ``EfficientDetNetTrain.train_step``):
training-mode forward (BN on batch statistics; moving averages with TF momentum 0.99 and the
unbiased batch variance — exactly what ``torch.nn.BatchNorm2d`` does in ``train()`` mode with
momentum 0.01), detection loss + L2, gradients of every trainable parameter, clipping (per tensor
10, then global 10), the Keras-convention SGD update with the scheduled lr, and the optional EMA.

Under ``torchrun`` (``module`` = the ``DistributedDataParallel`` wrapper of ``model``) the step is
the one-process step on the global batch: see :mod:`training.distributed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from effdet_torch.float_env import flush_denormals
from effdet_torch.model import EfficientDet

from .distributed import all_reduce_sum, world_size
from .loss import LossConfig, detection_loss, l2_parameters, reg_l2_loss
from .optim import ModelEma, clip_gradients
from .targets import AnchorTargets, flatten_head_outputs

__all__ = ["StepOutput", "Trainer"]


@dataclass
class StepOutput:
    losses: dict[str, float]  # cls_loss, box_loss, det_loss, reg_l2_loss, loss, gradient_norm, learning_rate
    raw_grad_norm: float
    grads: list[Tensor] = field(default_factory=list)  # clipped, in ``Trainer.params`` order
    class_outputs: list[Tensor] = field(default_factory=list)  # [B, A·C, H_l, W_l] (detached)
    box_outputs: list[Tensor] = field(default_factory=list)


class Trainer:
    """The official step on ``model``: ``Trainer(model, optimizer, schedule).step(images, targets)``.

    ``params`` = the trainable parameters (``requires_grad``); the L2 term covers those of them whose
    official name ends in ``kernel`` (:func:`training.loss.l2_parameters`). ``module`` is what the
    forward calls (default ``model``; under torchrun its ``DistributedDataParallel`` wrapper).
    """

    def __init__(self, model: EfficientDet, optimizer: torch.optim.Optimizer, schedule, loss_cfg: LossConfig = LossConfig(),
                 clip_norm: float = 10.0, ema: ModelEma | None = None, start_step: int = 0,
                 module: torch.nn.Module | None = None) -> None:
        self.model = model
        self.module = model if module is None else module
        self.optimizer = optimizer
        self.schedule = schedule
        self.loss_cfg = loss_cfg
        self.clip_norm = clip_norm
        self.ema = ema
        self.step_count = start_step
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.l2_params = [p for _, p in l2_parameters(model) if p.requires_grad]

    @torch.enable_grad()  # a training step never depends on the caller's grad mode
    def forward_loss(self, images: Tensor, targets: AnchorTargets) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
        """Training-mode forward and every loss term (tensors with grad; under torchrun the detection
        terms are this process's share, normalised by the positives of the global batch)."""
        self.module.train()
        cls_out, box_out = self.module(images)
        n_cls = self.model.config.num_classes
        positives = all_reduce_sum(targets.num_positives.sum().reshape(1))  # of the global batch
        losses = detection_loss(flatten_head_outputs(cls_out, n_cls), flatten_head_outputs(box_out, 4),
                                targets.cls, targets.box.to(images.dtype), positives, self.loss_cfg)
        losses["reg_l2_loss"] = reg_l2_loss(self.l2_params, self.loss_cfg.weight_decay)
        losses["loss"] = losses["det_loss"] + losses["reg_l2_loss"]
        return losses, cls_out, box_out

    @torch.enable_grad()
    def step(self, images: Tensor, targets: AnchorTargets) -> StepOutput:
        """Forward, clipped gradients, one optimizer update (and EMA update); returns what was used.
        On the CPU in TensorFlow's float environment: denormals flushed to zero (:mod:`effdet_torch.float_env`)."""
        with flush_denormals(images.device):
            return self._step(images, targets)

    def _step(self, images: Tensor, targets: AnchorTargets) -> StepOutput:
        losses, cls_out, box_out = self.forward_loss(images, targets)
        names = ("cls_loss", "box_loss", "det_loss")
        parts = all_reduce_sum(torch.stack([losses[k].detach() for k in names]))  # the global batch's terms
        report = dict(zip(names, parts))
        report["reg_l2_loss"] = losses["reg_l2_loss"].detach()
        report["loss"] = report["det_loss"] + report["reg_l2_loss"]
        if not all(torch.isfinite(v) for v in report.values()):  # the same verdict on every process
            bad = [k for k, v in report.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite loss at step {self.step_count}: {', '.join(bad)}")
        for p in self.params:
            p.grad = None
        # DDP averages over processes: world · (this share) + L2 averages to the global loss's gradient
        # (one process: ×1 is exact, so this is the loss itself)
        (losses["det_loss"] * world_size() + losses["reg_l2_loss"]).backward()
        grads = [p.grad for p in self.params]
        clipped, raw, norm = clip_gradients(list(grads), self.clip_norm)
        lr = self.schedule(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(self.params, clipped):
            p.grad = g
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        if self.ema is not None:
            self.ema.update(self.model, self.step_count)
        self.step_count += 1
        out = {k: float(v) for k, v in report.items()}
        out["gradient_norm"] = float(norm)
        out["learning_rate"] = lr
        return StepOutput(out, float(raw), clipped, [c.detach() for c in cls_out], [b.detach() for b in box_out])
