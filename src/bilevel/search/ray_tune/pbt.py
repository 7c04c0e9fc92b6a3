"""PBT with the ratio mutation (Clarke et al. 2022, appendix B.8.2): ratios, their record, explored values clipped.

PBT mutates the hyperparameters *it* assigned to a trial, but a run that tunes its own hyperparameters
online has since moved them: the run's *current* values are multiplied by PBT's ``new / old``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .runs import Rescalable

__all__ = ["pbt_ratios", "apply_pbt_mutation", "mutation_record", "clip_to_domains"]


def pbt_ratios(
    new: Mapping[str, float], old: Mapping[str, float], names: Sequence[str] | None = None, rtol: float = 1e-12
) -> dict[str, float]:
    """The PBT mutation ``new / old`` of each hyperparameter that PBT changed (the ratio mutation of Clarke et
    al. 2022, B.8.2).

    Args:
        new: the values PBT now assigns the trial.
        old: the values PBT associated with the checkpoint.
        names: the hyperparameters considered (default: all of ``new``).
        rtol: values that agree within it count as unchanged (left out).

    Returns:
        Name -> ratio, for the changed names only.
    """
    out = {}
    for n in new if names is None else names:
        a, b = float(new[n]), float(old[n])
        if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
            raise ValueError(f"PBT values of {n!r} must be positive and finite, got new={a}, old={b}")
        if abs(a - b) > rtol * abs(b):
            out[n] = a / b
    return out


def apply_pbt_mutation(
    run: Rescalable, new: Mapping[str, float], old: Mapping[str, float], names: Sequence[str] | None = None
) -> dict[str, float]:
    """Multiply ``run``'s current hyperparameters by PBT's ``new / old`` (``run.rescale(name, ratio)``).

    Args:
        run: e.g. a :class:`ScheduledRun` or a :class:`bilevel.tuner.OnlineTuner`.
        new: the values PBT now assigns.
        old: the values PBT associated with the checkpoint.
        names: the hyperparameters considered (default: all of ``new``).

    Returns:
        The ratios applied (:func:`pbt_ratios`).
    """
    ratios = pbt_ratios(new, old, names)
    for n, r in ratios.items():
        run.rescale(n, r)
    return ratios


def mutation_record(
    step: int,
    trial: str | None,
    donor: str | None,
    old: Mapping[str, float],
    new: Mapping[str, float],
    ratios: Mapping[str, float],
    before: Mapping[str, float],
    after: Mapping[str, float],
    donor_member: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One applied PBT ratio mutation, as recorded in the trials' lineage.

    At ``step`` trial ``trial`` started from ``donor``'s checkpoint (written by the trial of member
    ``donor_member``) whose PBT values were ``old``; PBT assigned ``new``; the run's current values of
    ``names`` went from ``before`` (the donor's at its checkpoint) to ``after`` = ``before x ratios`` (then
    moved into the domain by the run's ``rescale``, e.g. a momentum pushed past 1).

    Args:
        step: the step of the checkpoint.
        trial: the trial restarting.
        donor: the trial that wrote the checkpoint.
        old: the PBT values of the checkpoint.
        new: the PBT values assigned now.
        ratios: :func:`pbt_ratios` of the two.
        before: the run's values at the checkpoint.
        after: the run's values after the mutation.
        donor_member: the member the donor trial trains.
        names: the hyperparameters recorded (default: those of ``new``).

    Returns:
        A JSON-ready dict of the above.
    """
    names = tuple(new) if names is None else tuple(names)
    return {
        "step": int(step),
        "trial": trial,
        "donor": donor,
        "donor_member": donor_member,
        "ratios": dict(ratios),
        "pbt_old": {n: float(old[n]) for n in names},
        "pbt_new": {n: float(new[n]) for n in names},
        "before": {n: float(before[n]) for n in names},
        "after": {n: float(after[n]) for n in names},
    }


def clip_to_domains(config: dict[str, Any], bounds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """PBT's ``custom_explore_fn`` (with ``bounds`` bound): explored values moved into their domains.

    A value on or past a finite end of the open domain is moved :data:`~bilevel.hparams.NATURAL_INIT_EPS`
    inside it (a momentum x 1.2 above 1 becomes ``1 - 1e-6``, as :meth:`~bilevel.tuner.OnlineTuner.rescale`
    does), then clipped into ``clip`` (a learning rate x 1.2 above 1 becomes 1). Values inside are unchanged
    (so the ratio new / old is PBT's factor unless a value was moved); names not in ``config`` are skipped.

    Args:
        config: the trial's explored config (changed in place).
        bounds: ``bounds[name]`` holds the open ``domain`` ``(low, high)`` of the hyperparameter and its
            ``clip`` (``(low, high)`` or ``None``).

    Returns:
        ``config``.
    """
    from ...hparams import NATURAL_INIT_EPS

    for n in bounds:
        if n not in config:
            continue
        v, (lo, hi), clip = float(config[n]), bounds[n]["domain"], bounds[n]["clip"]
        if math.isfinite(lo) and v <= lo:
            v = lo + NATURAL_INIT_EPS
        if math.isfinite(hi) and v >= hi:
            v = hi - NATURAL_INIT_EPS
        if clip is not None:
            v = min(max(v, clip[0]), clip[1])
        config[n] = v
    return config
