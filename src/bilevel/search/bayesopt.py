"""Repeated Bayesian optimisation (Optuna) over any evaluation, the repeats trained side by side.

Each of ``repeats`` independent studies proposes ``samples`` points of a box ``space`` (one
``(low, high)`` range, or an Optuna distribution, per name), the first ``startup`` drawn at
random; a point (mapped by ``transform``, e.g. from log10 to natural values) is scored by a
user-supplied ``evaluate`` on a validation set, and a study's answer is the test loss of its point
with the lowest validation loss. At sample k every study is asked for one point and the
``repeats`` points are evaluated together by one call ``evaluate(k, points)`` -- e.g. trained as
one vectorised population (:mod:`bilevel.population`), so 32 repeats cost about as much wall time
as a few.

Library: **Optuna** (``optuna.samplers.GPSampler``, a Gaussian-process sampler with a Matern-5/2
kernel and log-expected-improvement; ``sampler="tpe"`` gives its TPE sampler). Clarke et al.
(2022, appendix B.5) used ``bayesian-optimization`` (Nogueira 2014); we use Optuna because it is
the more actively maintained of the two, its GP sampler is itself written in PyTorch (already our
dependency), and its ask-and-tell interface lets the repeats be evaluated together. The first
``startup`` samples are random (``n_startup_trials``; five by default, as the paper's).

A diverged point (no finite validation loss) is recorded as diverged and never selected; its
study is told the worst validation loss it has seen so far (a failed trial before any finite
one). Telling failures only (which Optuna's GP ignores) was measured here first: the GP kept
proposing learning rates past the divergence cliff (138 of 240 samples diverged on Energy,
``docs/ray.md``), so the penalty is what the sampler needs to learn where the cliff is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..population import derived_seed
from .ray_tune import require

if TYPE_CHECKING:
    from optuna import Study

#: ``evaluate(k, points)``: the ``repeats`` points of sample ``k`` (after ``transform``) -> their
#: ``{"val": [...], "test": [...]}`` losses (``None`` or non-finite: diverged), optionally with
#: ``"seconds"``, the time to attribute to the evaluation (else the call is timed).
Evaluate = Callable[[int, Sequence[Mapping[str, float]]], Mapping[str, Any]]


def distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions of a search space.

    Args:
        space: name -> an Optuna distribution, or a ``(low, high)`` pair (a uniform ``FloatDistribution``).

    Returns:
        name -> Optuna distribution.
    """
    optuna = require("optuna")
    return {
        name: d
        if isinstance(d, optuna.distributions.BaseDistribution)
        else optuna.distributions.FloatDistribution(float(d[0]), float(d[1]))
        for name, d in space.items()
    }


def make_study(seed: int, sampler: str = "gp", startup: int = 5) -> Study:
    """A minimising in-memory Optuna study with the GP (or TPE) sampler, ``startup`` random samples first.

    Args:
        seed: the sampler's seed.
        sampler: ``"gp"`` or ``"tpe"``.
        startup: random samples before the model proposes.

    Returns:
        The study.

    Raises:
        ValueError: an unknown sampler.
    """
    optuna = require("optuna")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # e.g. "greenlet unavailable"
    if sampler == "gp":
        s = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    elif sampler == "tpe":
        s = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    else:
        raise ValueError(f"unknown sampler {sampler!r}: use 'gp' or 'tpe'")
    return optuna.create_study(direction="minimize", sampler=s)


def replay(study: Study, records: Sequence[Mapping[str, Any]], dists: Mapping[str, Any]) -> None:
    """Tell a fresh study the samples of an interrupted run.

    Args:
        study: the fresh study.
        records: one repeat's samples, as :func:`run` stores them.
        dists: the space's :func:`distributions`.
    """
    optuna = require("optuna")
    for r in records:
        told = r.get("told", r["val"])
        study.add_trial(
            optuna.trial.create_trial(
                params=r["params"],
                distributions=dict(dists),
                value=told,
                state=optuna.trial.TrialState.COMPLETE if told is not None else optuna.trial.TrialState.FAIL,
            )
        )


def objective(val: float | None, seen: Sequence[float | None]) -> float | None:
    """What a study is told for one sample.

    Args:
        val: the sample's validation loss (``None``: diverged).
        seen: the validation losses of the repeat's earlier samples.

    Returns:
        ``val``, or for a diverged sample the worst finite one seen (``None`` if there is none: the trial is
        then told it failed).
    """
    if val is not None:
        return val
    finite = [v for v in seen if v is not None]
    return max(finite) if finite else None


