"""Gradient clipping by the joint norm, per member of a population (differentiable)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import population as pop

__all__ = ["clip_grad_norm"]


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float | None, population: int | None = None) -> list[Tensor]:
    """Scale gradients so that their joint 2-norm (per member, with a leading ``population`` axis) is <= ``max_norm``.

    ``g * min(1, max_norm / (||g|| + 1e-6))``, differentiably: ``torch.nn.utils.clip_grad_norm_``
    (AWD-LSTM's clipping, Merity et al. 2018; Clarke et al. on PTB). ``None`` returns them unchanged.

    Args:
        grads: the gradients, one per parameter tensor (each of shape ``(P, ...)`` with ``population``).
        max_norm: the largest joint norm (> 0), or ``None`` for no clipping.
        population: P, the size of the leading member axis, or ``None`` for one model (one joint norm).

    Returns:
        The clipped gradients, in the order of ``grads``.

    Raises:
        ValueError: when ``max_norm`` is not positive.
    """
    if max_norm is None:
        return list(grads)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if population is None:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))  # type: ignore[arg-type]  # sum() of no tensors is 0; grads is never empty
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * factor for g in grads]
    norms = sum(g.reshape(population, -1).pow(2).sum(1) for g in grads).sqrt()  # type: ignore[union-attr]  # as above
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * pop.per_member(factor, g) for g in grads]
