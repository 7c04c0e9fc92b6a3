"""The process group as the data-parallel code sees it: its size, whether losses are made global, any rank's flag.

Without an initialised ``torch.distributed`` (or with one rank) every answer is the one-process one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["world_size", "is_data_parallel", "any_rank"]


def _initialised() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 when ``torch.distributed`` is not initialised).

    Args:
        group: a process group (``None``: the default group, all ranks).

    Returns:
        ``torch.distributed.get_world_size(group)``, or 1 without an initialised process group.
    """
    return int(torch.distributed.get_world_size(group)) if _initialised() else 1


def is_data_parallel(group: Any = None) -> bool:
    """Whether losses are to be made global: ``torch.distributed`` is initialised with more than one rank.

    Args:
        group: a process group (``None``: the default group).

    Returns:
        ``world_size(group) > 1``.
    """
    return world_size(group) > 1


def _comm_device(group: Any) -> torch.device:
    backend = str(torch.distributed.get_backend(group))
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: Any = None) -> bool:
    """Whether ``flag`` holds on any rank (an all-reduce MAX of one number; ``flag`` itself on one process).

    Every rank must call it. The online loop uses it for the one branch that depends on a rank's own data
    (whether a non-finite value came from the data), so that every rank takes the same branch.

    Args:
        flag: this rank's flag.
        group: the process group (``None``: the default group).

    Returns:
        The flag's maximum over the ranks.
    """
    if not is_data_parallel(group):
        return flag
    x = torch.tensor([1.0 if flag else 0.0], device=_comm_device(group))
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(x.item() > 0)
