"""The solvers by name (the studies' ``--solver``): :data:`SOLVERS` and :func:`make_solver`."""

from __future__ import annotations

from typing import Literal

from .base import Solver
from .exact import Exact
from .identity import Identity
from .krylov import ConjugateGradient
from .neumann import Neumann

__all__ = ["SOLVERS", "make_solver"]


#: the solver names of :func:`make_solver` (and of the studies' ``--solver``)
SOLVERS = ("neumann", "cg", "identity", "exact")


def make_solver(
    name: str,
    steps: int,
    alpha: float | None = 1.0,
    damping: float = 0.0,
    divergence: Literal["raise", "warn", "ignore"] = "raise",
    max_size: int | None = None,
) -> Solver:
    """The solver called ``name`` (one of :data:`SOLVERS`) with ``steps`` Neumann steps / CG iterations.

    ``neumann``: Lorraine et al. (2020) Alg. 3 (``steps + 1`` terms, step ``alpha``, default 1);
    ``cg``: conjugate gradient (their Table 1 comparison); ``identity``: the T1-T2
    approximation (Luketina et al. 2016); ``exact``: a dense solve (``max_size`` weights at most,
    default :class:`Exact`'s). ``damping`` is Vicol et al. (2021)'s eps for every one.

    Args:
        name: one of :data:`SOLVERS`.
        steps: Neumann steps / CG iterations (ignored by ``identity`` and ``exact``).
        alpha: the Neumann step size (``None``: 1).
        damping: eps.
        divergence: the Neumann series' policy for growing terms.
        max_size: the exact solver's weight limit (``None``: its default).

    Returns:
        The solver.

    Raises:
        ValueError: an unknown name or ``steps < 0``.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 0:
        raise ValueError(f"solver steps must be >= 0, got {steps}")
    if name == "neumann":
        return Neumann(steps, alpha=1.0 if alpha is None else alpha, damping=damping, divergence=divergence)
    if name == "cg":
        return ConjugateGradient(steps, damping=damping)
    if name == "identity":
        return Identity(damping)
    return Exact(damping) if max_size is None else Exact(damping, max_size=max_size)
