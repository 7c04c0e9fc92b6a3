"""The exact solver: the dense Jacobian and a direct solve (small problems and tests), and its size limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import tree as T
from ..errors import check_finite
from .base import LinearOperator, Solver, Tree, damped

__all__ = ["Exact", "dense_jacobian", "check_size"]


@dataclass(frozen=True)
class Exact:
    """Dense Jacobian and a direct solve: x = (J + eps I)^{-T} v. For small problems and tests.

    Builds J with one product per weight, so it refuses more than ``max_size``
    weights (default 5000, a 200 MB float64 matrix). When J + eps I is singular
    (an overparameterised inner problem: H = Phi^T Phi of a least-squares fit with
    more weights than examples) the answer is the Moore-Penrose pseudoinverse
    x = (J + eps I)^{+T} v, i.e. the min-norm response Jacobian of Vicol et al.
    (2021, App. E.2); a singular matrix is detected by LU pivots below
    ``rcond`` times the largest (default: n times the dtype's machine epsilon).

    Args:
        damping: Vicol et al. (2021)'s eps: solves with J + eps I.
        max_size: the most weights it accepts.
        rcond: the relative pivot size below which J + eps I counts as singular.

    Raises:
        ValueError: (when called) more than ``max_size`` weights.
    """

    damping: float = 0.0
    max_size: int = 5000
    rcond: float | None = None
    #: one product per weight: ``backend="compile"`` runs this solver eagerly instead of tracing n products
    compile_whole: ClassVar[bool] = False

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` by a dense LU solve (the pseudoinverse when J + eps I is singular).

        Args:
            op: the Jacobian J, seen through products (:class:`LinearOperator`).
            v: the right-hand side, keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.

        Raises:
            ValueError: more than ``max_size`` weights.
        """
        n = T.numel(v)
        check_size(self, n)
        jac = dense_jacobian(damped(op, self.damping), v)  # J + eps I
        check_finite("Jacobian-vector product (dense Jacobian of the exact solver)", jac)
        a = jac.T
        b = T.flatten(v)
        lu, piv, info = torch.linalg.lu_factor_ex(a)
        pivots = lu.diagonal().abs()
        rcond = self.rcond if self.rcond is not None else n * torch.finfo(a.dtype).eps
        if int(info) == 0 and bool(pivots.min() > rcond * pivots.max()):
            x = torch.linalg.lu_solve(lu, piv, b[:, None])[:, 0]
        else:  # singular: the min-norm (pseudoinverse) solution
            x = torch.linalg.pinv(a, rtol=rcond) @ b
        return T.unflatten(x, v)


def dense_jacobian(op: LinearOperator, like: Tree) -> Tensor:
    """J as a dense matrix, from n vector-Jacobian products.

    Args:
        op: the operator J.
        like: a tree with the keys and shapes of the weights (n numbers in all, flattened in key order,
            :func:`bilevel.tree.flatten`).

    Returns:
        The (n, n) matrix whose row i is ``e_i^T J``.
    """
    n = T.numel(like)
    ref = T.flatten(like)
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    rows = [T.flatten(op.rmatvec(T.unflatten(eye[i], like))) for i in range(n)]
    return torch.stack(rows)


def check_size(solver: Solver, n_weights: int) -> None:
    """Refuse, before any training, a solver that cannot handle the model.

    Args:
        solver: the solver.
        n_weights: the number of weights it will solve for.

    Raises:
        ValueError: ``solver`` is an :class:`Exact` and ``n_weights`` exceeds its ``max_size``.
    """
    if isinstance(solver, Exact) and n_weights > solver.max_size:
        raise ValueError(
            f"the exact solver refuses {n_weights} weights (max_size={solver.max_size}): "
            "use cg or neumann, or a smaller model"
        )
