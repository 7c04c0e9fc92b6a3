"""A population as blocks of consecutive members (one Ray Tune trial each), and their results merged back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["blocks", "member_blocks", "merge_blocks"]


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive blocks of at most ``size`` members covering ``0 .. n - 1``.

    Args:
        n: the population size.
        size: the largest block.

    Returns:
        ``[(first, count), ...]`` in member order.
    """
    if n < 1 or size < 1:
        raise ValueError(f"need at least one member and a block size >= 1, got n={n}, size={size}")
    return [(i, min(size, n - i)) for i in range(0, n, size)]


def member_blocks(jobs: Sequence[Mapping[str, Any]], n: int) -> list[tuple[int, int]]:
    """The blocks of ``jobs`` in member order, checked to cover members ``0 .. n - 1`` once.

    Args:
        jobs: the trials' ``job`` configs (``first``, ``count``).
        n: the population size.

    Returns:
        ``[(first, count), ...]`` sorted by ``first``.

    Raises:
        ValueError: the blocks do not cover the population exactly once.
    """
    spans = sorted((int(j["first"]), int(j["count"])) for j in jobs)
    covered = [m for f, c in spans for m in range(f, f + c)]
    if covered != list(range(n)):
        raise ValueError(f"the Ray trials' blocks {spans} do not cover the {n} initialisations once each")
    return spans


def merge_blocks(parts: Sequence[Mapping[str, Any]], axis: str = "step") -> dict[str, Any]:
    """One population's results from its blocks' results (in member order), as one population would give.

    Per key of the first block: lists (one entry per member) are concatenated; numbers (e.g.
    ``wall_seconds``, the training time) are summed (compute, not elapsed time); mappings are
    tables whose ``axis`` entry (e.g. the recorded steps) is shared -- taken from the first block --
    and whose other entries (one row per member) are concatenated; anything else must be the same
    in every block.

    Args:
        parts: the blocks' results, in member order.
        axis: the shared key of the tables.

    Returns:
        The merged results.

    Raises:
        ValueError: blocks that disagree on a shared entry.
    """
    if not parts:
        raise ValueError("no block results to merge")
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        if isinstance(first, Mapping):
            out[key] = {
                **({axis: first[axis]} if axis in first else {}),
                **{k: [row for p in parts for row in p[key][k]] for k in first if k != axis},
            }
        elif isinstance(first, (list, tuple)):
            out[key] = [v for p in parts for v in p[key]]
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(p[key] for p in parts)
        elif all(p[key] == first for p in parts):
            out[key] = first
        else:
            raise ValueError(f"cannot merge {key!r}: the blocks disagree ({[p[key] for p in parts]})")
    return out
