"""Strategies: *how* a hyperparameter step is computed (the loop, :mod:`bilevel.loop`, decides *when*).

* :class:`IFT`: the implicit-function-theorem hypergradient with a linear solver (Lorraine et al. 2020;
  Clarke et al. 2022); residual: the update map or the training loss's gradient;
* :class:`SharedGradient`: opt-in wrapper of :class:`IFT`: the next weight step reuses its training gradient;
* :class:`Unrolled`: Diff-through-Opt, exact, through the last ``lookback`` weight steps;
* :class:`Baydin`: hypergradient descent through the step just taken (Baydin et al. 2018), every step;
* :class:`AuthorsBaydin`: the form of Clarke et al.'s code for their Baydin baseline;
* :class:`NoTuning`: hyperparameters fixed.

:func:`from_config` maps :class:`bilevel.tuner.TunerConfig`'s ``mode`` (``"ift"``, ``"unroll"``,
``"baydin"``, ``"none"``), ``solver``, ``implicit`` and ``share_gradient`` to one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import MODES
from .base import Strategy
from .baydin import AuthorsBaydin, Baydin
from .ift import IFT, default_solver
from .none import NoTuning
from .shared import SharedEntry, SharedGradient
from .unrolled import Unrolled

if TYPE_CHECKING:
    from ..tuner import TunerConfig

__all__ = [
    "Strategy",
    "IFT",
    "default_solver",
    "SharedGradient",
    "SharedEntry",
    "Unrolled",
    "Baydin",
    "AuthorsBaydin",
    "NoTuning",
    "MODES",
    "from_config",
]


def from_config(cfg: TunerConfig) -> Strategy:
    """The strategy ``cfg.mode`` names, with ``cfg.solver``, ``cfg.implicit`` and ``cfg.share_gradient``.

    Args:
        cfg: the loop's configuration.

    Returns:
        A new strategy.

    Raises:
        ValueError: for an unknown mode.
    """
    if cfg.mode == "ift":
        ift = IFT(cfg.solver, cfg.implicit)
        return SharedGradient(ift) if cfg.share_gradient else ift
    if cfg.mode == "unroll":
        return Unrolled(cfg.lookback)
    if cfg.mode == "baydin":
        return Baydin()
    if cfg.mode == "none":
        return NoTuning()
    raise ValueError(f"unknown mode {cfg.mode!r}; known: {list(MODES)}")
