"""The model a tuner evaluates: DDP unwrapped (its hooks bypassed), SyncBatchNorm converted, FSDP refused."""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import convert_sync_batchnorm

__all__ = ["refuse_fsdp", "unwrap"]


def _fsdp_types() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - every torch with torch.distributed has it
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard), torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            FSDPModule = None  # type: ignore[assignment,misc]
    if FSDPModule is not None:
        types.append(FSDPModule)
    return tuple(types)


def refuse_fsdp(model: object) -> None:
    """Raise ``ValueError`` if ``model`` or any of its submodules is FSDP-wrapped (FSDP1 or FSDP2).

    Args:
        model: a module (anything else passes).

    Raises:
        ValueError: an ``FullyShardedDataParallel`` or ``FSDPModule`` (``fully_shard``) is found; the message
            names it and says why: second-order gradients are not supported by FSDP.
    """
    if not isinstance(model, nn.Module):
        return
    types = _fsdp_types()
    if not types:
        return
    for name, m in model.named_modules():
        if isinstance(m, types):
            where = f"submodule {name!r}" if name else "the model"
            raise ValueError(
                f"{where} is FSDP-sharded ({type(m).__name__}): second-order gradients are not supported by FSDP "
                "(its parameter gathers and gradient reduce-scatters are hooks that double backward does not see); "
                "use DistributedDataParallel or no wrapper: bilevel replicates the weights on every rank"
            )


def unwrap(model: nn.Module) -> nn.Module:
    """The module a tuner evaluates: ``model.module`` for a ``DistributedDataParallel`` model, else ``model``.

    DDP's gradient hooks are bypassed this way; :func:`data_parallel_loss` sums the gradients instead. Every
    ``nn.SyncBatchNorm`` (no double backward) is replaced in place by a :class:`GlobalBatchNorm` holding the same
    parameters and buffers (:func:`convert_sync_batchnorm`). FSDP (:func:`refuse_fsdp`) is refused.

    Args:
        model: a module, possibly wrapped in ``torch.nn.parallel.DistributedDataParallel``.

    Returns:
        The inner module (``model`` itself when it is not DDP-wrapped), its SyncBatchNorm layers converted (a new
        :class:`GlobalBatchNorm` when the inner module is itself a SyncBatchNorm).

    Raises:
        ValueError: ``model`` is FSDP-sharded (:func:`refuse_fsdp`).
    """
    refuse_fsdp(model)
    model = convert_sync_batchnorm(model)
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            inner = model.module
            assert isinstance(inner, nn.Module)
            return inner
    return model
