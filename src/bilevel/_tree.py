"""Tiny helpers for dicts of tensors ("trees"): the vectors the solvers work on.

A hypergradient is computed over ``dict[str, Tensor]`` parameters; the linear
algebra (Neumann, CG, dense solves) only needs sums, scalings, inner products
and flattening of such dicts. Keeping them here lets every solver stay a few
lines of maths.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["Tree", "add", "scale", "dot", "norm", "zeros_like", "detach", "numel", "flatten", "unflatten", "all_finite"]

Tree = dict[str, Tensor]


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], scale: float | Tensor = 1.0) -> Tree:
    """a + scale * b, key by key."""
    return {k: a[k] + scale * b[k] for k in a}


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    return {k: s * v for k, v in a.items()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Euclidean inner product sum_k <a_k, b_k> (a 0-d tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: Mapping[str, Tensor]) -> Tensor:
    return dot(a, a).sqrt()


def zeros_like(a: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach() for k, v in a.items()}


def numel(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the leaves (in key order) into one vector."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten` for the keys and shapes of ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def all_finite(a: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())
