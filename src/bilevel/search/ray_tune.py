"""Population search on Ray Tune over any trainable run: blocks of a population as trials, ASHA and PBT.

Nothing here knows what is trained. A *run* is built inside a Ray Tune function trainable by a
user-supplied factory ``factory(config) -> run`` (``config``: the trial's Ray Tune config) and
driven through a small protocol:

* :func:`run_population` -- a population of ``n`` members split into blocks of ``block_size``
  consecutive members, each block one trial; the factory builds the block's run
  (:class:`BlockRun`: ``step``, ``advance(steps)``, ``state_dict()``/``load_state_dict()``,
  ``result()``), which is checkpointed every ``checkpoint_every`` steps through ``tune.report``
  and trained to ``steps``. Returns the blocks' results in member order (:func:`merge_blocks`
  joins them). Re-running the same call restores the experiment with ``tune.Tuner.restore`` and
  resumes unfinished and errored trials from their last checkpoint; a run stopped by Ctrl-C raises
  :class:`Interrupted` (a ``KeyboardInterrupt``) naming the unfinished trials.
* :func:`run_scheduled` -- one member per trial under ASHA (``ASHAScheduler``) or PBT
  (``PopulationBasedTraining``), each trial's run (:class:`ScheduledRun`: also ``alive``,
  ``losses()``, ``hparams()`` and ``rescale(name, factor)``) reporting its losses every
  ``report_every`` steps; trials are ranked by ``metric`` (minimised).
* PBT with the ratio mutation (Clarke et al. 2022, appendix B.8.2): PBT mutates the
  hyperparameters *it* assigned to a trial, but a run that tunes its own hyperparameters online
  has since moved them. When a trial starts from a checkpoint whose recorded PBT values ``old``
  differ from the trial's config ``new``, the run's *current* values are multiplied by
  ``new / old`` (:func:`pbt_ratios`, :func:`apply_pbt_mutation`, ``run.rescale``). PBT's explored
  values are clipped into the hyperparameters' domains (:func:`clip_to_domains`) and every applied
  mutation is recorded (:func:`mutation_record`).

The factories are pickled to the workers by reference, so they must be importable there
(module-level functions); a worker-process cache (:func:`worker_cached`) lets them load data once
per worker. Ray is imported lazily (``pip install 'bilevel[ray]'``). By default a local Ray
instance with ``num_cpus`` CPUs is started (and shut down afterwards); ``address="auto"`` or
``"ray://..."`` joins an existing cluster, whose workers must be able to import the factories'
modules and read the data.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..rundir import atomic_save, atomic_savefig, load_torch_state

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

#: Reported as the loss of a diverged trial so that schedulers rank it last
#: (a finite number: Ray Tune's schedulers sort metrics and NaN breaks sorting).
DIVERGED = 1e30


def require(module: str = "ray.tune") -> Any:
    """Import an optional dependency or raise an ``ImportError`` that names the extra to install.

    Args:
        module: the module, e.g. ``"ray.tune"`` or ``"optuna"``.

    Returns:
        The module.

    Raises:
        ImportError: it is not installed (``pip install 'bilevel[ray]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this (population search on Ray Tune / Bayesian optimisation): "
            f"pip install 'bilevel[ray]'  ({e})"
        ) from e


# ---------------------------------------------------------------------------- what the factories build


class Rescalable(Protocol):
    """Anything whose hyperparameters PBT's ratio mutation rescales (:func:`apply_pbt_mutation`)."""

    def rescale(self, name: str, factor: float) -> None:
        """Multiply the current value of hyperparameter ``name`` by ``factor``.

        Args:
            name: the hyperparameter.
            factor: the ratio.
        """


class BlockRun(Protocol):
    """A block of population members in training, as :func:`run_population` drives it."""

    @property
    def step(self) -> int:
        """Training steps done."""

    def advance(self, steps: int) -> None:
        """Train ``steps`` more steps.

        Args:
            steps: how many.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``.

        Returns:
            Plain data only (:func:`bilevel.rundir.check_plain`).
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """

    def result(self) -> dict[str, Any]:
        """The block's results once trained.

        Returns:
            JSON-serialisable results, per-member lists (see :func:`merge_blocks`).
        """


