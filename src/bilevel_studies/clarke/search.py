"""Clarke et al. (2022)'s problem plugged into the generic population search of :mod:`bilevel.search`.

The ``clarke`` experiment's pieces (:func:`~bilevel_studies.clarke.methods.start_method`,
:func:`~bilevel_studies.clarke.methods.method_results`) as the runs that
:mod:`bilevel.search.ray_tune` trains in Ray Tune trials and as the evaluation that
:mod:`bilevel.search.bayesopt` scores:

* :func:`run_clarke` -- the ``clarke`` experiment's ``--backend ray``: each block of
  ``block_size`` consecutive initialisations one trial (members ``first ... first + count - 1``
  use seeds ``derived_seed(seed, first + j)``, exactly as in the local population, so the per-initialisation
  results are the same up to floating-point rounding: float64 to rounding, float32 depends on the
  block layout, see docs/ray.md). Each method is its own Ray experiment
  (``out/ray/clarke-METHOD``, :func:`clarke_experiment`), so a re-run may add methods. Trials
  checkpoint every ``checkpoint_every`` steps; re-running the same command restores the
  experiment and resumes unfinished and errored trials from their last checkpoint. A run stopped
  by Ctrl-C raises :class:`bilevel.search.ray_tune.Interrupted` naming the unfinished trials.
* :func:`run_scheduled` -- ``asha-pbt`` (appendix B.8.2): one initialisation per trial under ASHA
  or PBT, trained with fixed (``random``) or online-tuned (``ours-wd-lr-m``) hyperparameters,
  reporting the validation loss every ``report_every`` steps. PBT resamples from Table 5
  (:func:`pbt_mutations`) and its explored values are clipped into the tuner's domains
  (:func:`hparam_bounds`); for PBT + ours a mutation multiplies the tuner's *current* values by
  PBT's new / old (:meth:`bilevel.tuner.OnlineTuner.rescale`).
* :func:`run_bayesopt` -- ``bayesopt`` (appendix B.5): repeated Bayesian optimisation of SGD's
  learning rate, weight decay and momentum over Table 5's initialisation space (:data:`SPACE`);
  every configuration is trained like ``random`` (hyperparameters fixed for the whole run) on the
  training set and scored by its final loss on a *separate* validation set; the ``repeats``
  configurations of a sample train together as one population, member r of sample k with weight
  seed ``derived_seed(cfg.seed, k * repeats + r)`` (:func:`bilevel.population.derived_seed`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bilevel.search import bayesopt as B
from bilevel.search import ray_tune as R

from .config import METHODS, ClarkeConfig, Method, space_for
from .methods import MethodRun, build_tuner, member_losses, method_results, start_method
from .problem import Problem, load_problem

#: The hyperparameters PBT assigns and mutates (Clarke et al. 2022, Table 5).
HPARAM_NAMES = ("lr", "weight_decay", "momentum")

#: Table 5 initialisation space for Bayesian optimisation: (name, low, high, transform to the natural value).
SPACE: tuple[tuple[str, float, float, str], ...] = (
    ("log10_lr", -6.0, -1.0, "lr"),
    ("log10_weight_decay", -7.0, -2.0, "weight_decay"),
    ("momentum", 0.0, 1.0, "momentum"),
)


# ---------------------------------------------------------------------------- the problem in a worker


def _problem(cfg: ClarkeConfig) -> Problem:
    """Load the data once per worker process (workers are reused across trials)."""
    key = json.dumps(
        [
            cfg.dataset,
            cfg.data_dir,
            cfg.dtype,
            cfg.device,
            cfg.hidden,
            cfg.val_fraction,
            cfg.model,
            cfg.lm_size,
            cfg.batch_size,
        ]
    )
    return R.worker_cached(f"{__name__}:{key}", lambda: load_problem(cfg))


def _config(d: Mapping[str, Any]) -> ClarkeConfig:
    return ClarkeConfig(**d)


def _portable(cfg: ClarkeConfig) -> dict[str, Any]:
    """The config as a dict for the trials: data directory absolute (trials run in their own folder)."""
    d = asdict(cfg)
    d["methods"] = list(d["methods"]) if not isinstance(d["methods"], str) else d["methods"]
    data_dir = d.get("data_dir") or os.environ.get("BILEVEL_DATA")
    d["data_dir"] = str(Path(data_dir).resolve()) if data_dir else None
    return d


def _natural(tuner) -> dict[str, float]:
    """Member 0's natural hyperparameters (first element of a per-weight one) as floats."""
    return {k: float(torch.as_tensor(v).reshape(-1)[0]) for k, v in tuner.describe().items()}


