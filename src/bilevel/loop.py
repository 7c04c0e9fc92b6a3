"""The one loop: the only code that decides *when* a hyperparameter step happens.

Lorraine, Vicol & Duvenaud (2020), Algorithm 1, and Clarke, Oldewage & Hernández-Lobato (2022), Alg. 1::

    repeat:  T times  w <- w - u(lambda, w; c_t)           (weight steps, context c_t)
             lambda <- HyperOpt(lambda, dL_V/dlambda)       (one hyperparameter step)

*When* is a value, a schedule (:mod:`bilevel.schedules`, re-exported here): :class:`Every` (every T
weight steps, optionally re-training from the initial weights first: Vicol et al.'s cold start, and at most
``limit`` hyperparameter steps), :class:`HyperFirst` (the hyperparameter step before the T weight steps:
Vicol et al.'s outer-step-first bilevel optimiser) or :class:`Adaptive` (every T while the hyperparameters
move, rarer once they settle). *How* a hyperparameter step is computed is the tuner's strategy
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
from typing import Any

from .schedules import Adaptive, Every, HyperFirst, Schedule

__all__ = ["Schedule", "Every", "HyperFirst", "Adaptive", "run"]


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
    t's context, one before it (``HyperFirst``) on the context of the weight step that follows.

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
    for _ in range(steps):
        batch = train_batches()
        if schedule.first and schedule.due(tuner.t + 1, tuner.hyper_steps):  # at w_t, on the batch about to be used
            _hyper(tuner, schedule, batch, train_batches, val_batches)
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
    observe = getattr(schedule, "observe", None)  # a schedule that adapts to how far the step moved
    before = tuner.describe() if observe is not None else None
    tuner.last_hypergradient = tuner.strategy.hyper_step(tuner, batch, val)
    tuner.hyper_steps += 1
    if observe is not None:
        observe(tuner, before)
    tuner.callback("on_hyper_step")
