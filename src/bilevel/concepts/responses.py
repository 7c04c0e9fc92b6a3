"""How the inner parameters respond to an outer step: Vicol et al.'s (2021) solution concepts (Table 1; App. C).

:func:`inner_solve` is gradient descent on the inner problem (optionally proximal, eq. 3); a :class:`Concept`
says where it starts (y_0 for ``cold``, y_t for ``warm-full`` / ``warm-partial``) and how long it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import tree as T
from ..errors import check_finite
from ..hypergradient import Loss
from .methods import HypergradientMethod
from .names import canonical_concept

__all__ = ["inner_solve", "Concept", "concept"]

Tree = T.Tree


def inner_solve(
    inner: Loss,
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    lr: float,
    steps: int,
    tol: float | None = None,
    prox_eps: float = 0.0,
    check: bool = True,
) -> tuple[Tree, int]:
    """Gradient descent on the inner problem from ``params``; returns ``(weights, steps_taken)``.

    y <- y - lr (df/dy(y, x) + prox_eps (y - y_start)) for at most ``steps`` steps,
    stopping early when the gradient norm is <= ``tol``. ``prox_eps = 0`` from
    y_start converges (on least squares) to the solution nearest y_start, the
    projection of Table 1; ``prox_eps > 0`` minimises eq. (3)'s proximal objective.
    ``hparams`` are held fixed (detached).

    Args:
        inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
        params: the starting weights y_start.
        hparams: the outer parameters x (detached, held fixed).
        lr: the gradient-descent step size (> 0).
        steps: the most steps taken (>= 0).
        tol: stop once the gradient norm is <= ``tol``; ``None`` always takes ``steps`` steps.
        prox_eps: the weight of the proximal term eps/2 ||y - y_start||^2 (0: none).
        check: raise when the training loss is not finite.

    Returns:
        ``(weights, steps_taken)``: the detached weights and the number of steps taken.

    Raises:
        ValueError: when ``steps < 0`` or ``lr <= 0``.
        NonFiniteError: when ``check`` and the training loss is not finite.
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"inner_solve needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    h = T.detach(hparams)
    start = T.detach(params)
    w = {k: v.clone() for k, v in start.items()}
    for k in range(steps):
        leaves = {key: v.requires_grad_(True) for key, v in w.items()}
        with torch.enable_grad():
            loss = inner(leaves, h)
            if check:
                check_finite("training loss", loss.detach())
            g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        if prox_eps:
            g = T.add(g, T.add(T.detach(leaves), start, -1.0), prox_eps)
        if tol is not None and float(T.norm(g)) <= tol:
            return T.detach(leaves), k
        w = {key: (leaves[key] - lr * g[key]).detach() for key in leaves}
    return w, steps


