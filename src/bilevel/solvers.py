"""Linear solvers for the implicit-function-theorem hypergradient.

Every solver answers the same question with the same signature::

    solver(op, v) -> x   with   x^T (J + damping * I) ~= v^T

i.e. ``x = v (J + eps I)^{-1}`` written as a row vector (Lorraine et al. 2020,
eq. 3: the "vector-inverse-Hessian product"). ``op`` only has to provide
``rmatvec(x) = x^T J`` (one reverse-mode vector-Jacobian product, a
Hessian-vector product when J is a Hessian) and, for the normal equations of
conjugate gradient, ``matvec(x) = J x``. ``damping`` (eps) is a field of every
solver: it gives Vicol et al. (2021)'s proximal best response (H + eps I)^-1.

Memory: each solver keeps a fixed number of vectors the size of the weights and
never differentiates through its own iterations, so the memory of a
hypergradient does not grow with ``steps`` (tested in ``tests/test_memory.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor

from . import tree as T
from .errors import NeumannDivergenceError, NonFiniteError, NotSymmetricError, check_finite

__all__ = [
    "Tree",
    "LinearOperator",
    "Solver",
    "Damped",
    "damped",
    "is_symmetric",
    "power_iteration",
    "Neumann",
    "AutoNeumann",
    "Identity",
    "ConjugateGradient",
    "Exact",
    "dense_jacobian",
    "SOLVERS",
    "make_solver",
    "check_size",
]

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


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series, Lorraine et al. 2020, Algorithm 3 / eq. 5.

    x = alpha * sum_{j=0}^{steps} (I - alpha (J + eps I))^j v,

    which tends to v (J + eps I)^{-1} as steps grows when every eigenvalue of
    alpha (J + eps I) lies in (0, 2). The leading alpha is the scaling of the
    official code, so the limit is the exact IFT answer, not 1/alpha times it.
    ``steps`` is Clarke et al.'s look-back distance i: steps + 1 terms are summed.
    With an update map u (Clarke et al. Alg. 1) alpha = 1 is natural because u
    already carries the learning rate.

    ``divergence``: what to do when the terms grow (the norm of the last term
    exceeds twice that of the first and, with 3 or more steps, the last three
    terms increase):
    ``"raise"`` (:class:`NeumannDivergenceError` with a suggested alpha from
    power iteration), ``"warn"`` or ``"ignore"``. A non-finite term raises
    :class:`~bilevel.errors.NonFiniteError` unless ``"ignore"`` (populations mark
    their non-finite members themselves).

    Args:
        steps: i, the Neumann steps (>= 0; ``steps + 1`` terms).
        alpha: the step size (> 0).
        damping: Vicol et al. (2021)'s eps: the series of (J + eps I)^{-1}.
        divergence: ``"raise"``, ``"warn"`` or ``"ignore"`` growing terms.

    Raises:
        ValueError: ``steps < 0`` or ``alpha <= 0``.
    """

    steps: int
    alpha: float = 1.0
    damping: float = 0.0
    divergence: Literal["raise", "warn", "ignore"] = "raise"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"Neumann steps must be >= 0, got {self.steps}")
        if not self.alpha > 0:
            raise ValueError(f"Neumann alpha must be > 0, got {self.alpha}")

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` by the truncated series (``steps + 1`` terms).

        Args:
            op: the Jacobian J, seen through products (:class:`LinearOperator`).
            v: the right-hand side, keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.

        Raises:
            NeumannDivergenceError: the terms grow (``divergence="raise"``).
            NonFiniteError: a non-finite term (unless ``divergence="ignore"``).
        """
        op = damped(op, self.damping)
        keys = list(v)
        term = [v[k].clone() for k in keys]
        total = [v[k].clone() for k in keys]
        # under torch.compile (backend="compile") no value is read back: finiteness is checked on the result
        watch = self.divergence != "ignore" and not torch.compiler.is_compiling()
        norms = [float(T.norm(v))] if watch else []
        for j in range(self.steps):
            jt = op.rmatvec(dict(zip(keys, term)))
            torch._foreach_add_(term, [jt[k] for k in keys], alpha=-self.alpha)  # (I - a(J + eps I)) term
            torch._foreach_add_(total, term)
            if watch and (j == 0 or j >= self.steps - 3):
                norms.append(float(T.norm(dict(zip(keys, term)))))
        self._check_divergence(op, v, norms)
        torch._foreach_mul_(total, self.alpha)
        return dict(zip(keys, total))

    def _check_divergence(self, op: LinearOperator, v: Tree, norms: list[float]) -> None:
        """Raise/warn when the terms grow: the last term is over twice the first (v) and, given
        enough steps, the last three terms increase. Runs for every ``steps >= 1``."""
        if self.divergence == "ignore" or len(norms) < 2:
            return
        if not all(math.isfinite(n) for n in norms):
            raise NonFiniteError(
                "Neumann series term",
                f"term norms {[f'{n:.3g}' for n in norms]} with "
                f"alpha={self.alpha}: a non-finite Jacobian-vector product or an overflowing series",
            )
        growing = norms[-1] > 2 * norms[0] and (len(norms) < 4 or norms[-3] < norms[-2] < norms[-1])
        if not growing:
            return
        lam = power_iteration(op, v, iters=50)  # op is already damped
        suggested = 1.0 / lam if lam > 0 else None
        msg = (
            f"Neumann series diverges: term norm grew from {norms[0]:.3g} to {norms[-1]:.3g} "
            f"over {self.steps} steps with alpha={self.alpha}; power iteration estimates "
            f"lambda_max(J + eps I) ~ {lam:.4g}"
            + (f", so use alpha <= {suggested:.4g}" if suggested else " (J is not positive definite: add damping)")
        )
        if self.divergence == "raise":
            raise NeumannDivergenceError(msg, suggested)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class AutoNeumann:
    """:class:`Neumann` whose step ``alpha`` is chosen by power iteration and refreshed when the series grows.

    The first call sets ``alpha = 1 / lambda_max(J + eps I)`` (``iters`` products of
    :func:`power_iteration`), capped at ``max_alpha`` (``1.0`` suits an update map ``u``, which
    already carries the learning rate: Clarke et al.'s ``alpha = 1`` whenever that converges). When
    the terms start to grow (a :class:`NeumannDivergenceError` or a non-finite term, e.g. because
    the curvature rose during training) ``alpha`` is re-estimated, halved for safety, and the
    series is summed again. Its state (``alpha``) is part of a tuner's checkpoint.

    Args:
        steps: i, the Neumann steps (>= 0; ``steps + 1`` terms).
        damping: Vicol et al. (2021)'s eps.
        max_alpha: the cap of the chosen step (``None``: no cap).
        iters: power-iteration products per estimate.
    """

    def __init__(self, steps: int, damping: float = 0.0, max_alpha: float | None = 1.0, iters: int = 20) -> None:
        Neumann(steps, damping=damping)  # validates steps
        self.steps, self.damping, self.max_alpha, self.iters = steps, damping, max_alpha, iters
        self.alpha: float | None = None
        self.refreshes = 0

    def _estimate(self, op: LinearOperator, v: Tree, safety: float) -> float:
        lam = power_iteration(damped(op, self.damping), v, iters=self.iters)
        alpha = safety / lam if lam > 0 and math.isfinite(lam) else 1.0
        return min(alpha, self.max_alpha) if self.max_alpha is not None else alpha

    def __call__(self, op: LinearOperator, v: Tree) -> Tree:
        """Solve ``x^T (J + eps I) = v^T`` by the Neumann series, its step chosen (and refreshed) by power iteration.

        Args:
            op: the Jacobian J, seen through products (:class:`LinearOperator`).
            v: the right-hand side, keys and shapes of the weights.

        Returns:
            x, with the keys and shapes of ``v``.
        """
        if self.alpha is None:
            self.alpha = self._estimate(op, v, 1.0)
        try:
            return Neumann(self.steps, self.alpha, self.damping, divergence="raise")(op, v)
        except (NeumannDivergenceError, NonFiniteError):
            self.alpha = min(self.alpha, self._estimate(op, v, 0.5)) * (0.5 if self.refreshes else 1.0)
            self.refreshes += 1
            return Neumann(self.steps, self.alpha, self.damping, divergence="ignore")(op, v)

    def state_dict(self) -> dict[str, float | int | None]:
        """The chosen step and how often it was re-estimated (plain data, for a checkpoint).

        Returns:
            ``{"alpha": float or None, "refreshes": int}``.
        """
        return {"alpha": self.alpha, "refreshes": self.refreshes}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`'s values.

        Args:
            sd: a :meth:`state_dict`.
        """
        self.alpha, self.refreshes = sd["alpha"], sd["refreshes"]


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
