"""bilevel: gradient-based hyperparameter and bilevel optimisation by implicit differentiation.

Front door: :class:`Tuner` tunes an ``nn.Module``'s optimiser hyperparameters (``bilevel.optim``) or a
loss-form penalty (:class:`PerWeightDecay`) online, with your DataLoaders (Algorithm 1 of Lorraine et al. 2020 /
Clarke et al. 2022, :class:`bilevel.tuner.OnlineTuner`).

Low-level contract: :func:`hypergradient` (IFT, Lorraine et al. 2020 eq. 2-3; weight-update form, Clarke et
al. 2022 eq. 4-7), solvers :class:`Neumann`, :class:`AutoNeumann`, :class:`ConjugateGradient`,
:class:`Identity`, :class:`Exact` (all with Vicol et al. 2021's ``damping``), and
:func:`unrolled_hypergradient` for differentiation through K steps. *How* a hyperparameter step is computed is
a :mod:`bilevel.strategies` object (IFT, unrolled, Baydin, none), *when* a :mod:`bilevel.loop` schedule
(``Every(T)``, cold start, ``HyperFirst``): both are values the :class:`Tuner` and
:class:`~bilevel.tuner.OnlineTuner` take. :mod:`bilevel.threads` chooses CPU threads that hold up on a shared
machine, and :func:`bilevel.allocator.keep_freed_memory` spares a CPU run the page faults of its large
temporaries.
"""

from . import allocator, loop, strategies, threads
from . import updates as optim
from .errors import NeumannDivergenceError, NonFiniteError, NotSymmetricError
from .hypergradient import hypergradient, largest_eigenvalue, linearise
from .module_tuner import Tuner
from .regularizers import PerWeightDecay
from .solvers import AutoNeumann, ConjugateGradient, Exact, Identity, Neumann
from .tuner import OnlineTuner, TunerConfig
from .unroll import unrolled_hypergradient

__version__ = "0.1.0"

__all__ = [
    "Tuner",
    "optim",
    "strategies",
    "loop",
    "threads",
    "allocator",
    "PerWeightDecay",
    "OnlineTuner",
    "TunerConfig",
    "hypergradient",
    "unrolled_hypergradient",
    "linearise",
    "largest_eigenvalue",
    "Neumann",
    "AutoNeumann",
    "ConjugateGradient",
    "Identity",
    "Exact",
    "NonFiniteError",
    "NeumannDivergenceError",
    "NotSymmetricError",
]