@dataclass(frozen=True)
class Concept:
    """How the inner parameters respond to each outer step (Table 1; App. C).

    Attributes:
        name: ``"cold"`` (re-train from y_0), ``"warm-full"`` (re-train from y_t to
            convergence), ``"warm-partial"`` (``inner_steps`` steps from y_t); an alias
            (``"cold-start"``, ``"warm-start"`` = ``warm-partial``, ...; :func:`canonical_concept`)
            is replaced by its canonical name.
        inner_lr: gradient-descent step size of the inner updates.
        inner_steps: K for ``warm-partial``; the step budget of a full solve otherwise.
        tol: a full solve stops when ||df/dy|| <= tol (not used by ``warm-partial``).
        prox_eps: > 0 minimises f + prox_eps/2 ||y - y_t||^2 instead of f (Table 1's warm update).
        closed_form: optional ``(start, hparams) -> weights`` that replaces the gradient-descent
            solve of ``cold``/``warm-full`` by its exact answer (e.g. the least-squares projection
            start + Phi^+ (y - Phi start), or the proximal step of Alg. 3), for problems whose
            gradient descent would take too long to converge (ill-conditioned features).
    """

    name: str  # ConceptName or an alias
    inner_lr: float
    inner_steps: int = 1
    tol: float | None = 1e-10
    prox_eps: float = 0.0
    closed_form: Callable[[Tree, Tree], Tree] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical_concept(self.name))
        if self.inner_steps < 0 or not self.inner_lr > 0 or self.prox_eps < 0:
            raise ValueError(f"concept {self.name}: need inner_steps >= 0, inner_lr > 0 and prox_eps >= 0")
        if self.closed_form is not None and self.name == "warm-partial":
            raise ValueError("concept warm-partial takes inner_steps gradient steps; closed_form is for cold/warm-full")

    @property
    def response_eps(self) -> float:
        """The eps of this concept's Table 1 response Jacobian: ``prox_eps`` if set, else 0 for
        ``cold``/``warm-full`` (converged: the IFT) and 1 / (inner_steps * inner_lr) for ``warm-partial``."""
        if self.prox_eps > 0:
            return self.prox_eps
        if self.name != "warm-partial":
            return 0.0
        if self.inner_steps < 1:
            raise ValueError("warm-partial with inner_steps = 0 takes no inner step: no proximal response")
        return 1.0 / (self.inner_steps * self.inner_lr)

    def response_method(self, *, cg_steps: int | None = None, max_size: int = 5000) -> HypergradientMethod:
        """Table 1's response-Jacobian method for this concept (:data:`TABLE1_RESPONSE`).

        ``cold`` / ``warm-full``: ``method("implicit")``, the min-norm exact IFT -(H^+) d2f/dydx (App. E.2;
        the inner problem is converged, and re-training converges to the projection whose Jacobian is the
        pseudoinverse). ``warm-partial``: ``method("proximal", eps=self.response_eps)``, i.e.
        -(H + eps I)^{-1} d2f/dydx (eq. 4) with eps = 1 / (K lr). ``prox_eps > 0``: proximal with that eps.
        ``cg_steps`` solves by conjugate gradient (needs eps > 0); the default is the dense solve
        (at most ``max_size`` weights).

        Args:
            cg_steps: conjugate-gradient steps, or ``None`` for the dense solve.
            max_size: the most weights the dense solve accepts.

        Returns:
            The :class:`HypergradientMethod` of this concept's response Jacobian.

        Raises:
            ValueError: when ``cg_steps`` is given and eps = 0 (the min-norm IFT needs the dense solve), or
                for ``warm-partial`` with ``inner_steps = 0``.
        """
        eps = self.response_eps
        if eps == 0:
            if cg_steps is not None:
                raise ValueError(
                    f"concept {self.name}: its response is the min-norm IFT (eps = 0), which needs "
                    "the dense solve; CG on a singular H does not give the min-norm answer"
                )
            return HypergradientMethod("implicit", max_size=max_size)
        return HypergradientMethod("proximal", eps=eps, cg_steps=cg_steps, max_size=max_size)

    def respond(
        self, inner: Loss, current: Mapping[str, Tensor], initial: Mapping[str, Tensor], hparams: Mapping[str, Tensor]
    ) -> tuple[Tree, int]:
        """y_{t+1} for x_{t+1} = ``hparams``: from ``initial`` (cold) or ``current`` (warm).

        Args:
            inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
            current: the current weights y_t.
            initial: the initial weights y_0.
            hparams: the new outer parameters x_{t+1}.

        Returns:
            ``(weights, steps_taken)``; ``steps_taken`` is 0 with ``closed_form``.
        """
        start = initial if self.name == "cold" else current
        if self.closed_form is not None:
            return {k: v.detach() for k, v in self.closed_form(T.detach(start), T.detach(hparams)).items()}, 0
        tol = None if self.name == "warm-partial" else self.tol
        return inner_solve(
            inner, start, hparams, lr=self.inner_lr, steps=self.inner_steps, tol=tol, prox_eps=self.prox_eps
        )


def concept(name: str, **kwargs: Any) -> Concept:
    """``concept("cold", inner_lr=.., inner_steps=5000)``, ``concept("warm-partial", inner_lr=.., inner_steps=1)``;
    aliases as in :func:`canonical_concept` (``"warm-start"`` is ``warm-partial``).

    Args:
        name: the concept's name or alias.
        **kwargs: the other fields of :class:`Concept` (``inner_lr`` is required).

    Returns:
        The :class:`Concept`.

    Raises:
        ValueError: for an unknown name or invalid fields (see :class:`Concept`).
    """
    return Concept(name, **kwargs)
