"""The truncated Neumann series (Lorraine et al. 2020, Algorithm 3), with a fixed or an automatic step."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from .. import tree as T
from ..errors import NeumannDivergenceError, NonFiniteError
from .base import LinearOperator, Tree, damped
from .power import power_iteration

__all__ = ["Neumann", "AutoNeumann"]


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