def incumbent(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float | None], list[float | None]]:
    """The incumbent of one repeat after each sample.

    Args:
        records: the repeat's samples, in order.

    Returns:
        ``(cumulative seconds, validation losses, test losses)`` of the best-validation sample so far,
        one entry per sample (``None`` until a sample succeeded).
    """
    times, vals, tests, t, best = [], [], [], 0.0, None
    for r in records:
        t += r["seconds"]
        if r["val"] is not None and (best is None or r["val"] < best["val"]):
            best = r
        times.append(t)
        vals.append(None if best is None else best["val"])
        tests.append(None if best is None else best["test"])
    return times, vals, tests


def run(
    evaluate: Evaluate,
    space: Mapping[str, Any],
    *,
    repeats: int = 32,
    samples: int = 30,
    startup: int = 5,
    sampler: str = "gp",
    seed: int = 0,
    transform: Callable[[Mapping[str, float]], dict[str, float]] | None = None,
    state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``repeats`` Bayesian optimisations of ``samples`` evaluations each over ``space``.

    Study r is seeded ``derived_seed(seed, r)`` (``seed * 1_000_003 + r``, :func:`bilevel.population.derived_seed`:
    other base seeds give other studies). At sample k the ``repeats`` proposed points are scored by one call
    ``evaluate(k, points)``; the evaluation time (its ``"seconds"``, else the call's) is shared equally by the
    repeats.

    Args:
        evaluate: ``evaluate(k, points) -> {"val": [...], "test": [...][, "seconds": s]}`` (:data:`Evaluate`).
        space: name -> ``(low, high)`` or an Optuna distribution (:func:`distributions`).
        repeats: independent optimisations, evaluated together.
        samples: evaluations per optimisation.
        startup: random samples before the model proposes.
        sampler: ``"gp"`` or ``"tpe"``.
        seed: the base seed.
        transform: maps a proposed point to what ``evaluate`` receives (default: as proposed).
        state: a saved state to resume from (the studies are rebuilt by :func:`replay`).
        save: called with the state after each sample.
        progress: called with the number of samples done.

    Returns:
        Per-repeat ``final_test_loss``/``final_val_loss`` (of the best-validation sample), ``seconds`` (time
        attributed to the repeat), ``wall_seconds``, the ``incumbent`` curves, ``diverged_samples`` and every
        sample (``records``: ``params`` as proposed, their ``natural`` (transformed) values, ``val``, ``test``,
        what the study was ``told`` and ``seconds``).

    Raises:
        ValueError: ``samples < 1``, ``repeats < 1`` or ``startup`` outside ``0 .. samples``.
    """
    if samples < 1 or repeats < 1 or not 0 <= startup <= samples:
        raise ValueError(
            f"need samples >= 1, repeats >= 1 and 0 <= startup <= samples; got "
            f"samples={samples}, repeats={repeats}, startup={startup}"
        )
    optuna = require("optuna")
    dists = distributions(space)
    records: list[list[dict[str, Any]]] = [list(x) for x in (state or {}).get("records", [[] for _ in range(repeats)])]
    studies = [make_study(derived_seed(seed, r), sampler, startup) for r in range(repeats)]
    for study, recs in zip(studies, records):
        replay(study, recs, dists)
    if progress is not None and records[0]:
        progress(len(records[0]))
    for k in range(len(records[0]), samples):
        trials = [s.ask(dists) for s in studies]
        points = [dict(transform(t.params)) if transform is not None else dict(t.params) for t in trials]
        start = time.perf_counter()
        res = evaluate(k, points)
        sec = float(res.get("seconds", time.perf_counter() - start)) / repeats
        for r, (study, trial) in enumerate(zip(studies, trials)):
            val, test = res["val"][r], res["test"][r]
            ok = val is not None and test is not None and math.isfinite(val)
            told = objective(val if ok else None, [x["val"] for x in records[r]])
            if told is not None:
                study.tell(trial, told)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            records[r].append(
                {
                    "params": dict(trial.params),
                    "natural": points[r],
                    "val": val if ok else None,
                    "test": test if ok else None,
                    "told": told,
                    "seconds": sec,
                }
            )
        if save is not None:
            save({"records": records})
        if progress is not None:
            progress(1)
    finals = [incumbent(recs) for recs in records]
    return {
        "final_test_loss": [f[2][-1] for f in finals],
        "final_val_loss": [f[1][-1] for f in finals],
        "seconds": [f[0][-1] for f in finals],
        "wall_seconds": sum(f[0][-1] for f in finals),
        "incumbent": {"seconds": [f[0] for f in finals], "test_loss": [f[2] for f in finals]},
        "diverged_samples": sum(r["val"] is None for recs in records for r in recs),
        "records": records,
    }