class ScheduledRun(Protocol):
    """One trial's run under ASHA or PBT, as :func:`run_scheduled` drives it."""

    @property
    def step(self) -> int:
        """Training steps done."""

    @property
    def alive(self) -> bool:
        """False once the run diverged (its losses are then reported as :data:`DIVERGED`)."""

    def advance(self, steps: int) -> None:
        """Train ``steps`` more steps.

        Args:
            steps: how many.
        """

    def losses(self) -> dict[str, float]:
        """The losses to report.

        Returns:
            Metric name -> value (e.g. ``val_loss`` and ``test_loss``).
        """

    def hparams(self) -> dict[str, float]:
        """The run's current hyperparameters.

        Returns:
            Name -> natural value.
        """

    def rescale(self, name: str, factor: float) -> None:
        """Multiply the current value of hyperparameter ``name`` by ``factor`` (PBT's ratio mutation).

        Args:
            name: the hyperparameter.
            factor: the ratio new / old.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain data, as :meth:`BlockRun.state_dict`).

        Returns:
            The state.
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """


_WORKER_CACHE: dict[str, Any] = {}


def worker_cached(key: str, make: Callable[[], Any]) -> Any:
    """``make()`` once per process for each ``key`` (Ray Tune reuses worker processes across trials).

    Args:
        key: what identifies the value (e.g. the data set and its options).
        make: builds it.

    Returns:
        The cached value.
    """
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]


# ---------------------------------------------------------------------------- pure helpers


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive blocks of at most ``size`` members covering ``0 .. n - 1``.

    Args:
        n: the population size.
        size: the largest block.

    Returns:
        ``[(first, count), ...]`` in member order.
    """
    if n < 1 or size < 1:
        raise ValueError(f"need at least one member and a block size >= 1, got n={n}, size={size}")
    return [(i, min(size, n - i)) for i in range(0, n, size)]


def member_blocks(jobs: Sequence[Mapping[str, Any]], n: int) -> list[tuple[int, int]]:
    """The blocks of ``jobs`` in member order, checked to cover members ``0 .. n - 1`` once.

    Args:
        jobs: the trials' ``job`` configs (``first``, ``count``).
        n: the population size.

    Returns:
        ``[(first, count), ...]`` sorted by ``first``.

    Raises:
        ValueError: the blocks do not cover the population exactly once.
    """
    spans = sorted((int(j["first"]), int(j["count"])) for j in jobs)
    covered = [m for f, c in spans for m in range(f, f + c)]
    if covered != list(range(n)):
        raise ValueError(f"the Ray trials' blocks {spans} do not cover the {n} initialisations once each")
    return spans


def merge_blocks(parts: Sequence[Mapping[str, Any]], axis: str = "step") -> dict[str, Any]:
    """One population's results from its blocks' results (in member order), as one population would give.

    Per key of the first block: lists (one entry per member) are concatenated; numbers (e.g.
    ``wall_seconds``, the training time) are summed (compute, not elapsed time); mappings are
    tables whose ``axis`` entry (e.g. the recorded steps) is shared -- taken from the first block --
    and whose other entries (one row per member) are concatenated; anything else must be the same
    in every block.

    Args:
        parts: the blocks' results, in member order.
        axis: the shared key of the tables.

    Returns:
        The merged results.

    Raises:
        ValueError: blocks that disagree on a shared entry.
    """
    if not parts:
        raise ValueError("no block results to merge")
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        if isinstance(first, Mapping):
            out[key] = {
                **({axis: first[axis]} if axis in first else {}),
                **{k: [row for p in parts for row in p[key][k]] for k in first if k != axis},
            }
        elif isinstance(first, (list, tuple)):
            out[key] = [v for p in parts for v in p[key]]
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = sum(p[key] for p in parts)
        elif all(p[key] == first for p in parts):
            out[key] = first
        else:
            raise ValueError(f"cannot merge {key!r}: the blocks disagree ({[p[key] for p in parts]})")
    return out


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


def incumbent(rows: Sequence[tuple[float, float | None]]) -> tuple[list[float], list[float]]:
    """Best (lowest) finite loss seen by each time.

    Args:
        rows: ``(seconds, loss)`` pairs (``loss`` ``None``: diverged).

    Returns:
        ``(times, best)``, sorted by time.
    """
    times, best, cur = [], [], math.inf
    for t, v in sorted((t, v) for t, v in rows if v is not None and math.isfinite(v) and v < DIVERGED):
        if v < cur:
            cur = v
            times.append(float(t))
            best.append(float(v))
    return times, best


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
    from ..hparams import NATURAL_INIT_EPS

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


# ---------------------------------------------------------------------------- Ray plumbing


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """A Ray instance for the block: joined at ``address``, else a local one with ``num_cpus`` CPUs (stopped
    after). A context manager.

    Args:
        address: a cluster address (``"auto"``, ``"ray://host:10001"``) or ``None``.
        num_cpus: CPUs of the local instance (default: all).

    Returns:
        The context manager; it yields the ``ray`` module.
    """
    # Tune warns on every frequent checkpoint snapshot; our trials checkpoint on purpose
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray = require("ray")
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kw)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def fit(
    trainable: Callable[[dict], None],
    param_space: dict[str, Any],
    path: Path,
    *,
    scheduler: Any = None,
    metric: str | None = None,
    mode: str | None = None,
    cpus_per_trial: float = 1,
    keep_checkpoints: int | None = 2,
    on_complete: Callable[[], None] | None = None,
    on_result: Callable[[dict], None] | None = None,
    reuse_actors: bool = False,
) -> ResultGrid:
    """Run (or, if ``path`` holds an interrupted run, restore and finish) a Ray Tune experiment.

    Args:
        trainable: the function trainable.
        param_space: the trials' configs (Ray Tune's ``param_space``).
        path: the experiment's folder.
        scheduler: a Ray Tune scheduler (ASHA, PBT) or ``None``.
        metric: the metric the scheduler ranks by.
        mode: ``"min"`` or ``"max"``.
        cpus_per_trial: CPUs reserved per trial.
        keep_checkpoints: checkpoints kept per trial (``None``: all).
        on_complete: called when a trial completes (progress bars).
        on_result: called with every reported result.
        reuse_actors: let Ray Tune reuse trial actors.

    Returns:
        The ``ResultGrid``.

    Raises:
        Interrupted: Ray Tune stopped with unfinished trials (Ctrl-C).
        RuntimeError: naming the trials that failed (re-running the same call resumes them from their last
            checkpoint).
    """
    tune = require("ray.tune")
    path = Path(path).resolve()
    trainable = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    # Tune pickles its callbacks with the experiment state: they keep only keys to the driver's functions
    done_key, result_key = _register(on_complete), _register(on_result)

    from ray.tune import Callback  # ray.tune is importable: require() above

    class _Driver(Callback):
        def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            _notify(done_key)

        def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
            _notify(result_key, result)

    callbacks = [_Driver()]
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                metric=metric,
                mode=mode,
                reuse_actors=reuse_actors,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                verbose=0,
                callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
            ),
        )
    with _keep_signal_handlers():
        grid = tuner.fit()
    check_finished(trial_statuses(grid, path), path)
    if grid.errors:
        failed = [f"{r.path}: {type(r.error).__name__}: {r.error}" for r in grid if r.error is not None]
        raise RuntimeError(
            f"{len(failed)} Ray Tune trial(s) failed; run the same command again to resume them:\n"
            + "\n".join(failed[:5])
        )
    return grid


class Interrupted(KeyboardInterrupt):
    """A Ray Tune run ended with unfinished trials (Ctrl-C / SIGINT stops ``Tuner.fit`` gracefully).

    A ``KeyboardInterrupt``, so the command line prints its "interrupted ... run the same command
    again to resume" message; the experiment state is saved and the next call restores it.
    """


#: Ray Tune trial states that end a trial (``Trial.TERMINATED``, ``Trial.ERROR``).
FINISHED_STATES = ("TERMINATED", "ERROR")


def _results(grid: ResultGrid) -> list[Result]:
    """The grid's results in order (``ResultGrid`` iterates through ``__getitem__``, which mypy does not model)."""
    return [grid[i] for i in range(len(grid))]


