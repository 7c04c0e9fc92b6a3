"""Power iteration: the eigenvalue of an operator largest in magnitude, from products alone.

It chooses the Neumann step (:class:`~bilevel.solvers.AutoNeumann`) and names a safe one when a series diverges.
"""

from __future__ import annotations

import torch

from .. import tree as T
from .base import LinearOperator, Tree

__all__ = ["power_iteration"]


def power_iteration(op: LinearOperator, like: Tree, iters: int = 20, seed: int = 0) -> float:
    """Power-iteration estimate of the eigenvalue of an operator largest in magnitude.

    Use it to choose the Neumann step: the series converges when
    ``0 < alpha * lambda < 2`` for every eigenvalue, so ``alpha <= 1 / lambda_max``
    is safe for a positive semi-definite J (Lorraine et al. 2020, sec. 3). This is the
    operator-level routine; :func:`bilevel.largest_eigenvalue` applies it to the Jacobian of a
    problem given by its weights, hyperparameters and training loss or update map.

    Args:
        op: the operator (products ``x^T J``); damp it first (:func:`damped`) for J + eps I.
        like: a tree with the keys, shapes, dtypes and devices of the vectors ``op`` acts on.
        iters: products of the iteration.
        seed: seed of the random start vector (on the CPU, so the estimate is reproducible).

    Returns:
        The Rayleigh quotient ``x^T J x`` of the last unit iterate (0.0 if an iterate vanishes).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in like.items()}
    x = T.scale(x, 1.0 / T.norm(x))
    lam = torch.zeros(())
    for _ in range(iters):
        y = op.rmatvec(x)
        lam = T.dot(x, y)  # Rayleigh quotient with unit x
        n = T.norm(y)
        if not bool(n > 0):
            return 0.0
        x = T.scale(y, 1.0 / n)
    return float(lam)
