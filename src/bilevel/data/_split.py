"""Shared split and standardisation helpers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["standardise", "n_split", "seeded_permutation", "fractions_to_sizes"]


def standardise(train: Tensor, *others: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Standardise arrays with the column statistics of ``train``.

    Unbiased std; a (near-)zero std (a constant column) is replaced by 1.

    Args:
        train: the rows whose statistics are used, shape (n, d).
        *others: more arrays with the same columns (validation, test).

    Returns:
        ``(mean, std, [train, *others] standardised)``.
    """
    mean = train.mean(0)
    std = train.std(0) if len(train) > 1 else torch.ones_like(mean)
    # Constant columns (e.g. naval columns 8 and 11) would divide by 0 or by round-off
    # noise: treat a std below 1e-10 of the column's magnitude as zero and use 1.
    constant = std <= 1e-10 * mean.abs().clamp_min(1.0)
    std = torch.where(constant, torch.ones_like(std), std)
    return mean, std, [(t - mean) / std for t in (train, *others)]


def n_split(n: int, fraction: float) -> int:
    """Number of rows in the second part when ``n`` rows are split ``1-fraction : fraction``.

    Rounds the first part with ``np.rint`` as Clarke et al.'s code does.

    Args:
        n: the rows.
        fraction: the second part's share, in [0, 1).

    Returns:
        The second part's row count.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    return n - int(np.rint(n * (1.0 - fraction)))


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A random permutation drawn from its own generator.

    Args:
        n: its length.
        seed: the generator's seed.

    Returns:
        ``torch.randperm(n)`` of a generator seeded ``seed`` (the same for the same seed everywhere).
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def fractions_to_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Train/validation/test row counts of ``n`` rows split by three fractions.

    Args:
        n: the rows.
        fractions: three non-negative shares summing to 1.

    Returns:
        ``(n_train, n_val, n_test)`` summing to ``n`` (validation and test rounded, training the rest).

    Raises:
        ValueError: not three non-negative numbers summing to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    return n - n_val - n_test, n_val, n_test