@dataclass
class BlockRun:
    """A block of a ``clarke`` method's population as :func:`bilevel.search.ray_tune.run_population` drives it."""

    run: MethodRun
    cfg: ClarkeConfig
    problem: Problem

    @property
    def step(self) -> int:
        return self.run.tuner.t

    def advance(self, steps: int) -> None:
        self.run.advance(steps)

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)

    def result(self) -> dict[str, Any]:
        return method_results(self.cfg, self.problem, self.run)


@dataclass
class ScheduledRun:
    """One initialisation as :func:`bilevel.search.ray_tune.run_scheduled` drives it: losses on the whole
    validation and test sets (in the problem's test units), member 0's natural hyperparameters."""

    run: MethodRun
    cfg: ClarkeConfig
    problem: Problem

    @property
    def step(self) -> int:
        return self.run.tuner.t

    @property
    def alive(self) -> bool:
        return bool(self.run.tuner.alive[0])

    def advance(self, steps: int) -> None:
        self.run.advance(steps)

    def losses(self) -> dict[str, float]:
        return {
            name: float(member_losses(self.run.tuner, self.problem, data, self.cfg.record_rows)[0])
            * self.problem.test_scale
            for name, data in (("val_loss", self.problem.val), ("test_loss", self.problem.test))
        }

    def hparams(self) -> dict[str, float]:
        return _natural(self.run.tuner)

    def rescale(self, name: str, factor: float) -> None:
        self.run.tuner.rescale(name, factor)

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)


# ---------------------------------------------------------------------------- clarke --backend ray


def clarke_trial(config: dict[str, Any]) -> BlockRun:
    """The run of one Ray Tune trial of ``clarke --backend ray`` (the trainable takes this function's name):
    the block ``config["job"]`` (``method``, ``first``, ``count``) of the config ``config["cfg"]``."""
    job = config["job"]
    cfg = replace(_config(config["cfg"]), inits=int(job["count"]))
    problem = _problem(cfg)
    return BlockRun(start_method(cfg, problem, job["method"], first=int(job["first"])), cfg, problem)


def clarke_experiment(out: Path, method: str) -> Path:
    """The Ray Tune experiment of one method of ``clarke --backend ray``: ``out/ray/clarke-METHOD``.

    One experiment per method, so a re-run with more methods restores the experiments of the
    methods it shares with the earlier run and starts new ones for the others (``Tuner.restore``
    brings back only the trials an experiment was created with).
    """
    return Path(out) / "ray" / f"clarke-{method}"


