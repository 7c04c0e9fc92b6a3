"""Populations of initialisations as Ray Tune trials; ASHA and PBT over the one-pass tuner.

Clarke et al. (2022) train 100-200 random initialisations per method and, in appendix B.8.2,
hand single initialisations -- trained with fixed hyperparameters (``random``) or tuned online
by IFT hypergradients (``ours-wd-lr-m``) -- to Ray Tune's Asynchronous Hyperband (ASHA, Li et
al. 2020) and Population-Based Training (PBT, Jaderberg et al. 2017). This module reuses the
``clarke`` experiment's pieces (:func:`bilevel.experiments.clarke.start_method`,
:func:`~bilevel.experiments.clarke.method_results`) inside Ray Tune function trainables:

* :func:`run_clarke` -- the ``clarke`` experiment with each block of ``block_size`` consecutive
  initialisations one trial (members ``first ... first + count - 1`` use seeds
  ``seed + first + j``, exactly as in the local population, so the per-initialisation results
  are the same up to floating-point rounding: float64 to rounding, float32 depends on the block
  layout, see docs/ray.md). Each method is its own Ray experiment (``out/ray/clarke-METHOD``), so a
  re-run may add methods. Trials checkpoint every ``checkpoint_every`` steps through
  ``tune.report``; re-running the same command restores the experiment with
  ``tune.Tuner.restore`` and resumes unfinished and errored trials from their last checkpoint. A
  run stopped by Ctrl-C raises :class:`Interrupted` (a ``KeyboardInterrupt``) naming the
  unfinished trials.
* :func:`run_scheduled` -- one initialisation per trial under ASHA or PBT, reporting the
  validation loss every ``report_every`` steps.
* PBT + ours (appendix B.8.2): PBT mutates the hyperparameters *it* assigned to a trial, but our
  tuner has since moved them. When a trial starts from a checkpoint whose recorded PBT values
  ``old`` differ from the trial's config ``new``, the tuner's *current* natural values are
  multiplied by ``new / old`` (:func:`pbt_ratios`, :meth:`bilevel.tuner.OnlineTuner.rescale`).
  PBT's explored values are clipped into the tuner's domains (:func:`clip_to_domains`) and every
  applied mutation is recorded (:func:`mutation_record`).

Ray is imported lazily (``pip install 'bilevel[ray]'``). By default a local Ray instance with
``num_cpus`` CPUs is started (and shut down afterwards); ``address="auto"`` or ``"ray://..."``
joins an existing cluster, whose workers must be able to import ``bilevel`` and read the data.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .._io import check_run_config  # noqa: F401  (re-exported: the shared resume check)

#: Reported as the validation/test loss of a diverged trial so that schedulers rank it last
#: (a finite number: Ray Tune's schedulers sort metrics and NaN breaks sorting).
DIVERGED = 1e30

#: Clarke et al. (2022) Table 5 initialisation distributions, in the form PBT resamples from.
HPARAM_NAMES = ("lr", "weight_decay", "momentum")


def require(module: str = "ray.tune") -> Any:
    """Import an optional dependency or raise an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this (population search on Ray Tune / Bayesian optimisation): "
                          f"pip install 'bilevel[ray]'  ({e})") from e


# ---------------------------------------------------------------------------- pure helpers

def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """``(first, count)`` of consecutive blocks of at most ``size`` members covering ``0 .. n - 1``."""
    if n < 1 or size < 1:
        raise ValueError(f"need at least one member and a block size >= 1, got n={n}, size={size}")
    return [(i, min(size, n - i)) for i in range(0, n, size)]


