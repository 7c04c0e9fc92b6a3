"""Where a tuned hyperparameter starts from the value a user gave.

Defines :func:`~bilevel.hparams.start_value` and :data:`~bilevel.hparams.ZERO_DECAY_START`, re-exported by
:mod:`bilevel.hparams`.
"""

from __future__ import annotations

import math
import warnings

from .hyperparameter import HyperParameter

__all__ = [
    "start_value",
    "ZERO_DECAY_START",
]

#: Where a decay named at 0 starts (an optimiser's ``weight_decay`` or a penalty's ``init``): a log10-space
#: hyperparameter cannot move from 0 (its raw value is -inf), and from much smaller values the hypergradient in
#: raw space, ``lambda * dL_V/dlambda``, is too small to move it against its noise.
ZERO_DECAY_START = 1e-4


def start_value(h: HyperParameter, value: float, *, decay: bool, who: str = "") -> float:
    """Where hyperparameter ``h`` starts from the value ``value`` a user gave (warns when it has to move it).

    A value the transform can move is kept. A decay (``decay``) at 0 starts at :data:`ZERO_DECAY_START`; a
    learning rate (or another log-space value) at 0 is refused; a value on a finite edge of its domain (a
    momentum of 0 or 1) moves 1 % of the domain inside. Used by :class:`bilevel.Tuner` and the integrations, so
    every door starts a hyperparameter the same way.

    Args:
        h: the hyperparameter's specification (its transform's domain and clip).
        value: the natural value given (an optimiser's group value, a penalty's ``init``).
        decay: whether ``h`` is a decay (0 then starts at :data:`ZERO_DECAY_START` instead of being refused).
        who: a prefix for messages, e.g. ``"HyperTuner: "``.

    Returns:
        The natural starting value.

    Raises:
        ValueError: a non-finite value, a non-decay log-space value <= 0, or a value outside ``h.clip``.
    """
    lo, hi = h.transform.domain
    if not math.isfinite(value):
        raise ValueError(f"{who}initial {h.name}={value} is not finite")
    moved = value
    if lo == 0 and math.isinf(hi) and value <= 0:
        if not decay:
            what = "a learning rate" if h.name == "lr" else f"{h.name} (tuned in {h.transform.name} space)"
            raise ValueError(f"{who}initial {h.name}={value}: {what} must be > 0 to be tuned")
        moved = ZERO_DECAY_START
    elif math.isfinite(lo) and math.isfinite(hi) and not lo < value < hi:
        margin = 1e-2 * (hi - lo)
        moved = lo + margin if value <= lo else hi - margin
    if h.clip is not None and not h.clip[0] <= moved <= h.clip[1]:
        raise ValueError(f"{who}initial {h.name}={value} lies outside its range {h.clip}")
    if moved != value:
        warnings.warn(
            f"{who}initial {h.name}={value} lies on the edge of its {h.transform.name} domain {h.transform.domain}, "
            f"where a tuned value cannot move; starting it at {moved:g} instead (pass another start to choose it)",
            UserWarning,
            stacklevel=4,
        )
    return moved