def run_clarke(
    cfg: ClarkeConfig,
    methods: Sequence[str],
    out: Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    block_size: int | None = None,
    threads: int = 1,
    progress_factory: Callable[[str, int], Callable[..., None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train ``methods`` of the ``clarke`` experiment as Ray Tune trials; return each method's merged results.

    Each method is its own Ray experiment, :func:`clarke_experiment` (restored on re-run; only
    trials of that method are read from it). ``block_size`` members per trial (default: the
    population split evenly over the cluster's CPUs). Raises
    :class:`~bilevel.search.ray_tune.Interrupted` (a ``KeyboardInterrupt``) if Ray Tune stopped with
    unfinished trials (Ctrl-C).
    """
    if not methods:
        return {}
    xlr = [m for m in methods if METHODS[m].lr_multiplier is not None]
    if xlr:
        warnings.warn(
            f"{xlr}: the learning-rate multipliers are drawn from one generator per population, so on "
            "the Ray backend each block draws its own (equally distributed) multipliers and the members "
            "differ from the local run's (docs/ray.md)",
            stacklevel=2,
        )
    R.require("ray.tune")
    results: dict[str, dict[str, Any]] = {}
    with R.ray_session(address, num_cpus):  # one Ray instance for all methods
        for method in methods:
            parts = R.run_population(
                clarke_trial,
                cfg.inits,
                clarke_experiment(out, method),
                steps=cfg.steps,
                checkpoint_every=cfg.checkpoint_every,
                config={"cfg": _portable(cfg)},
                tag={"method": method},
                block_size=block_size,
                threads=threads,
                progress_factory=progress_factory,
                label=f"ray: {method}",
            )
            results[method] = R.merge_blocks(parts)
    return results


# ---------------------------------------------------------------------------- ASHA and PBT


def scheduled_trial(config: dict[str, Any]) -> ScheduledRun:
    """The run of one ASHA/PBT trial (the trainable takes this function's name): initialisation
    ``config["member"]`` (weights of seed ``derived_seed(seed, member)``) of the config ``config["cfg"]``, trained by
    ``config["method"]`` from the hyperparameters ``config[name]`` the scheduler assigned."""
    cfg = replace(_config(config["cfg"]), inits=1)
    problem = _problem(cfg)
    method = Method(**config["method"])
    values = {n: float(config[n]) for n in HPARAM_NAMES}
    run = start_method(cfg, problem, method, first=int(config["member"]), hparams={n: [v] for n, v in values.items()})
    return ScheduledRun(run, cfg, problem)


def hparam_bounds() -> dict[str, dict[str, Any]]:
    """Where each PBT-mutated hyperparameter may lie: its transform's open ``domain`` and its ``clip``.

    From the ``clarke`` space (Clarke et al. Table 5): learning rate ``(0, inf)`` clipped to
    ``[1e-10, 1]``, weight decay ``(0, inf)``, momentum ``(0, 1)``.
    """
    space = space_for(METHODS["ours-wd-lr-m"])
    return {
        n: {
            "domain": tuple(float(x) for x in space[n].transform.domain),
            "clip": None if space[n].clip is None else tuple(float(x) for x in space[n].clip),
        }
        for n in HPARAM_NAMES
    }


def clip_to_domains(config: dict[str, Any]) -> dict[str, Any]:
    """PBT's explored values moved into the tuner's domains (:func:`bilevel.search.ray_tune.clip_to_domains`
    with :func:`hparam_bounds`)."""
    return R.clip_to_domains(config, hparam_bounds())


def pbt_mutations() -> dict[str, Any]:
    """PBT's resampling distributions: Clarke et al. (2022) Table 5 initialisation ranges."""
    tune = R.require("ray.tune")
    return {
        "lr": tune.loguniform(1e-6, 1e-1),
        "weight_decay": tune.loguniform(1e-7, 1e-2),
        "momentum": tune.uniform(0.0, 1.0),
    }


def run_scheduled(
    cfg: ClarkeConfig,
    method: str,
    scheduler: str,
    trials: int,
    out: Path,
    *,
    report_every: int = 10,
    grace_period: int | None = None,
    reduction_factor: float = 4,
    perturbation_interval: int = 100,
    checkpoint_every: int = 500,
    address: str | None = None,
    num_cpus: int | None = None,
    threads: int = 1,
    progress_factory=None,
    quantile_fraction: float = 0.25,
    resample_probability: float = 0.25,
    synch: bool = False,
) -> dict[str, Any]:
    """``trials`` initialisations of ``method`` ("random" or "ours-wd-lr-m") under ASHA or PBT (B.8.2).

    Clarke et al.'s Ray Tune settings: ASHA with ``max_t = cfg.steps``, grace period
    ``grace_period`` (default ``report_every``), reduction factor 4, one bracket; PBT with
    perturbation interval ``perturbation_interval`` steps, ``quantile_fraction`` 0.25,
    ``resample_probability`` 0.25, factors (1.2, 0.8), asynchronous (``synch``), resampling from
    Table 5 (:func:`pbt_mutations`), explored values clipped into the tuner's domains
    (:func:`hparam_bounds`). Trials start from the Table 5 hyperparameters of initialisations
    ``0 .. trials - 1`` (as the ``clarke`` experiment's) and are ranked by the final validation
    loss; ``random`` trains on the training set only (the validation set ranks trials). Experiment
    ``out/ray/SCHEDULER-METHOD``. Returns :func:`bilevel.search.ray_tune.run_scheduled`'s results
    (``final_test_loss``, ``final_val_loss``, ``mutations``, ``exploits``, ...).
    """
    if method not in ("random", "ours-wd-lr-m"):
        raise ValueError(f"ASHA/PBT run 'random' or 'ours-wd-lr-m', got {method!r}")
    if scheduler not in ("asha", "pbt"):
        raise ValueError(f"unknown scheduler {scheduler!r}: use 'asha' or 'pbt'")
    m = replace(METHODS[method], merge_train_val=False)  # B.8.2: the validation set ranks the trials
    problem = _problem(cfg)
    init = build_tuner(replace(cfg, inits=trials), problem, METHODS["random"]).describe()
    table5 = {n: [float(x) for x in init[n]] for n in HPARAM_NAMES}
    return R.run_scheduled(
        scheduled_trial,
        table5,
        Path(out) / "ray" / f"{scheduler}-{method}",
        steps=cfg.steps,
        scheduler=scheduler,
        config={"cfg": _portable(cfg), "method": {"mode": m.mode, "tuned": list(m.tuned), "merge_train_val": False}},
        metric="val_loss",
        score="test_loss",
        report_every=report_every,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        perturbation_interval=perturbation_interval,
        checkpoint_every=checkpoint_every,
        mutations=pbt_mutations() if scheduler == "pbt" else None,
        bounds=hparam_bounds(),
        seed=cfg.seed,
        quantile_fraction=quantile_fraction,
        resample_probability=resample_probability,
        synch=synch,
        address=address,
        num_cpus=num_cpus,
        threads=threads,
        progress_factory=progress_factory,
        label=f"{scheduler}+{method}",
    )


# ---------------------------------------------------------------------------- Bayesian optimisation


def natural(params: Mapping[str, float]) -> dict[str, float]:
    """Natural SGD hyperparameters from a point of :data:`SPACE`."""
    return {
        "lr": 10.0 ** float(params["log10_lr"]),
        "weight_decay": 10.0 ** float(params["log10_weight_decay"]),
        "momentum": float(params["momentum"]),
    }


def distributions() -> dict[str, Any]:
    """Optuna distributions of :data:`SPACE`."""
    return B.distributions({name: (lo, hi) for name, lo, hi, _ in SPACE})


def run_bayesopt(
    cfg: ClarkeConfig,
    problem: Problem,
    *,
    repeats: int = 32,
    samples: int = 30,
    startup: int = 5,
    sampler: str = "gp",
    state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``repeats`` Bayesian optimisations of ``samples`` trainings each, ``cfg.steps`` steps per training.

    The configurations of sample k of all repeats train together as one population; member r uses
    weight seed ``derived_seed(cfg.seed, k * repeats + r)``, study r is seeded ``derived_seed(cfg.seed, r)``.
    ``state``/``save``
    resume after each sample. Returns :func:`bilevel.search.bayesopt.run`'s per-repeat
    ``final_test_loss``/``final_val_loss`` (of the best-validation sample), ``seconds`` (training
    time attributed to the repeat) and every sample (``records``).
    """
    method = replace(METHODS["random"], merge_train_val=False)  # B.5: a separate validation set
    pop_cfg = replace(cfg, inits=repeats)

    def evaluate(k: int, hp: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        run_ = start_method(
            pop_cfg, problem, method, first=k * repeats, hparams={n: [h[n] for h in hp] for n in HPARAM_NAMES}
        )
        start = time.perf_counter()
        run_.advance(cfg.steps)
        res = method_results(pop_cfg, problem, run_)
        return {"val": res["final_val_loss"], "test": res["final_test_loss"], "seconds": time.perf_counter() - start}

    return B.run(
        evaluate,
        {name: (lo, hi) for name, lo, hi, _ in SPACE},
        repeats=repeats,
        samples=samples,
        startup=startup,
        sampler=sampler,
        seed=cfg.seed,
        transform=natural,
        state=state,
        save=save,
        progress=progress,
    )
