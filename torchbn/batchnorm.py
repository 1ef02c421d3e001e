"""A synchronised BatchNorm that runs on any backend: torch's ``SyncBatchNorm`` formula
in plain tensor operations. The twin of ``flaxbn/batchnorm.py``.

``torch.nn.SyncBatchNorm`` computes its statistics with CUDA kernels
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``,
``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``): in torch 2.13 none has a
CPU kernel, its forward raises ``ValueError: SyncBatchNorm expected input tensor to be on
GPU or XPU or privateuseone`` and ``DistributedDataParallel`` refuses a CPU model holding
one ("SyncBatchNorm layers only work with GPU modules"). :class:`SyncBatchNorm` here does
the same arithmetic with ordinary operations, so it runs on CPU (gloo), on GPU (NCCL) and
anywhere ``torch.distributed`` does:

* forward: each process computes its shard's mean, ``invstd = 1/sqrt(var + eps)`` (biased
  variance) and count, all processes ``all_gather`` the ``2C + 1`` numbers, and every
  process combines them weighted by count: ``mean = sum(n_i m_i) / N``,
  ``var = sum(n_i (v_i + (m_i - mean)^2)) / N`` with ``v_i = 1/invstd_i^2 - eps`` (torch
  passes invstd, not the variance). The global batch's statistics, whatever the split:
  a process with 2 rows weighs a quarter of one with 8 (Flax's ``axis_name`` averages the
  devices' means with equal weight instead; ``SEMANTICS.md``). The running statistics
  move with ``momentum`` (torch's direction) and the *unbiased* global variance
  (``var * N / (N - 1)``); ``momentum=None`` is the cumulative average.
* backward: each process reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` over its shard,
  one ``all_reduce`` sums them over the processes, and the input gradient is torch's
  ``(dy - sum_dy / N - (x - mean) * invstd^2 * sum_dy_xmu / N) * invstd * weight``: the
  gradient flows through the statistics of every process. The weight and bias gradients
  stay local (``DistributedDataParallel`` averages them with the other parameters).
* without an initialised process group, in eval mode, or with one process: plain
  ``batch_norm``, as torch's module does.

The layer keeps ``BatchNorm*d``'s state_dict keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``); :func:`convert_sync_batchnorm` swaps it in for
every ``BatchNorm*d`` of a model, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # every axis but the channels (dim 1)


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> broadcastable over (N, C, ...)


class _SyncBatchNormFunction(torch.autograd.Function):
    """torch's ``torch.nn.modules._functions.SyncBatchNorm`` with its CUDA kernels written
    out (the comments name them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):
        x = x.contiguous()
        channels = x.shape[1]
        count = x.numel() // channels
        if count == 1 and world < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {count}")
        if count > 0:  # batch_norm_stats: the shard's mean and invstd (biased variance)
            dims = _channel_dims(x)
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            combined = torch.cat([mean, torch.rsqrt(var + eps), mean.new_full((1,), count)])
        else:  # an empty shard still takes part in the collective, with count 0
            combined = x.new_zeros(2 * channels + 1)
        gathered = [torch.empty_like(combined) for _ in range(world)]
        dist.all_gather(gathered, combined, group)  # gloo has no all_gather_into_tensor
        means, invstds, counts = torch.stack(gathered).split([channels, channels, 1], dim=1)
        keep = counts[:, 0] >= 1  # shards with no rows drop out
        means, invstds, counts = means[keep], invstds[keep], counts[keep]
        # batch_norm_gather_stats_with_counts: the count-weighted (Chan) merge
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (1 / invstds**2 - eps + (means - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            unbiased = var * (total / (total - 1))
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        if count == 0:
            return torch.empty_like(x)
        y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)  # batch_norm_elemt
        if weight is not None:
            y = y * _per_channel(weight, x)
        return y + _per_channel(bias, x) if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        dy = dy.contiguous()
        grad_x = grad_weight = grad_bias = None
        if x.numel() > 0:  # batch_norm_backward_reduce: this shard's sums
            dims = _channel_dims(x)
            xmu = x - _per_channel(mean, x)
            sum_dy, sum_dy_xmu = dy.sum(dims), (dy * xmu).sum(dims)
            if weight is not None and ctx.needs_input_grad[1]:
                grad_weight = sum_dy_xmu * invstd  # local: DDP all-reduces the parameters' gradients
            if ctx.needs_input_grad[2]:
                grad_bias = sum_dy
        else:
            channels = x.shape[1]
            sum_dy = sum_dy_xmu = x.new_zeros(channels)
        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, dist.ReduceOp.SUM, ctx.group)  # the gradient through the statistics
            sum_dy, sum_dy_xmu = combined.chunk(2)
            if x.numel() > 0:  # batch_norm_backward_elemt
                scale = invstd if weight is None else invstd * weight
                grad_x = (
                    dy - _per_channel(sum_dy / total, x) - xmu * _per_channel(invstd**2 * sum_dy_xmu / total, x)
                ) * _per_channel(scale, x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of every process of ``process_group`` (all by default),
    on any backend: see the module docstring. Inputs (N, C) or (N, C, ...) as
    ``BatchNorm1d``/``2d``/``3d``; ``momentum`` in torch's direction (0.1: 10% new)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or not self.track_running_stats
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        if not (batch_stats and self.training and world > 1):
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps)
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world
        )


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every ``BatchNorm*d`` replaced by :class:`SyncBatchNorm` carrying
    the same parameters and buffers (in place for children; the converted module is
    returned, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