def _config(result: Result) -> dict[str, Any]:
    """A trial's config (``Result.config`` is typed optional; Tune sets it for every trial)."""
    if result.config is None:
        raise RuntimeError(f"trial {result.path} has no config")
    return result.config


def trial_statuses(grid: ResultGrid, path: Path | str | None = None) -> list[tuple[str, str]]:
    """``(trial id, status)`` of every trial, as Ray Tune last saved them in the experiment at ``path``.

    After a SIGINT, ``Tuner.fit`` saves the experiment state (unfinished trials PENDING, RUNNING or
    PAUSED) and only then stops the trials, so the *returned* grid shows every trial TERMINATED;
    the saved state is the record of what was left.

    Args:
        grid: what ``fit`` returned.
        path: the experiment's folder (without it, or if it cannot be read, the grid's statuses are used).

    Returns:
        The statuses.
    """
    import logging

    if path is not None:
        log = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = log.level
        log.setLevel(logging.ERROR)  # it warns about trials that never reported (exactly the unfinished ones)
        try:
            trials = require("ray.tune").ExperimentAnalysis(str(path)).trials
            return [(str(t.trial_id), str(t.status)) for t in trials]
        except Exception:  # pragma: no cover - an unreadable state: fall back to the grid
            pass
        finally:
            log.setLevel(level)
    analysis = getattr(grid, "_experiment_analysis", None)
    if analysis is None:  # pragma: no cover
        return [(str(r.path), "TERMINATED") for r in _results(grid)]
    return [(str(t.trial_id), str(t.status)) for t in analysis.trials]


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Restore the SIGINT/SIGUSR1 handlers after ``Tuner.fit`` (Tune installs its own and leaves them
    in place after a run that was not interrupted, which would swallow a later Ctrl-C)."""
    import signal
    import threading

    names = [n for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names} if main else {}
    try:
        yield
    finally:
        for n, h in saved.items():
            if h is not None:
                signal.signal(getattr(signal, n), h)


def unfinished(statuses: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trials that neither terminated nor errored (pending, running or paused when ``fit`` returned).

    Args:
        statuses: :func:`trial_statuses`.

    Returns:
        The unfinished ones.
    """
    return [(t, s) for t, s in statuses if s not in FINISHED_STATES]


