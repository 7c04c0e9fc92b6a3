"""Predefined hyperparameters: Clarke et al. (2022) Table 5's learning rate, weight decay and momentum.

:func:`~bilevel.hparams.learning_rate`, :func:`~bilevel.hparams.weight_decay`,
:func:`~bilevel.hparams.momentum`, :func:`~bilevel.hparams.per_weight_decay`, the space
:data:`~bilevel.hparams.CLARKE_TABLE5`, and :func:`~bilevel.hparams.for_rule`, the parametrisation of an
optimiser hyperparameter of :mod:`bilevel.updates` by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from .hyperparameter import Granularity, HyperParameter, InitSpace, _check_groups
from .space import HyperParameterSpace
from .transforms import LOG10, LOGIT, Transform

__all__ = [
    "Groups",
    "learning_rate",
    "weight_decay",
    "momentum",
    "per_weight_decay",
    "CLARKE_TABLE5",
    "for_rule",
]

# --------------------------------------------------------------------------- predefined specs


Groups = Sequence[Sequence[str]]
"""Parameter names per group (group granularity), e.g. ``[["w1", "w2"], ["b1", "b2"]]``."""


def _table5(
    name: str,
    transform: Transform,
    low: float,
    high: float,
    init_space: InitSpace,
    granularity: Granularity | str,
    clip: tuple[float, float] | None,
    params: Sequence[str] | None,
    groups: Groups | None,
) -> HyperParameter:
    """A Table 5 hyperparameter: initial range ``[low, high]`` in ``init_space``, at the given granularity."""
    return HyperParameter(
        name,
        transform,
        low,
        high,
        init_space,
        Granularity(granularity),
        clip,
        tuple(params) if params is not None else None,
        None if groups is None else _check_groups(name, groups),
    )


def learning_rate(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = (1e-10, 1.0),
    params: Sequence[str] | None = None,
    name: str = "lr",
    groups: Groups | None = None,
) -> HyperParameter:
    """Learning rate, Clarke et al. (2022) Table 5: optimised as ``log10 lr``, init
    ``log10 lr ~ U[-6, -1]``; clipped to ``[1e-10, 1]`` (their Section 4).
    ``granularity="element"`` gives their high-dimensional learning rates (HDLR);
    ``granularity="group"`` with ``groups=`` one learning rate per parameter group.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units, or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return _table5(name, LOG10, -6.0, -1.0, "raw", granularity, clip, params, groups)


def weight_decay(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = None,
    params: Sequence[str] | None = None,
    name: str = "weight_decay",
    groups: Groups | None = None,
) -> HyperParameter:
    """Weight decay, Clarke et al. (2022) Table 5: optimised as ``log10 wd``, init
    ``log10 wd ~ U[-7, -2]``; ``groups=`` for ``granularity="group"``.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units, or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return _table5(name, LOG10, -7.0, -2.0, "raw", granularity, clip, params, groups)


def momentum(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = None,
    params: Sequence[str] | None = None,
    name: str = "momentum",
    groups: Groups | None = None,
) -> HyperParameter:
    """Momentum, Clarke et al. (2022) Table 5: optimised as ``logit mu`` (inverse
    sigmoid), initialised uniformly in *natural* space ``mu ~ U[0, 1]``; ``groups=`` for
    ``granularity="group"``.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units (inside ``(0, 1)``), or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return _table5(name, LOGIT, 0.0, 1.0, "natural", granularity, clip, params, groups)


def per_weight_decay(params: Sequence[str] | None = None, name: str = "weight_decay") -> HyperParameter:
    """One weight-decay value per weight element (Lorraine et al. 2020, Sec. 5.1 per-weight
    L2; Clarke et al. 2022 Table 5 ranges): ``weight_decay(granularity="element")``.

    Args:
        params: the names of the parameters it applies to (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).

    Returns:
        The :class:`HyperParameter`.
    """
    return weight_decay(granularity="element", params=params, name=name)


#: Clarke et al. (2022) Table 5: scalar learning rate (clipped to [1e-10, 1]),
#: weight decay and momentum.
CLARKE_TABLE5 = HyperParameterSpace([learning_rate(), weight_decay(), momentum()])


def for_rule(
    name: str,
    granularity: Granularity | str = "scalar",
    params: Sequence[str] | None = None,
    groups: Groups | None = None,
) -> HyperParameter:
    """The parametrisation of an optimiser hyperparameter called ``name`` (:mod:`bilevel.updates` names).

    ``lr``: :func:`learning_rate` (log10, clipped to [1e-10, 1]); ``weight_decay`` and ``eps``:
    log10; ``momentum``, ``dampening``, ``beta1``, ``beta2`` and RMSprop's ``alpha``: logit (their
    domain is (0, 1)). Initial ranges are Clarke et al. (2022) Table 5's where they give one.

    Args:
        name: the rule's hyperparameter name.
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        params: parameter names for tensor/element granularity (``None``: all).
        groups: parameter names per group for group granularity (e.g. ``TorchTwin.groups`` of
            :func:`bilevel.updates.twin`); raw keys ``"<name>/group<i>"``.

    Returns:
        The :class:`HyperParameter`.
    """
    if name == "lr":
        return learning_rate(granularity, params=params, groups=groups)
    if name == "momentum":
        return momentum(granularity, params=params, groups=groups)
    if name in ("weight_decay", "eps"):
        return weight_decay(granularity, params=params, name=name, groups=groups)
    if name in ("dampening", "beta1", "beta2", "alpha"):  # in (0, 1) like a momentum: logit, U[0, 1] init
        return momentum(granularity, params=params, name=name, groups=groups)
    raise ValueError(
        f"no default parametrisation for an optimiser hyperparameter called {name!r}; "
        "known: lr, momentum, weight_decay, eps, dampening, beta1, beta2, alpha"
    )
