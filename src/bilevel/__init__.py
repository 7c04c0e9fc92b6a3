"""bilevel: gradient-based hyperparameter and bilevel optimisation by implicit differentiation.

Core contract: :func:`hypergradient` (IFT, Lorraine et al. 2020; weight-update
form, Clarke et al. 2022), solvers :class:`Neumann`, :class:`ConjugateGradient`,
:class:`Identity`, :class:`Exact` (all with Vicol et al. 2021's ``damping``),
and :func:`unrolled_hypergradient` for differentiation through K steps.
"""

from .errors import NeumannDivergenceError, NonFiniteError, NotSymmetricError
from .hypergradient import hypergradient, largest_eigenvalue, linearise
from .solvers import ConjugateGradient, Exact, Identity, Neumann
from .unroll import unrolled_hypergradient

__version__ = "0.1.0"

__all__ = [
    "hypergradient", "unrolled_hypergradient", "linearise", "largest_eigenvalue",
    "Neumann", "ConjugateGradient", "Identity", "Exact",
    "NonFiniteError", "NeumannDivergenceError", "NotSymmetricError",
]