def merge_blocks(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One method's results from its blocks' results (in member order), as one population would give.

    Per-member lists are concatenated; the shared step axes are taken from the first block;
    ``wall_seconds`` is the sum of the blocks' training times (compute, not elapsed time).
    """
    if not parts:
        raise ValueError("no block results to merge")
    out: dict[str, Any] = {}
    for key in ("final_test_loss", "final_val_loss", "final_train_loss", "seconds", "diverged_at"):
        out[key] = [v for p in parts for v in p[key]]
    out["wall_seconds"] = sum(p["wall_seconds"] for p in parts)
    out["curves"] = {"step": parts[0]["curves"]["step"],
                     **{k: [row for p in parts for row in p["curves"][k]]
                        for k in parts[0]["curves"] if k != "step"}}
    out["hparams"] = {"step": parts[0]["hparams"]["step"],
                      **{k: [row for p in parts for row in p["hparams"][k]]
                         for k in parts[0]["hparams"] if k != "step"}}
    return out


def pbt_ratios(new: Mapping[str, float], old: Mapping[str, float], names: Sequence[str] = HPARAM_NAMES,
               rtol: float = 1e-12) -> dict[str, float]:
    """The PBT mutation ``new / old`` of each hyperparameter that PBT changed (Clarke et al. B.8.2).

    ``old`` are the values PBT associated with the checkpoint, ``new`` those it now assigns the
    trial; names whose values agree (within ``rtol``) are left out.
    """
    out = {}
    for n in names:
        a, b = float(new[n]), float(old[n])
        if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
            raise ValueError(f"PBT values of {n!r} must be positive and finite, got new={a}, old={b}")
        if abs(a - b) > rtol * abs(b):
            out[n] = a / b
    return out


def apply_pbt_mutation(tuner, new: Mapping[str, float], old: Mapping[str, float],
                       names: Sequence[str] = HPARAM_NAMES) -> dict[str, float]:
    """Multiply the tuner's current natural hyperparameters by PBT's ``new / old``; return the ratios."""
    ratios = pbt_ratios(new, old, names)
    for n, r in ratios.items():
        tuner.rescale(n, r)
    return ratios


def incumbent(rows: Sequence[tuple[float, float | None]]) -> tuple[list[float], list[float]]:
    """Best (lowest) finite loss seen by each time: ``rows`` of ``(seconds, loss)`` -> (times, best)."""
    times, best, cur = [], [], math.inf
    for t, v in sorted((t, v) for t, v in rows if v is not None and math.isfinite(v) and v < DIVERGED):
        if v < cur:
            cur = v
            times.append(float(t))
            best.append(float(v))
    return times, best


# ---------------------------------------------------------------------------- Ray plumbing

@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """A Ray instance: joined at ``address``, else a local one with ``num_cpus`` CPUs (stopped after)."""
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


def fit(trainable: Callable[[dict], None], param_space: dict[str, Any], path: Path, *,
        scheduler: Any = None, metric: str | None = None, mode: str | None = None, cpus_per_trial: float = 1,
        keep_checkpoints: int | None = 2, on_complete: Callable[[], None] | None = None,
        on_result: Callable[[dict], None] | None = None, reuse_actors: bool = False):
    """Run (or, if ``path`` holds an interrupted run, restore and finish) a Ray Tune experiment.

    Returns the ``ResultGrid``; raises ``RuntimeError`` naming the trials that failed (re-running
    the same call resumes them from their last checkpoint).
    """
    tune = require("ray.tune")
    path = Path(path).resolve()
    trainable = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    # Tune pickles its callbacks with the experiment state: they keep only keys to the driver's functions
    done_key, result_key = _register(on_complete), _register(on_result)

    class _Driver(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _notify(done_key)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            _notify(result_key, result)
    callbacks = [_Driver()]
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(scheduler=scheduler, metric=metric, mode=mode, reuse_actors=reuse_actors,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                      callbacks=callbacks,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints)))
    with _keep_signal_handlers():
        grid = tuner.fit()
    check_finished(trial_statuses(grid, path), path)
    if grid.errors:
        failed = [f"{r.path}: {type(r.error).__name__}: {r.error}" for r in grid if r.error is not None]
        raise RuntimeError(f"{len(failed)} Ray Tune trial(s) failed; run the same command again to resume them:\n"
                           + "\n".join(failed[:5]))
    return grid


class Interrupted(KeyboardInterrupt):
    """A Ray Tune run ended with unfinished trials (Ctrl-C / SIGINT stops ``Tuner.fit`` gracefully).

    A ``KeyboardInterrupt``, so the command line prints its "interrupted ... run the same command
    again to resume" message; the experiment state is saved and the next call restores it.
    """


#: Ray Tune trial states that end a trial (``Trial.TERMINATED``, ``Trial.ERROR``).
FINISHED_STATES = ("TERMINATED", "ERROR")


def trial_statuses(grid, path: Path | str | None = None) -> list[tuple[str, str]]:
    """``(trial id, status)`` of every trial, as Ray Tune last saved them in the experiment at ``path``.

    After a SIGINT, ``Tuner.fit`` saves the experiment state (unfinished trials PENDING, RUNNING or
    PAUSED) and only then stops the trials, so the *returned* grid shows every trial TERMINATED;
    the saved state is the record of what was left. Without ``path`` (or if it cannot be read) the
    statuses of the grid's trials are used.
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
        return [(str(r.path), "TERMINATED") for r in grid]
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
    """The trials that neither terminated nor errored (pending, running or paused when ``fit`` returned)."""
    return [(t, s) for t, s in statuses if s not in FINISHED_STATES]


def check_finished(statuses: Sequence[tuple[str, str]], path: Path | str | None = None) -> None:
    """Raise :class:`Interrupted` naming the unfinished trials, if any.

    ``Tuner.fit`` returns normally after a SIGINT (it saves the experiment state and stops the
    trials); reading the results of its unfinished trials would then fail.
    """
    left = unfinished(statuses)
    if left:
        names = ", ".join(f"{t} ({s})" for t, s in left[:8]) + (" ..." if len(left) > 8 else "")
        raise Interrupted(f"Ray Tune stopped with {len(left)} of {len(statuses)} trial(s) unfinished ({names}); "
                          f"the experiment{'' if path is None else ' ' + str(path)} is saved: run the same command "
                          "again to resume it")


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> None:
    """``tune.report`` with, optionally, a checkpoint holding ``state`` (torch) and ``result`` (JSON)."""
    tune = require("ray.tune")
    if state is None and result is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if state is not None:
            torch.save(state, Path(d) / "state.pt")
        if result is not None:
            (Path(d) / "result.json").write_text(json.dumps(result))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def restored_state() -> dict[str, Any] | None:
    """The ``state`` of the checkpoint this trial (re)starts from, or ``None`` on a fresh start."""
    ckpt = require("ray.tune").get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        f = Path(d) / "state.pt"
        return torch.load(f, weights_only=False) if f.exists() else None


def checkpoint_result(result) -> dict[str, Any]:
    """The ``result.json`` stored in a finished trial's last checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"trial {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        f = Path(d) / "result.json"
        if not f.exists():
            raise RuntimeError(f"trial {result.path} has not finished (its last checkpoint, at step "
                               f"{(result.metrics or {}).get('step')}, holds no result.json); run the same command "
                               "again to resume it")
        return json.loads(f.read_text())


_PROBLEMS: dict[str, Any] = {}
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


def _problem(cfg):
    """Load the data once per worker process (workers are reused across trials)."""
    from ..experiments import clarke
    key = json.dumps([cfg.dataset, cfg.data_dir, cfg.dtype, cfg.device, cfg.hidden, cfg.val_fraction, cfg.model,
                      cfg.lm_size, cfg.batch_size])
    if key not in _PROBLEMS:
        _PROBLEMS[key] = clarke.load_problem(cfg)
    return _PROBLEMS[key]


def _config(d: Mapping[str, Any]):
    from ..experiments.clarke import ClarkeConfig
    return ClarkeConfig(**d)


def _portable(cfg) -> dict[str, Any]:
    """The config as a dict for the trials: data directory absolute (trials run in their own folder)."""
    d = asdict(cfg)
    d["methods"] = list(d["methods"]) if not isinstance(d["methods"], str) else d["methods"]
    data_dir = d.get("data_dir") or os.environ.get("BILEVEL_DATA")
    d["data_dir"] = str(Path(data_dir).resolve()) if data_dir else None
    return d


# ---------------------------------------------------------------------------- clarke --backend ray

def clarke_trial(config: dict[str, Any]) -> None:
    """Ray Tune trainable: one block of initialisations of one method of the ``clarke`` experiment."""
    from ..experiments import clarke
    torch.set_num_threads(int(config.get("threads", 1)))
    job = config["job"]
    cfg = replace(_config(config["cfg"]), inits=int(job["count"]))
    problem = _problem(cfg)
    run = clarke.start_method(cfg, problem, job["method"], first=int(job["first"]))
    state = restored_state()
    if state is not None:
        run.load_state_dict(state)
    while True:
        run.advance(min(cfg.checkpoint_every, cfg.steps - run.tuner.t))
        done = run.tuner.t >= cfg.steps
        result = clarke.method_results(cfg, problem, run) if done else None
        report({"step": run.tuner.t, "done": done}, run.state_dict(), result)
        if done:
            return


def clarke_experiment(out: Path, method: str) -> Path:
    """The Ray Tune experiment of one method of ``clarke --backend ray``: ``out/ray/clarke-METHOD``.

    One experiment per method, so a re-run with more methods restores the experiments of the
    methods it shares with the earlier run and starts new ones for the others (``Tuner.restore``
    brings back only the trials an experiment was created with).
    """
    return Path(out) / "ray" / f"clarke-{method}"


def member_blocks(jobs: Sequence[Mapping[str, Any]], n: int) -> list[tuple[int, int]]:
    """The ``(first, count)`` of ``jobs`` in member order, checked to cover members ``0 .. n - 1`` once."""
    spans = sorted((int(j["first"]), int(j["count"])) for j in jobs)
    covered = [m for f, c in spans for m in range(f, f + c)]
    if covered != list(range(n)):
        raise ValueError(f"the Ray trials' blocks {spans} do not cover the {n} initialisations once each")
    return spans


def run_clarke(cfg, methods: Sequence[str], out: Path, *, address: str | None = None, num_cpus: int | None = None,
               block_size: int | None = None, threads: int = 1,
               progress_factory: Callable[[str, int], Callable[..., None]] | None = None) -> dict[str, dict[str, Any]]:
    """Train ``methods`` of the ``clarke`` experiment as Ray Tune trials; return each method's merged results.

    Each method is its own Ray experiment, :func:`clarke_experiment` (restored on re-run; only
    trials of that method are read from it). ``block_size`` members per trial (default: the
    population split evenly over the cluster's CPUs). Raises :class:`Interrupted` (a
    ``KeyboardInterrupt``) if Ray Tune stopped with unfinished trials (Ctrl-C).
    """
    if not methods:
        return {}
    from ..experiments import clarke
    xlr = [m for m in methods if clarke.METHODS[m].lr_multiplier is not None]
    if xlr:
        import warnings
        warnings.warn(f"{xlr}: the learning-rate multipliers are drawn from one generator per population, so on "
                      "the Ray backend each block draws its own (equally distributed) multipliers and the members "
                      "differ from the local run's (docs/ray.md)", stacklevel=2)
    tune = require("ray.tune")
    results: dict[str, dict[str, Any]] = {}
    with ray_session(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = block_size or max(1, math.ceil(cfg.inits / max(1, cpus // max(1, threads))))
        for method in methods:
            jobs = [{"method": method, "first": f, "count": c} for f, c in blocks(cfg.inits, size)]
            path = clarke_experiment(out, method)
            advance = progress_factory(f"ray: {method}", len(jobs)) if progress_factory else None
            grid = fit(clarke_trial, {"job": tune.grid_search(jobs), "cfg": _portable(cfg), "threads": threads},
                       path, cpus_per_trial=threads, keep_checkpoints=1, on_complete=advance)
            mine = [r for r in grid if r.config["job"]["method"] == method]
            try:
                member_blocks([r.config["job"] for r in mine], cfg.inits)
            except ValueError as e:
                raise ValueError(f"{path}: {e}; delete that folder to train {method!r} afresh") from None
            parts = sorted(((int(r.config["job"]["first"]), checkpoint_result(r)) for r in mine), key=lambda x: x[0])
            results[method] = merge_blocks([res for _, res in parts])
    return results


# ---------------------------------------------------------------------------- ASHA and PBT

def scheduled_trial(config: dict[str, Any]) -> None:
    """Ray Tune trainable: one initialisation (weights of seed ``seed + member``, hyperparameters
    from the config) trained by the one-pass tuner, reporting validation/test losses every
    ``report_every`` steps. On a restart from a PBT checkpoint, PBT's mutation is applied to the
    tuner's current hyperparameters as the ratio new / old (Clarke et al. B.8.2), and recorded.

    A checkpoint holds the run, the PBT values it was trained under (``pbt_values``), the trial
    that wrote it and the mutations applied along this path so far (``mutations``: inherited from
    the donor on an exploit, one entry appended per applied mutation; see :func:`mutation_record`).
    """
    from ..experiments import clarke
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = replace(_config(config["cfg"]), inits=1)
    problem = _problem(cfg)
    method = clarke.Method(**config["method"])
    values = {n: float(config[n]) for n in HPARAM_NAMES}
    run = clarke.start_method(cfg, problem, method, first=int(config["member"]), hparams={n: [v] for n, v in values.items()})
    trial_id = _trial_id()
    state = restored_state()
    ratios: dict[str, float] = {}
    mutations: list[dict[str, Any]] = []
    if state is not None:
        run.load_state_dict(state["run"])
        mutations = list(state.get("mutations", []))
        before = _natural(run.tuner)
        ratios = apply_pbt_mutation(run.tuner, values, state["pbt_values"])
        if ratios:
            mutations.append(mutation_record(run.tuner.t, trial_id, state.get("writer"), state["pbt_values"], values,
                                             ratios, before, _natural(run.tuner), donor_member=state.get("member")))
    every, ckpt_every = int(config["report_every"]), int(config["checkpoint_every"])
    t0 = float(config["t0"])
    while run.tuner.t < cfg.steps:
        run.advance(min(every, cfg.steps - run.tuner.t))
        t = run.tuner.t
        alive = bool(run.tuner.alive[0])
        losses = {}
        for name, data in (("val_loss", problem.val), ("test_loss", problem.test)):
            v = float(clarke.evaluate(run.tuner, problem, data, cfg.record_rows)[0]) * problem.test_scale
            losses[name] = v if alive and math.isfinite(v) else DIVERGED
        metrics = {"step": t, **losses, "diverged": not alive, "wall": time.time() - t0,
                   **{f"now_{k}": v for k, v in _natural(run.tuner).items()},
                   **{f"ratio_{k}": v for k, v in ratios.items()}, "mutations": len(mutations),
                   "mutated_at": mutations[-1]["step"] if ratios else -1}
        if t >= cfg.steps:  # the path's mutations with its final losses (a JSON string: Tune keeps it as is)
            metrics["lineage"] = json.dumps(mutations)
        if t % ckpt_every == 0 or t >= cfg.steps:
            report(metrics, {"run": run.state_dict(), "pbt_values": values, "writer": trial_id,
                             "member": int(config["member"]), "mutations": mutations})
        else:
            report(metrics)


def _trial_id() -> str | None:
    try:
        return require("ray.tune").get_context().get_trial_id()
    except Exception:  # pragma: no cover - outside a Tune session
        return None


def _natural(tuner) -> dict[str, float]:
    """Member 0's natural hyperparameters (first element of a per-weight one) as floats."""
    return {k: float(torch.as_tensor(v).reshape(-1)[0]) for k, v in tuner.describe().items()}


def mutation_record(step: int, trial: str | None, donor: str | None, old: Mapping[str, float],
                    new: Mapping[str, float], ratios: Mapping[str, float], before: Mapping[str, float],
                    after: Mapping[str, float], donor_member: int | None = None) -> dict[str, Any]:
    """One applied PBT + ours mutation: at ``step`` trial ``trial`` started from ``donor``'s checkpoint
    (written by the trial of initialisation ``donor_member``) whose PBT values were ``old``; PBT
    assigned ``new``; the tuner's natural values went from
    ``before`` (the donor's at its checkpoint) to ``after`` = ``before x ratios`` (then moved into the
    domain by :meth:`~bilevel.tuner.OnlineTuner.rescale`, e.g. a momentum pushed past 1)."""
    return {"step": int(step), "trial": trial, "donor": donor, "donor_member": donor_member, "ratios": dict(ratios),
            "pbt_old": {n: float(old[n]) for n in HPARAM_NAMES}, "pbt_new": {n: float(new[n]) for n in HPARAM_NAMES},
            "before": {n: float(before[n]) for n in HPARAM_NAMES}, "after": {n: float(after[n]) for n in HPARAM_NAMES}}


def hparam_bounds() -> dict[str, dict[str, Any]]:
    """Where each PBT-mutated hyperparameter may lie: its transform's open ``domain`` and its ``clip``.

    From the ``clarke`` space (Clarke et al. Table 5): learning rate ``(0, inf)`` clipped to
    ``[1e-10, 1]``, weight decay ``(0, inf)``, momentum ``(0, 1)``.
    """
    from ..experiments import clarke
    space = clarke.space_for(clarke.METHODS["ours-wd-lr-m"])
    return {n: {"domain": tuple(float(x) for x in space[n].transform.domain),
                "clip": None if space[n].clip is None else tuple(float(x) for x in space[n].clip)}
            for n in HPARAM_NAMES}


def clip_to_domains(config: dict[str, Any], bounds: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """PBT's ``custom_explore_fn``: the explored values of :data:`HPARAM_NAMES` moved into the tuner's domains.

    A value on or past a finite end of the open domain is moved
    :data:`~bilevel.hparams.NATURAL_INIT_EPS` inside it (a momentum x 1.2 above 1 becomes
    ``1 - 1e-6``, as :meth:`~bilevel.tuner.OnlineTuner.rescale` does), then clipped into ``clip``
    (a learning rate x 1.2 above 1 becomes 1). Values inside are unchanged (so the ratio new / old
    is PBT's factor unless a value was moved).
    """
    from ..hparams import NATURAL_INIT_EPS
    bounds = bounds or hparam_bounds()
    for n in HPARAM_NAMES:
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


def pbt_mutations() -> dict[str, Any]:
    """PBT's resampling distributions: Clarke et al. (2022) Table 5 initialisation ranges."""
    tune = require("ray.tune")
    return {"lr": tune.loguniform(1e-6, 1e-1), "weight_decay": tune.loguniform(1e-7, 1e-2),
            "momentum": tune.uniform(0.0, 1.0)}


def run_scheduled(cfg, method: str, scheduler: str, trials: int, out: Path, *, report_every: int = 10,
                  grace_period: int | None = None, reduction_factor: float = 4, perturbation_interval: int = 100,
                  checkpoint_every: int = 500, address: str | None = None, num_cpus: int | None = None,
                  threads: int = 1, progress_factory=None, quantile_fraction: float = 0.25,
                  resample_probability: float = 0.25, synch: bool = False) -> dict[str, Any]:
    """``trials`` initialisations of ``method`` ("random" or "ours-wd-lr-m") under ASHA or PBT.

    ASHA (Ray Tune's ``ASHAScheduler``): ``time_attr="step"``, ``max_t = cfg.steps``, grace period
    ``grace_period`` (default ``report_every``), reduction factor 4, one bracket (Clarke et al.'s
    Ray Tune defaults, with a step counted per report). PBT (``PopulationBasedTraining``):
    perturbation interval ``perturbation_interval`` steps, Ray Tune's default ``quantile_fraction``
    0.25, ``resample_probability`` 0.25, factors (1.2, 0.8) and asynchronous mode (``synch``),
    resampling from Table 5; explored values are clipped into the tuner's domains
    (:func:`clip_to_domains`). Both rank trials by the final validation loss. ``random`` trains on the training set only (the validation set
    ranks trials), as appendix B.8.2.

    Returns ``{"final_test_loss", "final_val_loss", "seconds", "trials", "incumbent", ...}`` where
    the finals are of the trials trained to ``cfg.steps`` (ASHA's survivors; all PBT paths);
    ``mutations`` holds, per final trial, the PBT mutations applied along its path
    (:func:`mutation_record`), ``exploits`` their total number.
    """
    from ..experiments import clarke
    tune = require("ray.tune")
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    if method not in ("random", "ours-wd-lr-m"):
        raise ValueError(f"ASHA/PBT run 'random' or 'ours-wd-lr-m', got {method!r}")
    m = clarke.METHODS[method]
    m = replace(m, merge_train_val=False)  # B.8.2: the validation set ranks the trials
    if scheduler == "asha":
        sched = ASHAScheduler(time_attr="step", max_t=cfg.steps, grace_period=grace_period or report_every,
                              reduction_factor=reduction_factor, brackets=1)
        ckpt_every = checkpoint_every
    elif scheduler == "pbt":
        if perturbation_interval % report_every:
            raise ValueError(f"perturbation interval {perturbation_interval} must be a multiple of report_every {report_every}")
        import random
        random.seed(cfg.seed)  # PBT's explore/exploit draws use Python's random module in the driver
        sched = PopulationBasedTraining(time_attr="step", perturbation_interval=perturbation_interval,
                                        hyperparam_mutations=pbt_mutations(), quantile_fraction=quantile_fraction,
                                        resample_probability=resample_probability, synch=synch,
                                        custom_explore_fn=clip_to_domains)
        ckpt_every = perturbation_interval
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: use 'asha' or 'pbt'")
    problem = _problem(cfg)
    init = clarke.build_tuner(replace(cfg, inits=trials), problem, clarke.METHODS["random"]).describe()
    table5 = {n: [float(x) for x in init[n]] for n in HPARAM_NAMES}
    space = {"member": tune.grid_search(list(range(trials))),
             **{n: tune.sample_from(lambda config, n=n: table5[n][config["member"]]) for n in HPARAM_NAMES},
             "cfg": _portable(cfg), "method": {"mode": m.mode, "tuned": list(m.tuned), "merge_train_val": False},
             "report_every": report_every, "checkpoint_every": ckpt_every, "threads": threads, "t0": time.time()}
    name = f"{scheduler}-{method}"
    start = time.perf_counter()
    with ray_session(address, num_cpus):
        advance = progress_factory(f"{scheduler}+{method}", trials) if progress_factory else None
        rows: list[tuple[float, float]] = []  # (wall, test loss) of every report, collected in the driver
        applied: dict[tuple[str, int], dict[str, float]] = {}  # (trial, step) -> ratios of every applied mutation

        def on_result(res):
            rows.append((float(res["wall"]), float(res["test_loss"])))
            if int(res.get("mutated_at", -1)) >= 0:
                applied[(str(res.get("trial_id")), int(res["mutated_at"]))] = {
                    n: float(res[f"ratio_{n}"]) for n in HPARAM_NAMES if f"ratio_{n}" in res}
        grid = fit(scheduled_trial, space, Path(out) / "ray" / name, scheduler=sched, metric="val_loss", mode="min",
                   cpus_per_trial=threads, keep_checkpoints=2, on_complete=advance, reuse_actors=True,
                   on_result=on_result)
        elapsed = time.perf_counter() - start
        finals, steps_done, total_seconds = [], 0, 0.0
        for r in grid:
            last = r.metrics
            if not last or "step" not in last:
                continue
            # ASHA: a trial trains until stopped; PBT: every path trains to cfg.steps (clones continue the donor's count)
            steps_done += int(last["step"]) if scheduler == "asha" else cfg.steps
            total_seconds += float(last.get("time_total_s", 0.0))
            if int(last["step"]) >= cfg.steps:
                bad = bool(last["diverged"])
                finals.append({"test": None if bad else float(last["test_loss"]),
                               "val": None if bad else float(last["val_loss"]),
                               "config": {n: float(r.config[n]) for n in HPARAM_NAMES},
                               "hparams": {n: float(last[f"now_{n}"]) for n in HPARAM_NAMES},
                               "mutations": json.loads(last.get("lineage") or "[]")})
    times, best = incumbent(rows)
    return {"final_test_loss": [f["test"] for f in finals], "final_val_loss": [f["val"] for f in finals],
            "seconds": [elapsed / max(1, len(finals))] * len(finals), "wall_seconds": elapsed,
            "trial_seconds": total_seconds, "trials": trials, "fully_trained": len(finals),
            "weight_steps": steps_done, "incumbent": {"seconds": times, "test_loss": best},
            "final_hparams": [f["hparams"] for f in finals], "pbt_config": [f["config"] for f in finals],
            "mutations": [f["mutations"] for f in finals],
            "exploits": len(applied | {(m["trial"], m["step"]): m["ratios"] for f in finals for m in f["mutations"]}),
            "applied_ratios": [{"trial": t, "step": k, "ratios": r} for (t, k), r in sorted(applied.items())]}


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's milestones ``grace * rf^k < max_t`` and ``max_t`` (one bracket)."""
    if grace_period < 1 or max_t < grace_period or reduction_factor <= 1:
        raise ValueError(f"need 1 <= grace_period <= max_t and reduction_factor > 1; got grace_period={grace_period}, "
                         f"max_t={max_t}, reduction_factor={reduction_factor}")
    out, r = [], float(grace_period)
    while r < max_t:
        out.append(int(round(r)))
        r *= reduction_factor
    return out + [max_t]


def asha_trials_for_budget(paths: int, steps: int, grace_period: int, reduction_factor: float) -> int:
    """Trials that give ASHA the weight-step budget of ``paths`` full runs (Clarke et al. B.8.2).

    Non-parallel Hyperband spends the same effort on every rung, so ``n * grace`` steps per rung
    over ``len(rungs)`` rungs: ``n = paths * steps / (len(rungs) * grace)`` (their 4000 x 200 /
    (7 x 1) = 114 286 with grace 1, factor 4, 4000 steps).
    """
    rungs = asha_rungs(steps, grace_period, reduction_factor)
    return max(1, round(paths * steps / (len(rungs) * grace_period)))


def plot_incumbent(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str) -> Path | None:
    """Best loss found so far against wall time (log axes), one step curve per method (Figs. 11, 19)."""
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
    ax.set_ylabel("incumbent best test loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
