"""Schedules: *when* the one loop (:func:`bilevel.loop.run`) takes a hyperparameter step, as values.

A schedule answers ``due(t, taken)``: does a hyperparameter step belong to weight step t (counted from 1),
after ``taken`` of them? :class:`Every` is Lorraine et al.'s (2020) Algorithm 1 (every T weight steps; with
``cold_steps`` Vicol et al.'s (2021) cold start), :class:`HyperFirst` Vicol et al.'s outer-step-first bilevel
optimiser, :class:`Adaptive` a step every T while the hyperparameters move and ever rarer once they settle
(the one-pass overhead, issue 25).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

__all__ = ["Schedule", "Every", "HyperFirst", "Adaptive"]


class Schedule(Protocol):
    """When the hyperparameter steps happen, as a function of the weight-step count t (>= 1)."""

    @property
    def first(self) -> bool:
        """Whether the hyperparameter step comes before the weight steps of its period."""
        ...

    @property
    def cold_steps(self) -> int | None:
        """Weight steps of a re-training from the initial weights before each hyperparameter step, or ``None``."""
        ...

    def due(self, t: int, taken: int) -> bool:
        """Whether a hyperparameter step belongs to weight step ``t`` (after it; before it when ``first``).

        Args:
            t: the weight step, counted from 1.
            taken: the hyperparameter steps taken so far.

        Returns:
            ``True`` when the step is due.
        """
        ...


@dataclass(frozen=True)
class Every:
    """A hyperparameter step after every ``interval`` weight steps (Lorraine et al. 2020, Alg. 1; T = ``interval``).

    Args:
        interval: T, weight steps per hyperparameter step (>= 1).
        cold_steps: ``None`` (warm start: go on from the current weights) or, for Vicol et al.'s (2021)
            cold start, the weight steps of a re-training from the initial weights before each
            hyperparameter step.
        limit: at most this many hyperparameter steps (then weight steps only), or ``None``.
    """

    interval: int = 10
    cold_steps: int | None = None
    limit: int | None = None
    first = False

    def __post_init__(self) -> None:
        if int(self.interval) < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.cold_steps is not None and self.cold_steps < 0:
            raise ValueError(f"cold_steps must be >= 0, got {self.cold_steps}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")

    def due(self, t: int, taken: int) -> bool:
        """``t % interval == 0`` while fewer than ``limit`` steps were taken.

        Args:
            t: the weight step, counted from 1.
            taken: the hyperparameter steps taken so far.

        Returns:
            Whether a hyperparameter step follows weight step ``t``.
        """
        return t % self.interval == 0 and (self.limit is None or taken < self.limit)


@dataclass(frozen=True)
class HyperFirst(Every):
    """A hyperparameter step *before* every ``interval`` weight steps (Vicol et al. 2021's bilevel optimiser).

    Weight steps t = k T + 1, ..., (k + 1) T follow the k-th hyperparameter step; the first one is taken at
    the initial weights, each on the training context of the weight step that follows it. Arguments as
    :class:`Every`.
    """

    first = True

    def due(self, t: int, taken: int) -> bool:
        """``(t - 1) % interval == 0`` while fewer than ``limit`` steps were taken.

        Args:
            t: the weight step about to be taken, counted from 1.
            taken: the hyperparameter steps taken so far.

        Returns:
            Whether a hyperparameter step comes before weight step ``t``.
        """
        return (t - 1) % self.interval == 0 and (self.limit is None or taken < self.limit)


@dataclass
class Adaptive:
    """A step every ``interval`` weight steps while the hyperparameters move; ever rarer once they settle.

    After each hyperparameter step the gap to the next one doubles (up to ``max_interval``) when no tuned
    hyperparameter's mean natural value (of any member) moved by more than ``settle`` times its size, and falls
    back to ``interval`` when one did. With ``max_interval == interval`` it is :class:`Every` (``interval``).
    Its state (the gap and the next step) is part of the tuner's checkpoint, so give each tuner its own.

    Args:
        interval: T, the shortest gap (>= 1).
        max_interval: the longest gap (>= ``interval``).
        settle: the relative move below which a hyperparameter counts as settled (> 0).
        cold_steps: as :class:`Every`'s.
    """

    interval: int = 10
    max_interval: int = 80
    settle: float = 0.01
    cold_steps: int | None = None
    first = False
    gap: int = field(init=False)
    next: int = field(init=False)

    def __post_init__(self) -> None:
        if int(self.interval) < 1 or self.max_interval < self.interval:
            raise ValueError(f"need 1 <= interval <= max_interval, got {self.interval} and {self.max_interval}")
        if not self.settle > 0:
            raise ValueError(f"settle must be > 0, got {self.settle}")
        self.gap, self.next = self.interval, self.interval

    def due(self, t: int, taken: int) -> bool:
        """Whether weight step ``t`` has reached the next hyperparameter step.

        Args:
            t: the weight step, counted from 1.
            taken: the hyperparameter steps taken so far (unused: the gap decides).

        Returns:
            ``t >= next``.
        """
        return t >= self.next

    def observe(self, tuner: Any, before: dict[str, Tensor]) -> None:
        """After a hyperparameter step: the next gap, from how far the step moved the values.

        Args:
            tuner: the loop (its ``t`` and ``describe()``, per-member mean natural values).
            before: ``describe()`` before the step.
        """
        after = tuner.describe()
        moved = any(
            bool(((after[k] - before[k]).abs() > self.settle * before[k].abs()).any()) for k in after if k in before
        )
        self.gap = self.interval if moved else min(2 * self.gap, self.max_interval)
        self.next = tuner.t + self.gap

    def state_dict(self) -> dict[str, int]:
        """The gap and the next step."""
        return {"gap": self.gap, "next": self.next}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.gap, self.next = int(sd["gap"]), int(sd["next"])
