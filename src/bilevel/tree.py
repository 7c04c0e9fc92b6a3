"""Tiny helpers for dicts of tensors ("trees"): the vectors the solvers work on.

A hypergradient is computed over ``dict[str, Tensor]`` parameters; the linear
algebra (Neumann, CG, dense solves) only needs sums, scalings, inner products
and flattening of such dicts. Keeping them here lets every solver stay a few
lines of maths. A tree is a vector: the concatenation of its leaves flattened in
key order (:func:`flatten`), and every operation here equals the same operation on
those dense vectors (``tests/test_tree.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "Tree",
    "add",
    "scale",
    "dot",
    "dot_leaves",
    "norm",
    "zeros_like",
    "detach",
    "numel",
    "flatten",
    "unflatten",
    "all_finite",
]

#: A tree: leaf name -> tensor (weights, hyperparameters, gradients, solver vectors)
Tree = dict[str, Tensor]


def _values(a: Mapping[str, Tensor], keys: list[str]) -> list[Tensor]:
    return [a[k] for k in keys]


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], scale: float | Tensor = 1.0) -> Tree:
    """a + scale * b, key by key (one fused ``torch._foreach_*`` call over all leaves).

    Args:
        a: a tree.
        b: a tree with (at least) the keys of ``a``, leaves of the same shapes.
        scale: a number or a 0-d tensor.

    Returns:
        A new tree with the keys of ``a``.
    """
    keys = list(a)
    av, bv = _values(a, keys), _values(b, keys)
    if isinstance(scale, Tensor):
        out = torch._foreach_add(av, torch._foreach_mul(bv, scale))
    else:
        out = torch._foreach_add(av, bv, alpha=scale)
    return dict(zip(keys, out))


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    """s * a (one fused call).

    Args:
        a: a tree.
        s: a number or a 0-d tensor.

    Returns:
        A new tree.
    """
    keys = list(a)
    return dict(zip(keys, torch._foreach_mul(_values(a, keys), s)))


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Euclidean inner product sum_k <a_k, b_k>: one BLAS dot per leaf, no temporaries.

    Args:
        a: a tree.
        b: a tree with (at least) the keys of ``a``.

    Returns:
        A 0-d tensor, ``flatten(a) @ flatten(b)``.
    """
    return dot_leaves([a[k] for k in a], [b[k] for k in a])


def dot_leaves(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """:func:`dot` of two lists of leaves in the same order.

    Args:
        a: the leaves of one vector.
        b: the leaves of the other, same number and shapes.

    Returns:
        A 0-d tensor.
    """
    parts = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def norm(a: Mapping[str, Tensor]) -> Tensor:
    """The Euclidean norm of all leaves together (one fused ``torch._foreach_norm`` call).

    Args:
        a: a tree.

    Returns:
        A 0-d tensor, the Euclidean norm of ``flatten(a)``.
    """
    norms = torch._foreach_norm(list(a.values()))
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def zeros_like(a: Mapping[str, Tensor]) -> Tree:
    """A tree of zeros.

    Args:
        a: a tree.

    Returns:
        Zeros with the keys, shapes, dtypes and devices of ``a``.
    """
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> Tree:
    """Every leaf detached from the autograd graph (no copy).

    Args:
        a: a tree.

    Returns:
        A new dict of the detached leaves.
    """
    return {k: v.detach() for k, v in a.items()}


def numel(a: Mapping[str, Tensor]) -> int:
    """The number of elements of all leaves.

    Args:
        a: a tree.

    Returns:
        The length of ``flatten(a)``.
    """
    return sum(v.numel() for v in a.values())


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the leaves (in key order) into one vector.

    Args:
        a: a tree (leaves of one dtype and device).

    Returns:
        A 1-d tensor of :func:`numel` elements.
    """
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten` for the keys and shapes of ``like``.

    Args:
        vector: a 1-d tensor of ``numel(like)`` elements.
        like: the tree whose keys and shapes to use.

    Returns:
        A tree whose leaves are views of ``vector``.
    """
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vector[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def all_finite(a: Mapping[str, Tensor]) -> bool:
    """Whether every element of every leaf is finite.

    Args:
        a: a tree.

    Returns:
        ``True`` if there is no NaN or infinity.
    """
    return all(bool(torch.isfinite(v).all()) for v in a.values())