def check_finished(statuses: Sequence[tuple[str, str]], path: Path | str | None = None) -> None:
    """Raise :class:`Interrupted` naming the unfinished trials, if any.

    ``Tuner.fit`` returns normally after a SIGINT (it saves the experiment state and stops the
    trials); reading the results of its unfinished trials would then fail.

    Args:
        statuses: :func:`trial_statuses`.
        path: the experiment's folder, named in the message.

    Raises:
        Interrupted: some trial is unfinished.
    """
    left = unfinished(statuses)
    if left:
        names = ", ".join(f"{t} ({s})" for t, s in left[:8]) + (" ..." if len(left) > 8 else "")
        raise Interrupted(
            f"Ray Tune stopped with {len(left)} of {len(statuses)} trial(s) unfinished ({names}); "
            f"the experiment{'' if path is None else ' ' + str(path)} is saved: run the same command "
            "again to resume it"
        )


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> None:
    """``tune.report`` with, optionally, a checkpoint holding ``state`` (torch) and ``result`` (JSON).

    Args:
        metrics: the metrics reported.
        state: the run's state (plain data, :func:`bilevel.rundir.atomic_save`).
        result: the run's final results.

    Raises:
        TypeError: ``state`` holds something that is not plain data.
    """
    tune = require("ray.tune")
    if state is None and result is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if state is not None:
            atomic_save(state, Path(d) / "state.pt")  # plain data only: read back with weights_only=True
        if result is not None:
            (Path(d) / "result.json").write_text(json.dumps(result))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def restored_state() -> dict[str, Any] | None:
    """The ``state`` of the checkpoint this trial (re)starts from.

    Returns:
        The state (read with ``torch.load(weights_only=True)``; a damaged or refused file is set aside and the
        trial starts again), or ``None`` on a fresh start.
    """
    ckpt = require("ray.tune").get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_torch_state(Path(d) / "state.pt", "the trial starts again from step 0")


