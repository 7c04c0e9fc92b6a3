"""A Ray Tune experiment from the driver: the Ray instance, running or restoring it, and how its trials ended."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .extras import require

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid
    from ray.tune.experiment import Trial

__all__ = ["ray_session", "fit", "Interrupted", "FINISHED_STATES", "trial_statuses", "unfinished", "check_finished"]


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
