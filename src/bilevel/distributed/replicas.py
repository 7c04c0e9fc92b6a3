"""Checking that every rank holds bitwise-identical replicas: 64-bit checksums of the raw bytes, all-gathered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .ranks import _comm_device, is_data_parallel, world_size

__all__ = ["check_replicas"]


_CHUNK = 1 << 22  # int64 elements per chunk of a checksum (32 MB of temporaries)


def _checksum(t: Tensor) -> Tensor:
    """(number of bytes, wrapping sum of the 64-bit words, wrapping sum of word * (2 * position + 1)), int64.

    Integer sums modulo 2^64 do not depend on the order of summation, so the checksum is deterministic; any
    single differing word changes the first sum, a permutation the second.
    """
    b = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    nbytes = b.numel()
    pad = (-nbytes) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    words = b.view(torch.int64)
    s1 = torch.zeros((), dtype=torch.int64, device=t.device)
    s2 = torch.zeros((), dtype=torch.int64, device=t.device)
    odd = 2 * torch.arange(min(words.numel(), _CHUNK), dtype=torch.int64, device=t.device) + 1
    for j, chunk in enumerate(words.split(_CHUNK)):
        s = chunk.sum()
        s1 += s
        s2 += (chunk * odd[: chunk.numel()]).sum() + s * (2 * j * _CHUNK)
    return torch.stack([torch.tensor(nbytes, dtype=torch.int64, device=t.device), s1, s2])


def _all_gather(x: Tensor, group: Any) -> list[Tensor]:
    out = [torch.empty_like(x) for _ in range(world_size(group))]
    torch.distributed.all_gather(out, x, group=group)
    return out


def check_replicas(tensors: Mapping[str, Tensor] | Sequence[Tensor], what: str, group: Any = None) -> None:
    """Check that every rank holds bitwise-identical ``tensors`` (a no-op without data parallelism).

    Each rank computes three 64-bit integers per tensor from its raw bytes (size, a wrapping sum of its
    64-bit words, and a position-weighted one) and the ranks all-gather them: two small collectives (the
    number of tensors, then the checksums), whatever the tensors' sizes. Every rank must call it with the
    same number of tensors; all ranks raise the same error.

    Args:
        tensors: ``{name: tensor}`` or a sequence of tensors (named ``[i]``) of any dtypes.
        what: what the tensors are, for the message (e.g. ``"hyperparameters after step 20"``).
        group: the process group (``None``: the default group).

    Raises:
        RuntimeError: the ranks hold different numbers of tensors, or some tensor differs; the message names
            ``what``, the first differing tensor and the ranks.
    """
    if not is_data_parallel(group):
        return
    items = list(tensors.items()) if isinstance(tensors, Mapping) else [(f"[{i}]", t) for i, t in enumerate(tensors)]
    device = _comm_device(group)
    counts = _all_gather(torch.tensor([len(items)], dtype=torch.int64, device=device), group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(
            f"{what}: the ranks hold different numbers of tensors ({[int(c) for c in counts]}): not replicas"
        )
    if not items:
        return
    local = torch.stack([_checksum(t).to(device) for _, t in items])
    sums = [s.cpu() for s in _all_gather(local, group)]
    for i, (name, _) in enumerate(items):
        for rank in range(1, len(sums)):
            if not torch.equal(sums[rank][i], sums[0][i]):
                raise RuntimeError(
                    f"{what}: {name!r} differs between rank 0 and rank {rank} (the replicas must be bitwise "
                    "identical: the same initial values on every rank, e.g. broadcast from rank 0, the same "
                    "seeds, and global losses (bilevel.distributed.data_parallel_loss) for every derivative)"
                )
