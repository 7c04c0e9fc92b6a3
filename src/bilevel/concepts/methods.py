"""Vicol et al.'s (2021) response-Jacobian approximations of the hypergradient (Table 1; App. F).

dF/dx = dF/dx|_direct + dF/dy dy*/dx with dy*/dx from K unrolled steps (``unroll``), a Neumann series
(``neumann``) or the proximal best response (``proximal``); see :mod:`bilevel.concepts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import tree as T
from ..hypergradient import Loss, check_inputs, hypergradient
from ..solvers import ConjugateGradient, Exact, Neumann
from ..unroll import unrolled_hypergradient
from .names import IFT_ALIASES, canonical_method, normalise

__all__ = ["HypergradientMethod", "method", "response_jacobian"]

Tree = T.Tree


@dataclass(frozen=True)
class HypergradientMethod:
    """One of Vicol et al.'s response-Jacobian approximations (Table 1; App. F).

    Attributes:
        name: ``"unroll"``, ``"neumann"`` or ``"proximal"`` (an alias is replaced by its canonical
            name, see :func:`canonical_method`; ``"implicit"``/``"ift"`` store ``proximal``, eps = 0, dense).
        steps: K -- unrolled steps (``unroll``), or the highest power of the Neumann series
            (``neumann`` sums k = 0..K, i.e. K + 1 terms; ``unroll`` K = ``neumann`` K - 1).
            Not used by ``proximal`` (see ``cg_steps``).
        lr: the inner step size of the unrolled steps, and the Neumann ``alpha``.
        eps: the proximal weight (solver ``damping``). ``proximal`` with eps = 0 and
            the dense solve is the exact IFT answer with the pseudoinverse H^+, the
            min-norm response Jacobian (App. E.2) that cold start and many Neumann
            terms tend to; with ``cg_steps`` eps must be > 0.
        cg_steps: ``proximal`` only: ``None`` solves (H + eps I) densely
            (:class:`bilevel.Exact`, at most ``max_size`` weights), otherwise conjugate
            gradient with this many steps.
        max_size: the most weights the dense solve of ``proximal`` accepts.
    """

    name: str  # MethodName or an alias
    steps: int = 1
    lr: float = 1e-3
    eps: float = 0.0
    cg_steps: int | None = None
    max_size: int = 5000

    def __post_init__(self) -> None:
        raw = normalise(self.name)
        object.__setattr__(self, "name", canonical_method(self.name))
        if raw in IFT_ALIASES and (self.eps or self.cg_steps is not None):
            raise ValueError(
                f"{raw!r} is the exact min-norm IFT (proximal eps = 0, dense solve); "
                "use method('proximal', eps=..., cg_steps=...) for a damped or CG response"
            )
        if self.steps < 0 or (self.name == "unroll" and self.steps < 1):
            raise ValueError(f"{self.name}: steps must be >= {1 if self.name == 'unroll' else 0}, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr}")
        if self.eps < 0:
            raise ValueError(f"{self.name}: eps must be >= 0, got {self.eps}")
        if self.name == "proximal" and not self.eps > 0 and self.cg_steps is not None:
            raise ValueError(
                "proximal with cg_steps: eps must be > 0 (CG on a singular H does not give the "
                "min-norm answer); eps = 0 with the dense solve gives the pseudoinverse"
            )
        if self.name == "unroll" and self.eps:
            raise ValueError("unroll: eps is not used; unroll the proximal objective in inner= instead")

    @property
    def label(self) -> str:
        """A short name for tables: ``unroll K=5``, ``neumann K=5``, ``proximal eps=0.1``."""
        return f"proximal eps={self.eps:g}" if self.name == "proximal" else f"{self.name} K={self.steps}"

    def solver(self) -> Neumann | Exact | ConjugateGradient | None:
        """The :mod:`bilevel.solvers` solver of ``neumann``/``proximal`` (``None`` for ``unroll``)."""
        if self.name == "neumann":
            return Neumann(self.steps, alpha=self.lr, damping=self.eps)
        if self.name == "proximal":
            if self.cg_steps is None:
                return Exact(damping=self.eps, max_size=self.max_size)
            return ConjugateGradient(self.cg_steps, damping=self.eps)
        return None

    def __call__(
        self,
        outer: Loss,
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor],
        *,
        inner: Loss,
        check: bool = True,
    ) -> Tree:
        """dF/dx at (params, hparams): ``outer`` is F(y, x), ``inner`` is f(y, x) (both ``(params, hparams)``)."""
        if self.name == "unroll":
            return unrolled_hypergradient(
                outer, params, hparams, steps=self.steps, inner=inner, lr=self.lr, check=check
            )
        solver = self.solver()
        assert solver is not None  # neumann / proximal (unroll returned above)
        return hypergradient(outer, params, hparams, inner=inner, solver=solver, check=check)


def method(name: str, **kwargs: Any) -> HypergradientMethod:
    """``method("unroll", steps=1, lr=1e-3)``, ``method("neumann", steps=K, lr=a)``, ``method("proximal", eps=e)``,
    ``method("implicit")`` (the exact min-norm IFT); aliases as in :func:`canonical_method`.

    Args:
        name: the method's name or alias.
        **kwargs: the other fields of :class:`HypergradientMethod` (``steps``, ``lr``, ``eps``,
            ``cg_steps``, ``max_size``).

    Returns:
        The :class:`HypergradientMethod`.

    Raises:
        ValueError: for an unknown name or invalid fields (see :class:`HypergradientMethod`).
    """
    return HypergradientMethod(name, **kwargs)


def response_jacobian(
    m: HypergradientMethod, inner: Loss, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]
) -> Tensor:
    """The dense response Jacobian dy*/dx (n_params, n_hparams) that method ``m`` implies at (params, hparams).

    Row i is the hypergradient of the outer objective F = y_i (flattened order of
    ``params``, then of ``hparams``), since dF/dx = e_i^T dy*/dx: e.g. for
    ``proximal``, -e_i^T (H + eps I)^{-1} d2f/dydx (Vicol et al. eq. 4). For tests
    and small problems: one hypergradient per weight.

    Args:
        m: the hypergradient method.
        inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
        params: the inner parameters y.
        hparams: the outer parameters x.

    Returns:
        The dense dy*/dx, shape ``(n_params, n_hparams)`` (total numbers of elements, flattened in the
        order of the dicts).
    """
    check_inputs(params, hparams)
    n = T.numel(params)
    rows = []
    for i in range(n):

        def outer(p: Tree, h: Tree, i: int = i) -> Tensor:
            return T.flatten(p)[i]

        rows.append(T.flatten(m(outer, params, hparams, inner=inner)))
    return torch.stack(rows)