def checkpoint_result(result: Result) -> dict[str, Any]:
    """The ``result.json`` stored in a finished trial's last checkpoint.

    Args:
        result: the trial's Ray Tune ``Result``.

    Returns:
        The block's results.

    Raises:
        RuntimeError: the trial has no checkpoint or did not finish.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"trial {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        f = Path(d) / "result.json"
        if not f.exists():
            raise RuntimeError(
                f"trial {result.path} has not finished (its last checkpoint, at step "
                f"{(result.metrics or {}).get('step')}, holds no result.json); run the same command "
                "again to resume it"
            )
        return json.loads(f.read_text())


_CALLBACKS: dict[int, Callable[..., None]] = {}


def _register(f: Callable[..., None] | None) -> int | None:
    if f is None:
        return None
    key = len(_CALLBACKS) + 1
    _CALLBACKS[key] = f
    return key


def _notify(key: int | None, *args: Any) -> None:
    f = _CALLBACKS.get(key) if key is not None else None
    if f is not None:
        f(*args)


def _named(f: Callable, factory: Callable, default: str) -> Callable:
    """Name the trainable after its factory (Ray Tune's ``Tuner.restore`` checks the trainable's name)."""
    f.__name__ = f.__qualname__ = getattr(factory, "__name__", default)
    return f


# ---------------------------------------------------------------------------- a population as trials


def population_trainable(
    factory: Callable[[dict[str, Any]], BlockRun], steps: int, checkpoint_every: int
) -> Callable[[dict[str, Any]], None]:
    """Ray Tune trainable: the block run ``factory(config)`` trained to ``steps``, checkpointed every
    ``checkpoint_every`` steps; its last checkpoint holds ``run.result()`` (:func:`checkpoint_result`).

    Args:
        factory: builds the block's :class:`BlockRun` from the trial's config (a module-level function).
        steps: the training steps.
        checkpoint_every: steps between checkpoints.

    Returns:
        The trainable (named after ``factory``).
    """

    def population_trial(config: dict[str, Any]) -> None:
        torch.set_num_threads(int(config.get("threads", 1)))
        run = factory(config)
        state = restored_state()
        if state is not None:
            run.load_state_dict(state)
        while True:
            run.advance(min(checkpoint_every, steps - run.step))
            done = run.step >= steps
            result = run.result() if done else None
            report({"step": run.step, "done": done}, run.state_dict(), result)
            if done:
                return

    return _named(population_trial, factory, "population_trial")


def run_population(
    factory: Callable[[dict[str, Any]], BlockRun],
    n: int,
    path: Path,
    *,
    steps: int,
    checkpoint_every: int,
    config: Mapping[str, Any] | None = None,
    tag: Mapping[str, Any] | None = None,
    block_size: int | None = None,
    threads: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    progress_factory: Callable[[str, int], Callable[..., None]] | None = None,
    label: str = "ray",
) -> list[dict[str, Any]]:
    """Train a population of ``n`` members as Ray Tune trials, one per block; return the blocks' results.

    Each trial's config is ``{"job": {**tag, "first": f, "count": c}, **config, "threads": threads}``
    (members ``f .. f + c - 1``); ``factory(config)`` builds its :class:`BlockRun`, which must give
    those members exactly what they would get in one population (e.g. seeds by member index). The
    experiment is restored on re-run (only trials whose job matches ``tag`` are read from it).

    Args:
        factory: builds a block's run (a module-level function, pickled by reference).
        n: the population size.
        path: the experiment's folder.
        steps: training steps per member.
        checkpoint_every: steps between checkpoints.
        config: added to every trial's config.
        tag: added to every trial's job (e.g. the method), selecting its trials on restore.
        block_size: members per trial (default: the population split evenly over the cluster's CPUs).
        threads: torch threads per trial.
        address: a Ray cluster to join (default: a local instance).
        num_cpus: CPUs of the local instance.
        progress_factory: ``(label, total) -> advance``, a progress bar over the trials.
        label: the progress bar's label.

    Returns:
        The results (``run.result()`` of each block) in member order, ready for :func:`merge_blocks`.

    Raises:
        Interrupted: a ``KeyboardInterrupt``, if Ray Tune stopped with unfinished trials (Ctrl-C).
    """
    tune = require("ray.tune")
    tag = dict(tag or {})
    with ray_session(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = block_size or max(1, math.ceil(n / max(1, cpus // max(1, threads))))
        jobs = [{**tag, "first": f, "count": c} for f, c in blocks(n, size)]
        advance = progress_factory(label, len(jobs)) if progress_factory else None
        grid = fit(
            population_trainable(factory, steps, checkpoint_every),
            {"job": tune.grid_search(jobs), **(config or {}), "threads": threads},
            path,
            cpus_per_trial=threads,
            keep_checkpoints=1,
            on_complete=advance,
        )
        mine = [r for r in _results(grid) if all(_config(r)["job"].get(k) == v for k, v in tag.items())]
        try:
            member_blocks([_config(r)["job"] for r in mine], n)
        except ValueError as e:
            raise ValueError(f"{path}: {e}; delete that folder to train it afresh") from None
        parts = sorted(((int(_config(r)["job"]["first"]), checkpoint_result(r)) for r in mine), key=lambda x: x[0])
    return [res for _, res in parts]


# ---------------------------------------------------------------------------- ASHA and PBT


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


def _trial_id() -> str | None:
    try:
        return require("ray.tune").get_context().get_trial_id()
    except Exception:  # pragma: no cover - outside a Tune session
        return None


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


# ---------------------------------------------------------------------------- budgets and figures


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


def plot_incumbent(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    title: str,
    ylabel: str = "incumbent best test loss",
) -> Path | None:
    """Best loss found so far against wall time (log axes), one step curve per search (e.g. Clarke et al.
    2022, Figs. 11 and 19).

    Args:
        series: search name -> ``(seconds, best loss)``.
        path: the PNG to write (atomically).
        title: the figure's title.
        ylabel: the y axis' label.

    Returns:
        ``path``, or ``None`` when every series is empty.
    """
    series = {k: v for k, v in series.items() if len(v[0])}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (t, v) in series.items():
        ax.step(t, v, where="post", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
