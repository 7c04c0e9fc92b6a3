"""Solution concepts of overparameterised bilevel optimisation (Vicol et al. 2021).

Vicol, Lorraine, Duvenaud & Grosse (2021), *Implicit Regularization in
Overparameterized Bilevel Optimization*, Table 1 and Sec. 3. With outer
parameters x (hyperparameters), inner parameters y (weights), outer objective
F(x, y) and inner objective f(x, y), S(x) = argmin_y f(x, y):

=================  ==========================================================  =========================================
concept            inner update after the outer step x_t -> x_{t+1}            response Jacobian dy*/dx
=================  ==========================================================  =========================================
``cold``           y_{t+1} = argmin_{y in S(x_{t+1})} ||y - y_0||^2             -(d2f/dy2)^{-1} d2f/dydx (min-norm: ^+)
                   (re-train from y_0 to convergence; Def. 3.1)
``warm-full``      y_{t+1} = argmin_{y in S(x_{t+1})} ||y - y_t||^2             the same, at y_t's projection
                   (re-train from y_t to convergence; App. C, approach 1)
``warm-partial``   K gradient steps from y_t on f(x_{t+1}, .) --                -(d2f/dy2 + eps I)^{-1} d2f/dydx
                   approximately argmin_y f(x_{t+1}, y) + eps/2 ||y - y_t||^2   (eq. 4, App. E.1), eps = 1/(K lr)
                   (eq. 3, Def. 3.2)
=================  ==========================================================  =========================================

Gradient descent from y_s on an inner problem whose solution set is affine
(e.g. least squares) converges to the solution nearest y_s, so "re-train to
convergence from y_s" *is* the projection of Table 1 (the implicit bias the
paper builds on). ``prox_eps > 0`` instead minimises the proximal objective
f + eps/2 ||y - y_s||^2 exactly (Table 1's warm update, Alg. 3).

The hypergradient dF/dx = dF/dx|_direct + dF/dy dy*/dx uses one of three
response-Jacobian approximations, selected by name (:func:`method`):

* ``"unroll"`` -- differentiate through K gradient steps y <- y - lr df/dy from
  the current y (App. F, Alg. 1-2), :func:`bilevel.unrolled_hypergradient`;
* ``"neumann"`` -- (H + eps I)^{-1} ~ lr * sum_{k=0}^{K} (I - lr (H + eps I))^k
  (Table 1, last row; ``steps=K`` is the highest power, K + 1 terms),
  :class:`bilevel.Neumann` inside :func:`bilevel.hypergradient`;
* ``"proximal"`` -- the proximal best response (H + eps I)^{-1} solved exactly
  (dense, :class:`bilevel.Exact`) or by ``cg_steps`` of conjugate gradient: the
  solvers' ``damping`` is Vicol et al.'s eps.

``Neumann(steps=K)`` sums the K + 1 terms k = 0..K. On least squares
f = 1/2 ||Phi w - y||^2 (targets y outer, weights w inner), H = Phi^T Phi and
d2f/dwdy = -Phi^T, so the min-norm response Jacobian is the Moore-Penrose
pseudoinverse Phi^+ (App. E.2): Neumann tends to it as K grows, the proximal one
tends to it as eps -> 0 (and is it at eps = 0 with the dense solve), and K
unrolled steps from a converged y equal ``method("neumann", steps=K - 1)``, i.e.
the first K terms k = 0..K-1 (Lorraine et al. 2020, Thm. 2 in its appendix form
dw_{i+1}/dlambda = -sum_{j<=i} (I - H)^j d2L/dwdlambda: i + 1 steps, i + 1
terms). :func:`response_jacobian` returns the dense dy*/dx of any method, so
these statements are tests.

**Names.** Concepts and methods are looked up by :func:`canonical_concept` and
:func:`canonical_method` (case-insensitive, ``_`` or spaces for ``-``); the
dataclasses store the canonical name:

* concepts: ``cold`` (``cold-start``), ``warm-full`` (``warm-start-full``,
  ``warm-full-start``), ``warm-partial`` (``warm-start-partial``, ``warm-start``,
  ``warm``, ``online``: the paper's "online" setting, Fig. 4, which is what
  "warm start" means in practice);
* methods: ``unroll`` (``unrolling``, ``unrolled``), ``neumann``
  (``neumann-series``), ``proximal`` (``prox``), and ``implicit`` / ``ift`` /
  ``exact`` / ``min-norm``: the exact min-norm IFT, stored as ``proximal`` with
  eps = 0 and the dense solve (H^+, the pseudoinverse).

**Table 1's response Jacobian per concept** (:meth:`Concept.response_method`,
:data:`TABLE1_RESPONSE`): ``cold`` and ``warm-full`` converge the inner problem,
so the IFT applies: the min-norm exact IFT (pseudoinverse). ``warm-partial`` is
the proximal best response (H + eps I)^{-1} with eps = 1 / (K lr) for its K steps
of size lr (one step y - lr df/dy is the minimiser of the linearised f plus
1/(2 lr) ||y - y_t||^2, so eps = 1/lr for K = 1 and K steps have "time" K lr); a
concept with ``prox_eps > 0`` minimises the proximal objective itself, so its
eps is ``prox_eps``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from . import tree as T
from .errors import check_finite
from .hypergradient import Loss, hypergradient
from .hypergradient import check_inputs as _validate
from .solvers import ConjugateGradient, Exact, Neumann
from .tuner import OnlineTuner, TunerConfig
from .unroll import unrolled_hypergradient
from .updates import SGD

Tree = T.Tree
MethodName = Literal["unroll", "neumann", "proximal"]
ConceptName = Literal["cold", "warm-full", "warm-partial"]

METHODS: tuple[str, ...] = ("unroll", "neumann", "proximal")
CONCEPTS: tuple[str, ...] = ("cold", "warm-full", "warm-partial")

#: alias -> canonical concept name (keys normalised: lower case, ``-`` for ``_`` and spaces)
CONCEPT_ALIASES: dict[str, str] = {
    "cold": "cold",
    "cold-start": "cold",
    "warm-full": "warm-full",
    "warm-start-full": "warm-full",
    "warm-full-start": "warm-full",
    "warm-partial": "warm-partial",
    "warm-start-partial": "warm-partial",
    "warm-partial-start": "warm-partial",
    "warm-start": "warm-partial",
    "warm": "warm-partial",
    "online": "warm-partial",
}
#: alias -> canonical method name; the :data:`IFT_ALIASES` also fix eps = 0 and the dense solve
METHOD_ALIASES: dict[str, str] = {
    "unroll": "unroll",
    "unrolling": "unroll",
    "unrolled": "unroll",
    "neumann": "neumann",
    "neumann-series": "neumann",
    "proximal": "proximal",
    "prox": "proximal",
    "implicit": "proximal",
    "ift": "proximal",
    "exact": "proximal",
    "min-norm": "proximal",
}
IFT_ALIASES: frozenset[str] = frozenset({"implicit", "ift", "exact", "min-norm"})

#: Table 1's response Jacobian of each concept (see :meth:`Concept.response_method`)
TABLE1_RESPONSE: dict[str, str] = {
    "cold": "min-norm exact IFT: -(d2f/dy2)^+ d2f/dydx, method('implicit')",
    "warm-full": "min-norm exact IFT: -(d2f/dy2)^+ d2f/dydx, method('implicit')",
    "warm-partial": "proximal: -(d2f/dy2 + eps I)^-1 d2f/dydx, eps = 1 / (inner_steps * inner_lr), "
    "method('proximal', eps=eps)",
}

__all__ = [
    "METHODS",
    "CONCEPTS",
    "CONCEPT_ALIASES",
    "METHOD_ALIASES",
    "IFT_ALIASES",
    "TABLE1_RESPONSE",
    "canonical_concept",
    "canonical_method",
    "HypergradientMethod",
    "method",
    "response_jacobian",
    "Concept",
    "concept",
    "inner_solve",
    "BilevelOptimizer",
]


def _normalise(name: Any) -> str:
    return "-".join(str(name).strip().lower().replace("_", "-").split())


def canonical_method(name: str) -> str:
    """The canonical method name (``unroll``, ``neumann``, ``proximal``) of ``name`` or one of its aliases
    (:data:`METHOD_ALIASES`; ``implicit``/``ift`` -> ``proximal``, with eps = 0 fixed by :func:`method`).

    Args:
        name: a method name or alias (case-insensitive; ``_`` or spaces for ``-``).

    Returns:
        ``"unroll"``, ``"neumann"`` or ``"proximal"``.

    Raises:
        ValueError: when ``name`` is neither a method nor an alias.
    """
    key = _normalise(name)
    if key not in METHOD_ALIASES:
        raise ValueError(
            f"unknown hypergradient method {name!r}; known: {', '.join(METHODS)} "
            f"(aliases: {', '.join(k for k in METHOD_ALIASES if k not in METHODS)})"
        )
    return METHOD_ALIASES[key]


def canonical_concept(name: str) -> str:
    """The canonical concept name (``cold``, ``warm-full``, ``warm-partial``) of ``name`` or an alias
    (:data:`CONCEPT_ALIASES`; ``warm-start`` is ``warm-partial``, the online setting).

    Args:
        name: a concept name or alias (case-insensitive; ``_`` or spaces for ``-``).

    Returns:
        ``"cold"``, ``"warm-full"`` or ``"warm-partial"``.

    Raises:
        ValueError: when ``name`` is neither a concept nor an alias.
    """
    key = _normalise(name)
    if key not in CONCEPT_ALIASES:
        raise ValueError(
            f"unknown solution concept {name!r}; known: {', '.join(CONCEPTS)} "
            f"(aliases: {', '.join(k for k in CONCEPT_ALIASES if k not in CONCEPTS)})"
        )
    return CONCEPT_ALIASES[key]


# ---------------------------------------------------------------------------- hypergradient approximations


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
        raw = _normalise(self.name)
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
    _validate(params, hparams)
    n = T.numel(params)
    rows = []
    for i in range(n):

        def outer(p: Tree, h: Tree, i: int = i) -> Tensor:
            return T.flatten(p)[i]

        rows.append(T.flatten(m(outer, params, hparams, inner=inner)))
    return torch.stack(rows)


# ---------------------------------------------------------------------------- inner optimisation


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


# ---------------------------------------------------------------------------- the joint loop


class BilevelOptimizer:
    """Vicol et al.'s alternating updates (Table 1; App. F Alg. 1 and 3) on the one online loop.

    Each :meth:`step`::

        x_{t+1} = OuterOpt(x_t, dF/dx(x_t, y_t))     (the hypergradient of ``method`` at y_t)
        y_{t+1} = the concept's response from y_t or y_0 to x_{t+1}

    The weights, hyperparameters, outer optimiser and the application of each hypergradient are
    those of a :class:`bilevel.tuner.OnlineTuner` on one model (:attr:`loop`, gradient descent
    with ``concept.inner_lr``). ``warm-partial`` (without ``prox_eps`` or ``closed_form``) responds
    with ``inner_steps`` of the loop's own weight steps, i.e. Algorithm 1 with the hyperparameter
    step first; ``cold`` and ``warm-full`` re-solve the inner problem to convergence
    (:meth:`Concept.respond`), first for x_0, so every hypergradient is taken at a best response.
    ``outer`` is F(y, x), ``inner`` f(y, x), both ``(params, hparams) -> scalar``; ``hparams``
    are the raw outer parameters (any keys, e.g. a :class:`bilevel.distill.DistilledData`'s raw
    dict), updated by ``outer_optimizer(list(hparams.values()), lr=outer_lr)``.

    Args:
        inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
        outer: the outer objective F(y, x), ``(params, hparams) -> scalar``.
        params: the initial inner parameters y_0.
        hparams: the initial raw outer parameters x_0.
        concept: how the weights respond to each outer step.
        method: the hypergradient approximation.
        outer_lr: the outer optimiser's learning rate.
        outer_optimizer: the outer optimiser's class, called as ``outer_optimizer(params, lr=outer_lr)``.
    """

    def __init__(
        self,
        inner: Loss,
        outer: Loss,
        params: Tree,
        hparams: Tree,
        concept: Concept,
        method: HypergradientMethod,
        outer_lr: float = 1e-2,
        outer_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    ) -> None:
        _validate(params, hparams)
        self.inner, self.outer, self.concept, self.method = inner, outer, concept, method
        self.outer_lr, self.outer_optimizer = outer_lr, outer_optimizer
        cfg = TunerConfig(
            tuned=tuple(hparams),
            hyper_lr=outer_lr,
            hyper_optimizer=outer_optimizer,
            on_divergence="raise",
            interval=max(1, concept.inner_steps),
        )
        self.loop = OnlineTuner(
            params,
            hparams,
            None,
            SGD(lr=concept.inner_lr),
            lambda p, h, ctx: inner(p, h),
            lambda p, h, ctx: outer(p, h),
            config=cfg,
            stacked=False,
        )
        self.t = 0
        self.inner_steps_taken = 0
        if concept.name != "warm-partial":
            self._respond()

    @property
    def params(self) -> Tree:
        return self.loop.params

    @property
    def hparams(self) -> Tree:
        return self.loop.raw

    @property
    def initial(self) -> Tree:
        return self.loop.initial_params

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The outer optimiser (replace it to use parameter groups)."""
        return self.loop.hyper_opt  # type: ignore[return-value]

    @opt.setter
    def opt(self, value: torch.optim.Optimizer) -> None:
        """Replace the outer optimiser.

        Args:
            value: an optimiser over the raw outer parameters :attr:`hparams`.
        """
        self.loop.hyper_opt = value

    def _respond(self) -> None:
        c = self.concept
        if c.name == "warm-partial" and not c.prox_eps and c.closed_form is None:
            for _ in range(c.inner_steps):
                self.loop.step(None)
            self.inner_steps_taken += c.inner_steps
            return
        self.loop.params, n = c.respond(self.inner, self.loop.params, self.loop.initial_params, self.loop.raw)
        self.inner_steps_taken += n

    def losses(self) -> dict[str, float]:
        """Current outer F(y_t, x_t) and inner f(y_t, x_t)."""
        with torch.no_grad():
            h = T.detach(self.hparams)
            return {"outer": float(self.outer(self.params, h)), "inner": float(self.inner(self.params, h))}

    def step(self) -> Tree:
        """One outer step then the concept's inner response; returns the hypergradient used."""
        g = self.method(self.outer, self.params, T.detach(self.hparams), inner=self.inner)
        self.loop.apply_hypergradient(g)
        self._respond()
        self.t += 1
        return g

    def run(
        self,
        steps: int,
        record_every: int = 1,
        callback: Callable[[BilevelOptimizer], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """``steps`` outer steps; every ``record_every`` a record ``{t, outer, inner, hparams}`` (detached copies).

        ``callback(self)`` is called at each record (e.g. to log a trajectory). The first
        record is the state before any step.

        Args:
            steps: the number of outer steps.
            record_every: outer steps between two records.
            callback: called with this optimiser at each record after the first, or ``None``.
            progress: called with 1 after every outer step (e.g. a progress bar's ``update``), or ``None``.

        Returns:
            The records, the first one before any step.
        """
        history = [self._record()]
        for _ in range(steps):
            self.step()
            if self.t % record_every == 0:
                history.append(self._record())
                if callback is not None:
                    callback(self)
            if progress is not None:
                progress(1)
        return history

    def _record(self) -> dict[str, Any]:
        return {"t": self.t, **self.losses(), "hparams": {k: v.detach().clone() for k, v in self.hparams.items()}}
