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

The package is one module per idea; every name is re-exported here, so ``bilevel.solvers.X``
is the public name of each:

* :mod:`bilevel.solvers.base` -- the :class:`LinearOperator` and :class:`Solver` protocols and damping
  (:class:`Damped`, :func:`damped`);
* :mod:`bilevel.solvers.power` -- :func:`power_iteration` (the largest eigenvalue, for a Neumann step);
* :mod:`bilevel.solvers.neumann` -- :class:`Neumann` and :class:`AutoNeumann`;
* :mod:`bilevel.solvers.identity` -- :class:`Identity`;
* :mod:`bilevel.solvers.krylov` -- :class:`ConjugateGradient`;
* :mod:`bilevel.solvers.exact` -- :class:`Exact`, :func:`dense_jacobian` and :func:`check_size`;
* :mod:`bilevel.solvers.registry` -- :data:`SOLVERS` and :func:`make_solver`.
"""

from .base import Damped, LinearOperator, Solver, Tree, damped, is_symmetric
from .exact import Exact, check_size, dense_jacobian
from .identity import Identity
from .krylov import ConjugateGradient
from .neumann import AutoNeumann, Neumann
from .power import power_iteration
from .registry import SOLVERS, make_solver

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
