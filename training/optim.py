"""Official optimisation pieces (``tf2/train_lib.py``): gradient clipping, Keras-convention SGD,
the warm-up + cosine learning-rate schedule, and the weight EMA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["CosineSchedule", "KerasSGD", "ModelEma", "clip_gradients", "global_norm"]


def global_norm(tensors: Iterable[Tensor]) -> Tensor:
    """``tf.linalg.global_norm``: ``sqrt(Σ_t sum(t²))``."""
    return torch.sqrt(torch.stack([(t * t).sum() for t in tensors]).sum())


@torch.no_grad()
def clip_gradients(grads: list[Tensor], clip_norm: float) -> tuple[list[Tensor], Tensor, Tensor]:
    """Official clipping: ``clip_by_norm(g, clip)`` per tensor, THEN ``clip_by_global_norm(., clip)``.

    Returns ``(clipped, raw global norm, global norm after clipping)`` (the latter is the official
    ``gradient_norm`` log value). Per tensor: ``g · clip / max(‖g‖, clip)``; global:
    ``g · clip · min(1/‖G‖, 1/clip)``.
    """
    raw = global_norm(grads)
    out = []
    for g in grads:
        n = torch.sqrt((g * g).sum())
        out.append(g * clip_norm / torch.clamp(n, min=clip_norm))
    use = global_norm(out)
    scale = clip_norm * torch.minimum(1.0 / use, torch.tensor(1.0 / clip_norm, dtype=use.dtype))
    out = [g * scale for g in out]
    return out, raw, global_norm(out)


@dataclass(frozen=True)
class CosineSchedule:
    """Official ``CosineLrSchedule``: ``step < warmup_steps``: linear from ``warmup_init`` (NOT batch
    scaled) to ``adjusted_lr``; then ``0.5 · adjusted_lr · (1 + cos(π · step / (total - warmup)))`` —
    note: the official cosine uses the global ``step``, not ``step - warmup``.
    ``adjusted_lr = learning_rate · batch / 64``. Values are float32 (as the official schedule)."""

    adjusted_lr: float
    warmup_init: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def official(cls, batch_size: int, steps_per_epoch: int, num_epochs: int, learning_rate: float = 0.08,
                 lr_warmup_init: float = 0.008, lr_warmup_epoch: float = 1.0) -> "CosineSchedule":
        return cls(learning_rate * batch_size / 64.0, lr_warmup_init, int(lr_warmup_epoch * steps_per_epoch),
                   int(num_epochs * steps_per_epoch))

    def __call__(self, step: int) -> float:
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        s = f32(step)
        if step < self.warmup_steps:
            lr = f32(self.warmup_init) + s / f32(self.warmup_steps) * (f32(self.adjusted_lr) - f32(self.warmup_init))
        else:
            decay = f32(self.total_steps - self.warmup_steps)
            lr = 0.5 * f32(self.adjusted_lr) * (1 + torch.cos(f32(math.pi) * s / decay))
        return float(lr)


class KerasSGD(torch.optim.Optimizer):
    """SGD with momentum in the Keras convention: ``m = momentum · m - lr · g``; ``w = w + m``.

    The learning rate is folded into the buffer, so when lr changes between steps (warm-up,
    cosine) the update differs from PyTorch's ``b = momentum · b + g; w -= lr · b``. ``lr`` is set
    per step (``param_groups[...]['lr']``) by the caller from :class:`CosineSchedule`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                m = state["momentum"]
                m.mul_(mom).add_(p.grad, alpha=-lr)
                p.add_(m)
        return loss


class ModelEma:
    """Official weight EMA (``MovingAverage(average_decay=0.9998, dynamic_decay=True)``).

    After optimizer step ``t`` (0-based, the iteration count BEFORE that step's increment):
    ``ema = d · ema + (1 - d) · w`` with ``d = min(decay, (1 + t) / (10 + t))`` — 0.1 at the first
    step. Only trainable parameters are averaged; buffers (BN moving statistics) are not averaged:
    the EMA copy keeps the values it started with, like the official average slots.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1.0 - d)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict with every averaged parameter replaced by its EMA."""
        return {k: self.shadow.get(k, v).clone() for k, v in model.state_dict().items()}
