"""One member per Ray Tune trial under ASHA or PBT (with the ratio mutation): :func:`run_scheduled`."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .experiment import _config, _results, fit, ray_session
from .extras import require
from .incumbents import incumbent
from .pbt import apply_pbt_mutation, clip_to_domains, mutation_record
from .runs import DIVERGED, ScheduledRun
from .trial import _named

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler

__all__ = ["scheduled_trainable", "run_scheduled"]


def scheduled_trainable(
    factory: Callable[[dict[str, Any]], ScheduledRun], names: Sequence[str], steps: int
) -> Callable[[dict[str, Any]], None]:
    """Ray Tune trainable of :func:`run_scheduled`: one member trained to ``steps`` under ASHA or PBT.

    The run ``factory(config)`` (one member; its hyperparameters ``names`` at the values ``config[name]``)
    reports ``run.losses()`` (a diverged run's, or a non-finite one, as :data:`DIVERGED`) every
    ``config["report_every"]`` steps. On a restart from a PBT checkpoint, PBT's mutation is applied to
    the run's current hyperparameters as the ratio new / old (:func:`apply_pbt_mutation`), and recorded.
    A checkpoint holds the run, the PBT values it was trained under (``pbt_values``), the trial that wrote
    it and the mutations applied along this path so far (``mutations``: inherited from the donor on an
    exploit, one entry appended per applied mutation; see :func:`mutation_record`).

    Args:
        factory: builds the trial's :class:`ScheduledRun` (a module-level function).
        names: the hyperparameters the scheduler assigns.
        steps: the training steps.

    Returns:
        The trainable (named after ``factory``).
    """
    names = tuple(names)

    def scheduled_trial(config: dict[str, Any]) -> None:
        # read from the package when the trial runs, so that replacing them there (as the tests do) reaches it
        from . import _trial_id, report, restored_state

        torch.set_num_threads(int(config.get("threads", 1)))
        values = {n: float(config[n]) for n in names}
        run = factory(config)
        trial_id = _trial_id()
        state = restored_state()
        ratios: dict[str, float] = {}
        mutations: list[dict[str, Any]] = []
        if state is not None:
            run.load_state_dict(state["run"])
            mutations = list(state.get("mutations", []))
            before = run.hparams()
            ratios = apply_pbt_mutation(run, values, state["pbt_values"], names)
            if ratios:
                mutations.append(
                    mutation_record(
                        run.step,
                        trial_id,
                        state.get("writer"),
                        state["pbt_values"],
                        values,
                        ratios,
                        before,
                        run.hparams(),
                        donor_member=state.get("member"),
                        names=names,
                    )
                )
        every, ckpt_every = int(config["report_every"]), int(config["checkpoint_every"])
        t0 = float(config["t0"])
        while run.step < steps:
            run.advance(min(every, steps - run.step))
            t = run.step
            alive = bool(run.alive)
            losses = {k: v if alive and math.isfinite(v) else DIVERGED for k, v in run.losses().items()}
            metrics = {
                "step": t,
                **losses,
                "diverged": not alive,
                "wall": time.time() - t0,
                **{f"now_{k}": v for k, v in run.hparams().items()},
                **{f"ratio_{k}": v for k, v in ratios.items()},
                "mutations": len(mutations),
                "mutated_at": mutations[-1]["step"] if ratios else -1,
            }
            if t >= steps:  # the path's mutations with its final losses (a JSON string: Tune keeps it as is)
                metrics["lineage"] = json.dumps(mutations)
            if t % ckpt_every == 0 or t >= steps:
                report(
                    metrics,
                    {
                        "run": run.state_dict(),
                        "pbt_values": values,
                        "writer": trial_id,
                        "member": int(config["member"]),
                        "mutations": mutations,
                    },
                )
            else:
                report(metrics)

    return _named(scheduled_trial, factory, "scheduled_trial")


def run_scheduled(
    factory: Callable[[dict[str, Any]], ScheduledRun],
    initial: Mapping[str, Sequence[float]],
    path: Path,
    *,
    steps: int,
    scheduler: str,
    config: Mapping[str, Any] | None = None,
    metric: str = "val_loss",
    score: str = "test_loss",
    report_every: int = 10,
    grace_period: int | None = None,
    reduction_factor: float = 4,
    perturbation_interval: int = 100,
    checkpoint_every: int = 500,
    mutations: Mapping[str, Any] | None = None,
    bounds: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    quantile_fraction: float = 0.25,
    resample_probability: float = 0.25,
    synch: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    threads: int = 1,
    progress_factory: Callable[[str, int], Callable[..., None]] | None = None,
    label: str = "scheduled",
) -> dict[str, Any]:
    """One member per trial, trained to ``steps`` under ASHA or PBT, ranked by the final ``metric`` (minimised).

    Trial i's config is ``{"member": i, name: value, ..., **config, "report_every", "checkpoint_every",
    "threads", "t0"}`` and ``factory(config)`` builds its :class:`ScheduledRun` (:func:`scheduled_trainable`).
    ASHA (Ray Tune's ``ASHAScheduler``): ``time_attr="step"``, ``max_t = steps``, one bracket (a step counted
    per report). PBT (``PopulationBasedTraining``): factors (1.2, 0.8); Python's ``random`` (PBT's
    explore/exploit draws in the driver) is seeded with ``seed``.

    Args:
        factory: builds a trial's run (a module-level function).
        initial: ``initial[name][i]`` is member i's initial value of hyperparameter ``name`` (so there are
            ``len(initial[name])`` trials).
        path: the experiment's folder.
        steps: training steps per trial.
        scheduler: ``"asha"`` or ``"pbt"``.
        config: added to every trial's config.
        metric: the reported loss the schedulers rank by.
        score: the reported loss of the final results (e.g. the test loss).
        report_every: steps between reports.
        grace_period: ASHA's grace period (default ``report_every``).
        reduction_factor: ASHA's reduction factor.
        perturbation_interval: PBT's perturbation interval, in steps.
        checkpoint_every: steps between checkpoints.
        mutations: PBT's resampling distributions (Ray Tune domains by name).
        bounds: the hyperparameters' domains; PBT's explored values are clipped into them (:func:`clip_to_domains`).
        seed: the seed of PBT's draws.
        quantile_fraction: PBT's quantile fraction.
        resample_probability: PBT's resample probability.
        synch: synchronous PBT.
        address: a Ray cluster to join (default: a local instance).
        num_cpus: CPUs of the local instance.
        threads: torch threads per trial.
        progress_factory: ``(label, total) -> advance``, a progress bar over the trials.
        label: the progress bar's label.

    Returns:
        ``{"final_<score>", "final_<metric>", "seconds", "trials", "incumbent", ...}`` where the finals are of
        the trials trained to ``steps`` (ASHA's survivors; all PBT paths; ``None`` for a diverged one);
        ``incumbent`` is the best ``score`` reported so far against wall time; ``mutations`` holds, per final
        trial, the PBT mutations applied along its path (:func:`mutation_record`), ``exploits`` their total
        number.

    Raises:
        ValueError: an unknown scheduler.
        Interrupted: Ray Tune stopped with unfinished trials (Ctrl-C).
    """
    tune = require("ray.tune")
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    names = tuple(initial)
    trials = len(initial[names[0]]) if names else 0
    if trials < 1 or any(len(v) != trials for v in initial.values()):
        raise ValueError(
            f"need the same number (>= 1) of initial values per hyperparameter, got "
            f"{ {n: len(v) for n, v in initial.items()} }"
        )
    sched: TrialScheduler
    if scheduler == "asha":
        sched = ASHAScheduler(
            time_attr="step",
            max_t=steps,
            grace_period=grace_period or report_every,
            reduction_factor=reduction_factor,
            brackets=1,
        )
        ckpt_every = checkpoint_every
    elif scheduler == "pbt":
        if perturbation_interval % report_every:
            raise ValueError(
                f"perturbation interval {perturbation_interval} must be a multiple of report_every {report_every}"
            )
        import random

        random.seed(seed)  # PBT's explore/exploit draws use Python's random module in the driver
        sched = PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=perturbation_interval,
            hyperparam_mutations=dict(mutations or {}),
            quantile_fraction=quantile_fraction,
            resample_probability=resample_probability,
            synch=synch,
            custom_explore_fn=None if bounds is None else functools.partial(clip_to_domains, bounds=bounds),
        )
        ckpt_every = perturbation_interval
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: use 'asha' or 'pbt'")
    table = {n: [float(x) for x in initial[n]] for n in names}
    space = {
        "member": tune.grid_search(list(range(trials))),
        **{n: tune.sample_from(lambda config, n=n: table[n][config["member"]]) for n in names},
        **(config or {}),
        "report_every": report_every,
        "checkpoint_every": ckpt_every,
        "threads": threads,
        "t0": time.time(),
    }
    start = time.perf_counter()
    with ray_session(address, num_cpus):
        advance = progress_factory(label, trials) if progress_factory else None
        rows: list[tuple[float, float]] = []  # (wall, score) of every report, collected in the driver
        applied: dict[tuple[str, int], dict[str, float]] = {}  # (trial, step) -> ratios of every applied mutation

        def on_result(res: dict[str, Any]) -> None:
            rows.append((float(res["wall"]), float(res[score])))
            if int(res.get("mutated_at", -1)) >= 0:
                applied[(str(res.get("trial_id")), int(res["mutated_at"]))] = {
                    n: float(res[f"ratio_{n}"]) for n in names if f"ratio_{n}" in res
                }

        grid = fit(
            scheduled_trainable(factory, names, steps),
            space,
            Path(path),
            scheduler=sched,
            metric=metric,
            mode="min",
            cpus_per_trial=threads,
            keep_checkpoints=2,
            on_complete=advance,
            reuse_actors=True,
            on_result=on_result,
        )
        elapsed = time.perf_counter() - start
        finals, steps_done, total_seconds = [], 0, 0.0
        for r in _results(grid):
            last = r.metrics
            if not last or "step" not in last:
                continue
            # ASHA: a trial trains until stopped; PBT: every path trains to steps (clones continue the donor's count)
            steps_done += int(last["step"]) if scheduler == "asha" else steps
            total_seconds += float(last.get("time_total_s", 0.0))
            if int(last["step"]) >= steps:
                bad = bool(last["diverged"])
                finals.append(
                    {
                        "score": None if bad else float(last[score]),
                        "metric": None if bad else float(last[metric]),
                        "config": {n: float(_config(r)[n]) for n in names},
                        "hparams": {n: float(last[f"now_{n}"]) for n in names},
                        "mutations": json.loads(last.get("lineage") or "[]"),
                    }
                )
    times, best = incumbent(rows)
    return {
        f"final_{score}": [f["score"] for f in finals],
        f"final_{metric}": [f["metric"] for f in finals],
        "seconds": [elapsed / max(1, len(finals))] * len(finals),
        "wall_seconds": elapsed,
        "trial_seconds": total_seconds,
        "trials": trials,
        "fully_trained": len(finals),
        "weight_steps": steps_done,
        "incumbent": {"seconds": times, score: best},
        "final_hparams": [f["hparams"] for f in finals],
        "pbt_config": [f["config"] for f in finals],
        "mutations": [f["mutations"] for f in finals],
        "exploits": len(applied | {(m["trial"], m["step"]): m["ratios"] for f in finals for m in f["mutations"]}),
        "applied_ratios": [{"trial": t, "step": k, "ratios": r} for (t, k), r in sorted(applied.items())],
    }
