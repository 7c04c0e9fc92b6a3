"""Conjugate gradient (a Krylov method) on the symmetric system or on its normal equations."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import tree as T
from ..errors import NonFiniteError, NotSymmetricError
from .base import LinearOperator, Tree, damped, is_symmetric

__all__ = ["ConjugateGradient"]


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient on x^T (J + eps I) = v^T (Lorraine et al. 2020, Table 1; Liao et al. 2018).

    CG needs a symmetric positive-definite matrix. A Hessian of a training loss
    (``inner=``) is symmetric; the Jacobian of an update map with per-weight
    learning rates or momentum (``update=``) generally is not. Decision: by
    default CG checks symmetry with two random products (``check_symmetry``; skipped for an
    operator that is symmetric by construction, a training-loss Hessian) and
    raises :class:`NotSymmetricError` rather than silently returning a wrong
    answer; ``normal_equations=True`` instead solves (J + eps I)(J + eps I)^T x
    = (J + eps I) v, which is symmetric positive definite for any invertible J
    (at the cost of a forward product per step and a squared condition number).
    Stops after ``steps`` iterations or when ||residual|| <= tol * ||v||. If a
    direction of non-positive curvature is met (an indefinite Hessian), it stops
    there and warns (``RuntimeWarning``), returning the iterate so far.

    Args:
        steps: the most iterations (each one product with J).
        tol: stop when ||residual|| <= tol * ||v||.
        damping: Vicol et al. (2021)'s eps: solves with J + eps I.
        normal_equations: solve the normal equations (any invertible J) instead of requiring symmetry.
        check_symmetry: check that J is symmetric before solving (two products).

    Raises:
        NotSymmetricError: (when called) J is not symmetric and ``normal_equations`` is off.
        NonFiniteError: (when called) a non-finite product.
    """

    steps: int
    tol: float = 1e-10
    damping: float = 0.0
    normal_equations: bool = False
    check_symmetry: bool = True

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` by conjugate gradient.

        Args:
            op: the Jacobian J, seen through products (:class:`LinearOperator`).
            v: the right-hand side, keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.

        Raises:
            NotSymmetricError: J is not symmetric (and ``normal_equations`` is off).
            NonFiniteError: a non-finite product.
        """
        op = damped(op, self.damping)
        if self.normal_equations:
            apply = lambda x: op.matvec(op.rmatvec(x))  # noqa: E731  (J + eps I)(J + eps I)^T x
            rhs = op.matvec(v)
        else:
            if self.check_symmetry and not is_symmetric(op) and not torch.compiler.is_compiling():
                _check_symmetric(op, v)  # (backend="compile" runs it on the eager first call)
            apply = op.rmatvec
            rhs = v
        if torch.compiler.is_compiling():
            return _cg_traced(apply, rhs, self.steps, self.tol)
        return _cg(apply, rhs, self.steps, self.tol)


def _cg(apply: Callable[[Tree], Tree], b: Tree, steps: int, tol: float) -> Tree:
    """Conjugate gradient on the leaves as lists, updated in place by fused ``torch._foreach_*`` calls."""
    keys = list(b)
    x = [torch.zeros_like(b[k]) for k in keys]
    r = [b[k].clone() for k in keys]
    p = [b[k].clone() for k in keys]
    rs = T.dot_leaves(r, r)
    # converged at tol, or at round-off level (where curvature estimates are noise)
    bb = rs.clone()
    floor = torch.finfo(rs.dtype).eps * bb.sqrt()
    stop = float(torch.maximum(tol * bb.sqrt(), floor) ** 2)
    rs_f = float(rs)
    for _ in range(steps):
        if rs_f <= stop:
            break
        ap_tree = apply(dict(zip(keys, p)))
        ap = [ap_tree[k] for k in keys]
        curvature = float(T.dot_leaves(p, ap))
        if not math.isfinite(curvature):
            raise NonFiniteError("Jacobian-vector product in conjugate gradient", f"p^T (J + eps I) p = {curvature}")
        if not curvature > 0:
            if rs_f <= math.sqrt(torch.finfo(rs.dtype).eps) * float(bb):
                break  # converged to round-off: p is noise, its curvature estimate too
            warnings.warn(
                "conjugate gradient met non-positive curvature (J + eps I is not positive definite); "
                "stopping early: add damping",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        a = rs_f / curvature
        torch._foreach_add_(x, p, alpha=a)
        torch._foreach_add_(r, ap, alpha=-a)
        rs_new = float(T.dot_leaves(r, r))
        torch._foreach_mul_(p, rs_new / rs_f)  # p <- r + beta p
        torch._foreach_add_(p, r)
        rs_f = rs_new
    return dict(zip(keys, x))


def _cg_traced(apply: Callable[[Tree], Tree], b: Tree, steps: int, tol: float) -> Tree:
    """:func:`_cg` for ``torch.compile``: tensor scalars and no data-dependent branch, so the whole loop is one
    graph. A converged iterate, or one that meets non-positive curvature, stops moving (it is not warned about:
    finiteness is checked on the result)."""
    keys = list(b)
    x = [torch.zeros_like(b[k]) for k in keys]
    r = [b[k] for k in keys]
    p = list(r)
    rs = T.dot_leaves(r, r)
    stop = torch.maximum(tol * rs.sqrt(), torch.finfo(rs.dtype).eps * rs.sqrt()) ** 2
    zero = torch.zeros_like(rs)
    for _ in range(steps):
        ap_tree = apply(dict(zip(keys, p)))
        ap = [ap_tree[k] for k in keys]
        curvature = T.dot_leaves(p, ap)
        go = (rs > stop) & (curvature > 0)
        a = torch.where(go, rs / curvature, zero)
        x = [xi + a * pi for xi, pi in zip(x, p)]
        r = [ri - a * api for ri, api in zip(r, ap)]
        rs_new = T.dot_leaves(r, r)
        beta = torch.where(go, rs_new / rs, zero)
        p = [torch.where(go, ri + beta * pi, pi) for ri, pi in zip(r, p)]
        rs = torch.where(go, rs_new, rs)
    return dict(zip(keys, x))


def _check_symmetric(op: LinearOperator, like: Tree) -> None:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    a = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in like.items()}
    b = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in like.items()}
    s1 = float(T.dot(b, op.rmatvec(a)))  # a^T J b
    s2 = float(T.dot(a, op.rmatvec(b)))  # b^T J a
    rtol = 10 * math.sqrt(torch.finfo(next(iter(like.values())).dtype).eps)
    if abs(s1 - s2) > rtol * (abs(s1) + abs(s2)) + 1e-30:
        raise NotSymmetricError(
            f"ConjugateGradient needs a symmetric Jacobian but a^T J b = {s1:.6g} != b^T J a = {s2:.6g} "
            "(update maps with momentum or per-weight learning rates are not symmetric); "
            "use ConjugateGradient(..., normal_equations=True) or Neumann"
        )
