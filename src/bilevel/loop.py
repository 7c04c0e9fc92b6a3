"""The one loop: the only code that decides *when* a hyperparameter step happens.

Lorraine, Vicol & Duvenaud (2020), Algorithm 1, and Clarke, Oldewage & Hernández-Lobato (2022), Alg. 1::

    repeat:  T times  w <- w - u(lambda, w; c_t)           (weight steps, context c_t)
             lambda <- HyperOpt(lambda, dL_V/dlambda)       (one hyperparameter step)

*When* is a value, a schedule: :class:`Every` (every T weight steps, optionally re-training from the
initial weights first: Vicol et al.'s cold start, and at most ``limit`` hyperparameter steps) or
:class:`HyperFirst` (the hyperparameter step before the T weight steps: Vicol et al.'s outer-step-first
bilevel optimiser). *How* a hyperparameter step is computed is the tuner's strategy
(:mod:`bilevel.strategies`: IFT, unrolled, Baydin, none). :func:`run` drives a
:class:`bilevel.tuner.OnlineTuner` (or anything with its ``step``/``callback``/``record`` methods) through
``steps`` weight steps and fires the callbacks (:mod:`bilevel.callbacks`) on every path:
``on_weight_step`` after each weight step, ``on_interval`` at each scheduled boundary (before the
hyperparameter step), ``on_hyper_step`` after it (the hypergradient is ``tuner.last_hypergradient``),
``on_record`` at each record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Schedule", "Every", "HyperFirst", "run"]


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
        """``t % interval == 0`` while fewer than ``limit`` steps were taken (see :class:`Schedule`)."""
        return t % self.interval == 0 and (self.limit is None or taken < self.limit)


@dataclass(frozen=True)
class HyperFirst(Every):
    """A hyperparameter step *before* every ``interval`` weight steps (Vicol et al. 2021's bilevel optimiser).

    Weight steps t = k T + 1, ..., (k + 1) T follow the k-th hyperparameter step; the first one is taken at
    the initial weights. Arguments as :class:`Every`.
    """

    first = True

    def due(self, t: int, taken: int) -> bool:
        """``(t - 1) % interval == 0`` while fewer than ``limit`` steps were taken (see :class:`Schedule`)."""
        return (t - 1) % self.interval == 0 and (self.limit is None or taken < self.limit)


def run(
    tuner: Any,
    steps: int,
    train_batches: Callable[[], Any],
    val_batches: Callable[[], Any],
    *,
    schedule: Schedule | None = None,
    record_batches: tuple[Any, Any, Any | None] | None = None,
    record_every: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Take ``steps`` weight steps from the tuner's current step, with hyperparameter steps where ``schedule`` says.

    At a due step the loop fires ``on_interval``, then (when the tuner tunes anything) re-trains from the
    initial weights for a cold-start schedule, and asks the tuner's strategy for the hyperparameter step
    (``tuner.strategy.hyper_step(tuner, batch, val_batches)``: IFT and unrolled draw one validation
    context, Baydin's uses the step's training batch), then fires ``on_hyper_step``. The training context
    of a weight step is drawn just before it; a hyperparameter step after weight step t is computed on
    t's context.

    Args:
        tuner: a :class:`bilevel.tuner.OnlineTuner`.
        steps: the number of weight steps (>= 0).
        train_batches: returns the next training context (a batch, or a batch with noise).
        val_batches: returns the next validation context.
        schedule: when to take hyperparameter steps (``None``: the tuner's ``schedule``).
        record_batches: ``(train, val, test)`` batches for ``tuner.record`` every ``record_every`` weight
            steps, or ``None`` for no records.
        record_every: weight steps between two records (``None``: ``tuner.cfg.record_every``).
        progress: called with 1 after every weight step (e.g. a progress bar's ``update``), or ``None``.

    Returns:
        ``tuner.history``.

    Raises:
        ValueError: when ``steps < 0``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    schedule = schedule if schedule is not None else tuner.schedule
    every = record_every if record_every is not None else tuner.cfg.record_every
    start = time.perf_counter()
    batch = None
    for _ in range(steps):
        if schedule.first and schedule.due(tuner.t + 1, tuner.hyper_steps):
            _hyper(tuner, schedule, batch, train_batches, val_batches)
        batch = train_batches()
        tuner.step(batch)
        if not schedule.first and schedule.due(tuner.t, tuner.hyper_steps):
            _hyper(tuner, schedule, batch, train_batches, val_batches)
        if record_batches is not None and tuner.t % every == 0:
            tuner.record(*record_batches)
        if progress is not None:
            progress(1)
    tuner.history.seconds += time.perf_counter() - start
    return tuner.history


def _hyper(
    tuner: Any, schedule: Schedule, batch: Any, train_batches: Callable[[], Any], val: Callable[[], Any]
) -> None:
    """One scheduled boundary: ``on_interval``, the cold re-training, the strategy's step, ``on_hyper_step``."""
    tuner.callback("on_interval")
    if not tuner.tunes:
        return
    if schedule.cold_steps is not None:  # Vicol et al.'s (2021) cold start: re-train from the initial weights
        tuner.params = {k: v.clone() for k, v in tuner.initial_params.items()}
        tuner.state = tuner.rule.init_state(tuner.params)
        tuner.reset_good_state()
        for _ in range(schedule.cold_steps):  # not counted (t stays), no callbacks
            tuner.weight_step(train_batches())
    tuner.last_hypergradient = tuner.strategy.hyper_step(tuner, batch, val)
    tuner.hyper_steps += 1
    tuner.callback("on_hyper_step")
