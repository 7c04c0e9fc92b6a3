"""Hyperparameter specifications: transforms, granularities, initialisation and clipping.

Gradient-based hyperparameter optimisation (Lorraine et al., 2020, "Optimizing
Millions of Hyperparameters by Implicit Differentiation"; Clarke et al., 2022,
"Scalable One-Pass Optimisation of High-Dimensional Weight-Update
Hyperparameters by Implicit Differentiation") runs an outer optimiser (e.g.
``torch.optim.Adam``) on an *unconstrained* ("raw" / optimisation-space)
vector ``phi`` and maps it to *natural* hyperparameter values
``lambda = T(phi)`` through a differentiable transform ``T``:

==============  =====================  ====================================
name            natural = T(raw)       raw = T^{-1}(natural)
==============  =====================  ====================================
``identity``    ``raw``                ``natural``
``log10``       ``10 ** raw``          ``log10(natural)``
``log``         ``exp(raw)``           ``log(natural)``
``logit``       ``sigmoid(raw)``       ``logit(natural)``
``softplus``    ``log(1 + exp(raw))``  ``natural + log(-expm1(-natural))``
==============  =====================  ====================================

Clarke et al. (2022), Appendix B.3, Table 5 optimise the learning rate and weight
decay in base-10 logarithmic space and momentum in inverse-sigmoid space, and
initialise by sampling uniformly

* learning rate: ``log10 lr ~ U[-6, -1]`` (natural range 1e-6 .. 0.1),
* weight decay: ``log10 wd ~ U[-7, -2]`` (natural range 1e-7 .. 0.01),
* momentum: ``mu ~ U[0, 1]`` in *natural* space (to explore values near 0 and 1),

and (Section 4) clip learning rates to ``[1e-10, 1]`` throughout. These are
available as :func:`learning_rate`, :func:`weight_decay`, :func:`momentum` and the
ready-made space :data:`CLARKE_TABLE5`.

Granularity
-----------
A hyperparameter is either one scalar for all weights (``"scalar"``), one scalar
per parameter group (``"group"``: like ``torch.optim`` parameter groups, e.g. one
learning rate for a backbone and one for a head), one scalar per parameter tensor
(``"tensor"``) or one value per weight element (``"element"``: Clarke et al.'s
high-dimensional learning rates "HDLR", Lorraine et al.'s per-weight decay). Raw
values live in a *flat* ``dict[str, Tensor]`` so that a ``torch.optim`` optimiser
can update them directly; keys are

* ``"<hp>"`` for a scalar hyperparameter (shape ``()``),
* ``"<hp>/group<i>"`` for group granularity (shape ``()``, ``i`` indexing
  :attr:`HyperParameter.groups`),
* ``"<hp>/<param_name>"`` for tensor / element granularity (shape ``()`` or the
  parameter's shape respectively).

:meth:`HyperParameterSpace.natural` maps such a dict to natural values grouped
by hyperparameter: a ``Tensor`` for scalars and ``{param_name: Tensor}`` for the
other granularities (for ``"group"``: every parameter of group ``i`` maps to the
*same* tensor ``T(raw["<hp>/group<i>"])``, so gradients through all of them
accumulate into the group's raw value) -- the convention consumed by :mod:`bilevel.updates` and
:mod:`bilevel.regularizers`. It uses pure tensor operations, so it also works
under :func:`torch.func.vmap` over a leading population dimension.

Clipping
--------
``clip=(lo, hi)`` is given in natural units but applied in raw space:
``natural = T(clamp(raw, T^{-1}(lo), T^{-1}(hi)))``. Because every transform is
monotone increasing this equals ``clamp(T(raw), lo, hi)`` up to rounding, with
the same gradient (``T'(raw)`` inside the box, ``0`` outside), but it never
evaluates ``T`` at extreme raw values: e.g. ``10 ** 400 = inf`` would otherwise
turn the gradient of a natural-space clamp into ``inf * 0 = nan``.

Package layout (one idea per module; every name is re-exported here, so ``bilevel.hparams.X`` is the name
to use):

* :mod:`bilevel.hparams.transforms`: :class:`Transform`, the predefined transforms, :func:`scaled_tanh`,
  :func:`get_transform`, :data:`NATURAL_INIT_EPS`;
* :mod:`bilevel.hparams.hyperparameter`: :class:`HyperParameter`, :class:`Granularity`;
* :mod:`bilevel.hparams.space`: :class:`HyperParameterSpace`;
* :mod:`bilevel.hparams.presets`: :func:`learning_rate`, :func:`weight_decay`, :func:`momentum`,
  :func:`per_weight_decay`, :data:`CLARKE_TABLE5`, :func:`for_rule`;
* :mod:`bilevel.hparams.start`: :func:`start_value`, :data:`ZERO_DECAY_START`.
"""

from __future__ import annotations

from .hyperparameter import Granularity, HyperParameter, InitSpace, NaturalValue
from .presets import CLARKE_TABLE5, Groups, for_rule, learning_rate, momentum, per_weight_decay, weight_decay
from .space import HyperParameterSpace
from .start import ZERO_DECAY_START, start_value
from .transforms import (
    IDENTITY,
    LOG,
    LOG10,
    LOGIT,
    NATURAL_INIT_EPS,
    SOFTPLUS,
    TRANSFORMS,
    ScaledTanh,
    Transform,
    get_transform,
    scaled_tanh,
)

__all__ = [
    "Transform",
    "IDENTITY",
    "LOG10",
    "LOG",
    "LOGIT",
    "SOFTPLUS",
    "ScaledTanh",
    "scaled_tanh",
    "TRANSFORMS",
    "get_transform",
    "Granularity",
    "Groups",
    "InitSpace",
    "NATURAL_INIT_EPS",
    "HyperParameter",
    "HyperParameterSpace",
    "NaturalValue",
    "learning_rate",
    "weight_decay",
    "momentum",
    "per_weight_decay",
    "CLARKE_TABLE5",
    "for_rule",
    "start_value",
    "ZERO_DECAY_START",
]
