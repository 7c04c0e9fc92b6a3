"""Batch normalisation over the global batch, differentiable to every order (torch's SyncBatchNorm is not).

:class:`GlobalBatchNorm` and :func:`convert_sync_batchnorm`; why and at what communication cost: the
"BatchNorm" paragraph of :mod:`bilevel.distributed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .collectives import _Copy, _Reduce
from .ranks import is_data_parallel

__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch (all ranks' shards together), differentiable to every order.

    A drop-in for :class:`torch.nn.SyncBatchNorm` (the same constructor, parameters ``weight`` and ``bias``,
    buffers ``running_mean``, ``running_var`` and ``num_batches_tracked``, and state-dict keys) whose derivatives
    of every order are those of batch normalisation on the global batch. In training mode, per channel c, each
    rank computes its local count n_r, sum s_r and sum of squares q_r (from its shard's centred moments, in float64:
    the 2C + 1 numbers are few), one all-reduce sums them (``_Copy(_Reduce(.))``: the forward all-reduce, and in
    backward one all-reduce of their cotangents, every order), and every rank normalises its own shard with the
    global mean ``m = s / n`` and biased variance ``v = q / n - m^2``:

        ``y = (x - m) / sqrt(v + eps) * weight + bias``.

    The running statistics are updated as torch's BatchNorm updates them, with the global mean and the unbiased
    global variance ``v * n / (n - 1)`` (``momentum``, or the cumulative average when ``momentum=None``, counted by
    ``num_batches_tracked``), so they are the same on every rank. In eval mode, and without data parallelism
    (:func:`is_data_parallel` of ``process_group`` false: one process), the forward is ``F.batch_norm`` exactly as
    in ``nn.BatchNorm``: no collective (as torch's SyncBatchNorm, statistics are not synchronised in eval mode, so
    an evaluation may run on one rank only). Inputs are ``(N, C)`` or ``(N, C, *)`` (1-d, 2-d, 3-d batch norm
    alike); the shards may have different sizes. Works under ``torch.func.functional_call`` with parameters and buffers
    swapped in (the running statistics are updated in place in the tensors passed).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability.
        momentum: the running statistics' update factor; ``None``: the cumulative moving average.
        affine: whether the layer has a learnable ``weight`` and ``bias``.
        track_running_stats: whether the layer keeps running statistics (else batch statistics in eval mode too,
            each rank's own).
        process_group: the ranks whose shards form the global batch (``None``: the default group).
        device: the parameters' and buffers' device.
        dtype: the parameters' and buffers' dtype.
        bias: whether an affine layer has a ``bias``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (dimension 1), got input of shape {input.shape}")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with the global batch statistics (training mode) or the running ones (eval mode).

        Args:
            input: this rank's shard, shape ``(N, C)`` or ``(N, C, *)``.

        Returns:
            The normalised shard, the shape and dtype of ``input``.
        """
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if not (self.training and is_data_parallel(self.process_group)):
            bn_training = self.training or (self.running_mean is None and self.running_var is None)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)
        return _global_batch_norm(
            input, self.weight, self.bias, running_mean, running_var, factor, self.eps, self.process_group
        )


def _global_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    factor: float,
    eps: float,
    group: Any,
) -> Tensor:
    """Training-mode batch norm of the local shard ``x`` with the statistics of all ranks' shards (one all-reduce).

    The local moments are centred on the shard's own mean (at least float32: no overflow or cancellation for half
    precision inputs), turned into the sum and the sum of squares in float64 and all-reduced with the count: 2C + 1
    numbers, ``_Copy(_Reduce(.))`` so that each rank's cotangent of the global statistics is summed over the ranks
    in backward. The output is computed in ``x``'s dtype.
    """
    c = x.size(1)
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    count = x.numel() // c if c else 0
    acc = torch.float64
    xs = x.to(torch.promote_types(x.dtype, torch.float32))  # x itself for float32 and float64
    local_mean = xs.mean(dims) if count else xs.sum(dims)  # an empty shard contributes zeros
    m2 = (xs - local_mean.view(shape)).square().sum(dims).to(acc)
    local_mean = local_mean.to(acc)
    local = torch.cat([count * local_mean, m2 + count * local_mean.square(), local_mean.new_full((1,), count)])
    (total,) = _Copy.apply(group, *_Reduce.apply(group, local))
    n = total[2 * c]
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean.square()).clamp(min=0.0)
    scale = torch.rsqrt(var + eps).to(x.dtype)
    if weight is not None:
        scale = scale * weight.to(x.dtype)
    y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.to(x.dtype).view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var * (n / (n - 1))
            running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return y


def _take_over(old: nn.SyncBatchNorm) -> GlobalBatchNorm:
    """A :class:`GlobalBatchNorm` holding ``old``'s very Parameter and buffer objects (and its settings)."""
    new = GlobalBatchNorm(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        old.process_group,
        device="meta",  # placeholders, replaced below: nothing is allocated
        bias=old.bias is not None,
    )
    new._parameters.clear()
    new._parameters.update(old._parameters)  # the same objects, in the same order: the optimiser keeps them
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new._modules.update(old._modules)
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``model``, in place, by a :class:`GlobalBatchNorm` (double backward).

    Each replacement takes over the very Parameter and buffer objects of the layer it replaces (an optimiser
    that holds them keeps working, and ``state_dict`` keys are unchanged), its settings (``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, ``process_group``) and its train/eval mode; a layer registered under
    several names becomes one GlobalBatchNorm. Plain ``BatchNorm`` layers are kept (per-rank statistics): convert
    them first with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for global statistics. Converting twice is
    converting once.

    Args:
        model: a module, possibly a ``DistributedDataParallel`` wrapper.

    Returns:
        ``model`` itself, converted; a new :class:`GlobalBatchNorm` when ``model`` is itself a SyncBatchNorm.
    """
    memo: dict[int, GlobalBatchNorm] = {}

    def replacement(m: nn.SyncBatchNorm) -> GlobalBatchNorm:
        if id(m) not in memo:
            memo[id(m)] = _take_over(m)
        return memo[id(m)]

    if isinstance(model, nn.SyncBatchNorm):
        model = replacement(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.SyncBatchNorm):
                parent._modules[name] = replacement(child)
    return model
