"""What every solver shares: the operator and solver protocols, and damping.

A solver answers ``solver(op, v) -> x`` with ``x^T (J + damping * I) ~= v^T`` (see :mod:`bilevel.solvers`);
``op`` is a :class:`LinearOperator` (products with the Jacobian J), and the damping eps of Vicol et al.
(2021)'s proximal best response is applied in one place, :func:`damped`.
"""

from __future__ import annotations

from typing import Protocol

from .. import tree as T

__all__ = ["Tree", "LinearOperator", "Solver", "Damped", "is_symmetric", "damped"]


Tree = T.Tree


class LinearOperator(Protocol):
    """The Jacobian J = dr/dw of the fixed-point residual, seen through products.

    An operator may carry ``symmetric = True`` when J is symmetric by construction (the Hessian of a
    training loss, :func:`bilevel.hypergradient.linearise` with ``inner=``); conjugate gradient then
    skips its symmetry check (two products)."""

    def rmatvec(self, x: Tree) -> Tree:
        """x^T J (a vector-Jacobian product).

        Args:
            x: a vector, keys and shapes of the weights.

        Returns:
            The row vector x^T J, same keys and shapes.
        """
        ...

    def matvec(self, x: Tree) -> Tree:
        """J x (a Jacobian-vector product); only CG's normal equations need it.

        Args:
            x: a vector, keys and shapes of the weights.

        Returns:
            J x, same keys and shapes.
        """
        ...


class Solver(Protocol):
    """What every solver is: ``solver(op, v) -> x`` with ``x^T (J + damping I) ~= v^T``, and a ``damping``."""

    @property
    def damping(self) -> float:
        """Vicol et al. (2021)'s eps >= 0 (read-only: the solvers are frozen dataclasses)."""
        ...

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` approximately.

        Args:
            op: the Jacobian J, seen through products.
            v: the right-hand side (the validation gradient dL_V/dw), keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.
        """
        ...


class Damped:
    """The operator J + eps I (``rmatvec(x) = x^T J + eps x``): Vicol et al. (2021)'s proximal best response.

    The one place damping happens: every solver with a ``damping`` field solves with
    ``damped(op, damping)`` (Jacobian products, the dense Jacobian and power iteration alike).

    Args:
        op: the operator J.
        eps: the damping eps (>= 0).
    """

    def __init__(self, op: LinearOperator, eps: float) -> None:
        self.op, self.eps = op, eps
        self.symmetric = is_symmetric(op)  # J + eps I is symmetric when J is

    def rmatvec(self, x: Tree) -> Tree:
        """x^T (J + eps I).

        Args:
            x: a vector.

        Returns:
            ``x^T J + eps x``.
        """
        return T.add(self.op.rmatvec(x), x, self.eps)

    def matvec(self, x: Tree) -> Tree:
        """(J + eps I) x.

        Args:
            x: a vector.

        Returns:
            ``J x + eps x``.
        """
        return T.add(self.op.matvec(x), x, self.eps)


def is_symmetric(op: LinearOperator) -> bool:
    """Whether ``op`` declares its J symmetric by construction.

    Args:
        op: any operator.

    Returns:
        ``op.symmetric`` if it has one, else ``False`` (unknown means no).
    """
    return bool(getattr(op, "symmetric", False))


def damped(op: LinearOperator, eps: float) -> LinearOperator:
    """The operator J + eps I.

    Args:
        op: the operator J.
        eps: the damping, >= 0.

    Returns:
        ``op`` itself for ``eps == 0``, else :class:`Damped` ``(op, eps)``.

    Raises:
        ValueError: ``eps < 0``.
    """
    if eps < 0:
        raise ValueError(f"damping must be >= 0, got {eps}")
    return Damped(op, eps) if eps else op
