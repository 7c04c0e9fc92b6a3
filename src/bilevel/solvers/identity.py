"""The identity approximation J^{-1} ~ I (the T1-T2 hypergradient): no product with J at all."""

from __future__ import annotations

from dataclasses import dataclass

from .. import tree as T
from .base import LinearOperator, Tree

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity:
    """J^{-1} ~ I: the T1-T2 approximation (Luketina et al. 2016; Lorraine et al. Table 1).

    Equal to ``Neumann(steps=0, alpha=1)`` without damping. With damping it takes
    J ~ I inside (J + eps I)^{-1}, giving (1 + eps)^{-1} v, whereas
    ``Neumann(steps=0)`` returns alpha * v whatever eps (its first term).

    Args:
        damping: eps; the answer is v / (1 + eps).
    """

    damping: float = 0.0

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` with J ~ I: ``x = v / (1 + eps)``.

        Args:
            op: the Jacobian J, seen through products (:class:`LinearOperator`).
            v: the right-hand side, keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.
        """
        return T.scale(v, 1.0 / (1.0 + self.damping)) if self.damping else dict(v)
