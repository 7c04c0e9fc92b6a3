"""ASHA's budget: its milestones (rungs) and the number of trials that matches a number of full runs."""

from __future__ import annotations

__all__ = ["asha_rungs", "asha_trials_for_budget"]


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's milestones (one bracket).

    Args:
        max_t: the last milestone.
        grace_period: the first.
        reduction_factor: the factor between milestones.

    Returns:
        ``grace * rf^k < max_t`` for k = 0, 1, ..., then ``max_t``.
    """
    if grace_period < 1 or max_t < grace_period or reduction_factor <= 1:
        raise ValueError(
            f"need 1 <= grace_period <= max_t and reduction_factor > 1; got grace_period={grace_period}, "
            f"max_t={max_t}, reduction_factor={reduction_factor}"
        )
    out, r = [], float(grace_period)
    while r < max_t:
        out.append(int(round(r)))
        r *= reduction_factor
    return out + [max_t]


def asha_trials_for_budget(paths: int, steps: int, grace_period: int, reduction_factor: float) -> int:
    """Trials that give ASHA the step budget of ``paths`` full runs (as Clarke et al. 2022, B.8.2).

    Non-parallel Hyperband spends the same effort on every rung, so ``n * grace`` steps per rung
    over ``len(rungs)`` rungs: ``n = paths * steps / (len(rungs) * grace)`` (their 4000 x 200 /
    (7 x 1) = 114 286 with grace 1, factor 4, 4000 steps).

    Args:
        paths: full-length runs whose budget to match.
        steps: their length.
        grace_period: ASHA's grace period.
        reduction_factor: ASHA's reduction factor.

    Returns:
        The number of ASHA trials.
    """
    rungs = asha_rungs(steps, grace_period, reduction_factor)
    return max(1, round(paths * steps / (len(rungs) * grace_period)))
