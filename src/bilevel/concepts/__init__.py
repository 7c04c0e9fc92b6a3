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

**Modules** (every name is re-exported here, so ``bilevel.concepts.X`` is the public name of each):

* :mod:`bilevel.concepts.names` -- the names, aliases and :data:`TABLE1_RESPONSE`;
* :mod:`bilevel.concepts.methods` -- :class:`HypergradientMethod`, :func:`method`, :func:`response_jacobian`;
* :mod:`bilevel.concepts.responses` -- :func:`inner_solve`, :class:`Concept`, :func:`concept`;
* :mod:`bilevel.concepts.optimizer` -- :class:`BilevelOptimizer` on the one loop (:func:`bilevel.loop.run`
  with a :class:`bilevel.loop.HyperFirst` schedule), its :class:`MethodStrategy` and :class:`ConceptTuner`.
"""

from __future__ import annotations

from ..hypergradient import Loss as Loss  # importable from here as before the split (not in __all__)
from .methods import HypergradientMethod, method, response_jacobian
from .methods import Tree as Tree
from .names import (
    CONCEPT_ALIASES,
    CONCEPTS,
    IFT_ALIASES,
    METHOD_ALIASES,
    METHODS,
    TABLE1_RESPONSE,
    canonical_concept,
    canonical_method,
)
from .names import ConceptName as ConceptName
from .names import MethodName as MethodName
from .optimizer import BilevelOptimizer, ConceptTuner, MethodStrategy
from .responses import Concept, concept, inner_solve

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
    "MethodStrategy",
    "ConceptTuner",
]
