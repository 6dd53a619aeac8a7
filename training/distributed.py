"""Data-parallel training under ``torchrun``: one global batch cut into equal per-process slices,
SyncBatchNorm over all processes, gradients averaged by ``DistributedDataParallel``.

What the official trainer does across GPUs: batch normalisation on the statistics of the whole
global batch (``SyncBatchNormalization`` when ``strategy == 'gpus'``) and one update from the
replicas' gradients. Here the step is made *equal* to a one-process step on the same global batch
(up to fp32 rounding), which is what a user comparing 1 and N devices expects:

- BN statistics: the batch mean and the (biased) variance over every process's slice, two
  differentiable all-reduces per layer (sum, then the sum of squared deviations from the global
  mean); moving averages updated with the unbiased global variance, as one process does;
- loss normaliser: total positives of the *global* batch + 1 (all-reduced before the loss);
- gradients: each process back-propagates ``world · det_loss_local + l2``; DDP averages, which gives
  the gradient of ``Σ det_loss_local + l2`` = the one-process loss; clipping then sees the global
  gradient on every process (identical after the all-reduce), so every replica takes the same step.

(The official ``MirroredStrategy`` path normalises by each replica's own positives and clips each
replica's gradient before summing; with that, N devices are not the same as one larger batch.)

torch's own ``nn.SyncBatchNorm`` refuses CPU tensors; :class:`SyncBatchNorm2d` works on CPU (gloo)
and CUDA (NCCL) alike, so the equivalence is tested in CI with two CPU processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from effdet_torch.ops import BatchNorm2d

__all__ = ["SyncBatchNorm2d", "all_reduce_sum", "any_rank", "convert_sync_batchnorm", "world_size"]


def world_size() -> int:
    """Processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over processes of a tensor that needs no gradient (a copy; ``t`` itself when alone)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (keeps Ctrl+C and stops in step)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_processes x`` on every process; backward: ``dx = Σ_processes dy`` (every process's
    loss depends on ``y``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:  # noqa: D102
        dx = dy.clone()
        dist.all_reduce(dx)
        return dx


class SyncBatchNorm2d(BatchNorm2d):
    """:class:`~effdet_torch.ops.BatchNorm2d` whose training-mode statistics cover all processes.

    ``[B_local, C, H, W] → [B_local, C, H, W]``; same parameters, buffers and state-dict keys as
    the layer it replaces; alone (or in eval mode) it is exactly that layer. Computed in float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        xf = x.float()
        c = xf.shape[1]
        count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        centred = xf - mean.view(1, c, 1, 1)
        sq = _AllReduceSum.apply(centred.square().sum((0, 2, 3)))
        var = sq / n
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1.0 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1.0 - m).add_(sq.detach() / (n - 1.0), alpha=m)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every :class:`~effdet_torch.ops.BatchNorm2d` in ``module`` replaced (in place) by a
    :class:`SyncBatchNorm2d` holding the same tensors; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(child.num_features, eps=child.eps)
            sync.momentum = child.momentum  # as is (1 - (1 - m) is not always m in floating point)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module

