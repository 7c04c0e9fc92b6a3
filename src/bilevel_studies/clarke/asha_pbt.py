"""Clarke et al. (2022) appendix B.8.2: ASHA and PBT on Ray Tune over random and one-pass-tuned runs.

Each Ray Tune trial is one initialisation (weights and Table 5 hyperparameters of seed
``seed * 1_000_003 + i``, as in the ``clarke`` experiment) trained either with its hyperparameters fixed
(``random``, on the training set only) or tuned online by IFT hypergradients (``ours-wd-lr-m``);
the final validation loss ranks trials.

* ASHA (Ray Tune's ``ASHAScheduler``, one bracket, reduction factor 4, full budget = ``--steps``):
  ``--asha-trials`` initialisations (default: the number that gives ASHA the weight-step budget
  of ``--inits`` full runs, as the paper's 114 286 = 4000 x 200 / 7). Reported: the trials that
  survive to full training.
* PBT (``PopulationBasedTraining``, perturbation interval 100 steps, Ray Tune's defaults
  otherwise): ``--inits`` training paths. Explored values are clipped into the tuner's domains
  (learning rate [1e-10, 1], momentum inside (0, 1)). For PBT + ours a mutation is applied to the
  tuner's current hyperparameters as the ratio new / old of the values PBT assigned; the applied
  mutations are saved (``mutations`` per final path, ``applied_ratios``, ``exploits``).

Writes ``results.json`` (methods ``asha+random``, ``asha+ours-wd-lr-m``, ``pbt+random``,
``pbt+ours-wd-lr-m``; ``bilevel report`` renders it), ``incumbent.png`` (Fig. 19: best test loss
found against wall time) and the Ray Tune experiments under ``ray/`` (re-running resumes them;
a re-run in the same ``--out`` must have the same configuration, though schedulers and methods
may be added).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bilevel import data as D
from bilevel.rundir import atomic_write_json, check_run_config, read_json_state

from .. import _common as C
from . import clarke
from .config import ClarkeConfig, parse_methods, validate_config
from .running import nan_to_none

NAME = "asha-pbt"
HELP = "Clarke et al. 2022 B.8.2: ASHA and PBT (Ray Tune) over random and ours-wd-lr-m initialisations"
SCHEDULERS = ("asha", "pbt")
METHODS = ("random", "ours-wd-lr-m")


def add_arguments(p: argparse.ArgumentParser) -> None:
    clarke.add_arguments(p, dataset="energy", inits=8, steps=1000, methods=",".join(METHODS), backend_options=False)
    p.add_argument("--schedulers", default="asha,pbt", help="comma-separated from asha, pbt")
    p.add_argument(
        "--asha-trials",
        type=C.positive_int,
        default=None,
        help="ASHA initialisations (default: the step budget of --inits full runs)",
    )
    p.add_argument(
        "--report-every",
        type=C.positive_int,
        default=10,
        help="weight steps per Ray Tune report (ASHA's time unit; must divide --steps)",
    )
    p.add_argument(
        "--grace-period", type=C.positive_int, default=None, help="ASHA grace period in steps (default: --report-every)"
    )
    p.add_argument("--reduction-factor", type=C.positive_float, default=4, help="ASHA reduction factor (> 1)")
    p.add_argument(
        "--perturbation-interval", type=C.positive_int, default=100, help="PBT perturbation interval in steps"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument(
        "--ray-cpus", type=C.positive_int, default=None, help="CPUs of the local Ray instance (default: all)"
    )


def _schedulers(a: argparse.Namespace) -> list[str]:
    return [s.strip() for s in a.schedulers.split(",") if s.strip()]


def check_arguments(a: argparse.Namespace) -> None:
    cfg = clarke.config_from_args(a)
    validate_config(cfg)
    _check(cfg, _schedulers(a), a.report_every, a.reduction_factor)


def _check(cfg: ClarkeConfig, schedulers, report_every: int, reduction_factor: float) -> list[str]:
    methods = parse_methods(cfg.methods)
    bad = [m for m in methods if m not in METHODS] + [s for s in schedulers if s not in SCHEDULERS]
    if bad or not schedulers:
        raise ValueError(f"asha-pbt runs methods {METHODS} under schedulers {SCHEDULERS}; got {bad or 'none'}")
    if cfg.steps % report_every:
        raise ValueError(f"--steps {cfg.steps} must be a multiple of --report-every {report_every}")
    if not reduction_factor > 1:
        raise ValueError(f"--reduction-factor must be > 1, got {reduction_factor}")
    return methods


def run(
    cfg: ClarkeConfig,
    out: Path,
    *,
    schedulers=SCHEDULERS,
    asha_trials: int | None = None,
    report_every: int = 10,
    grace_period: int | None = None,
    reduction_factor: float = 4,
    perturbation_interval: int = 100,
    address: str | None = None,
    ray_cpus: int | None = None,
    progress_factory=None,
) -> dict[str, Any]:
    from bilevel.search import ray_tune as R

    validate_config(cfg)
    methods = _check(cfg, list(schedulers), report_every, reduction_factor)
    grace = grace_period or report_every
    n_asha = asha_trials or R.asha_trials_for_budget(cfg.inits, cfg.steps, grace, reduction_factor)
    settings = {
        "schedulers": list(schedulers),
        "asha_trials": n_asha,
        "pbt_paths": cfg.inits,
        "report_every": report_every,
        "grace_period": grace,
        "reduction_factor": reduction_factor,
        "asha_rungs": R.asha_rungs(cfg.steps, grace, reduction_factor),
        "perturbation_interval": perturbation_interval,
    }
    # a re-run resumes from methods/*.json and the Ray experiments: only with the same configuration
    # (methods and schedulers may be added; each search is cached on its own). The checkpoint interval is not
    # free here: PBT's exploits copy a better trial's last checkpoint, so the interval changes the results.
    check_run_config(
        out,
        {**asdict(cfg), "methods": methods, **settings},
        free=("methods", "schedulers", "device", "data_dir"),
        defaults=asdict(ClarkeConfig(dataset=cfg.dataset)),
    )
    (out / "methods").mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    with R.ray_session(address, ray_cpus):  # one Ray instance for all four searches
        _run_all(
            cfg,
            out,
            schedulers,
            methods,
            n_asha,
            report_every,
            grace,
            reduction_factor,
            perturbation_interval,
            address,
            ray_cpus,
            progress_factory,
            results,
        )
    doc = {
        "experiment": NAME,
        "dataset": D.dataset_name(cfg.dataset),
        "config": {**asdict(cfg), "methods": methods, **settings},
        "test_loss": "MSE in original target units",
        "methods": results,
    }
    atomic_write_json(out / "results.json", doc, indent=None, allow_nan=False, default=nan_to_none)
    R.plot_incumbent(
        {k: (v["incumbent"]["seconds"], v["incumbent"]["test_loss"]) for k, v in results.items()},
        out / "incumbent.png",
        f"{doc['dataset']}: ASHA / PBT (Clarke et al. Fig. 19)",
    )
    return doc


def _run_all(
    cfg,
    out,
    schedulers,
    methods,
    n_asha,
    report_every,
    grace,
    reduction_factor,
    perturbation_interval,
    address,
    ray_cpus,
    progress_factory,
    results,
) -> None:
    from . import search as S

    for sched in schedulers:
        for m in methods:
            name = f"{sched}+{m}"
            done = out / "methods" / f"{name}.json"
            finished = read_json_state(
                done, f"{name} is searched again (from its Ray experiment)", check=lambda d: isinstance(d, dict)
            )
            if finished is not None:
                results[name] = finished
                continue
            res = S.run_scheduled(
                cfg,
                m,
                sched,
                n_asha if sched == "asha" else cfg.inits,
                out,
                report_every=report_every,
                grace_period=grace,
                reduction_factor=reduction_factor,
                perturbation_interval=perturbation_interval,
                checkpoint_every=cfg.checkpoint_every,
                address=address,
                num_cpus=ray_cpus,
                progress_factory=progress_factory,
            )
            atomic_write_json(done, res, default=nan_to_none)
            results[name] = res


def main(a: argparse.Namespace, progress_factory=None, console=None) -> dict:
    from bilevel.report import write_report

    cfg = clarke.config_from_args(a)
    doc = run(
        cfg,
        a.out,
        schedulers=_schedulers(a),
        asha_trials=a.asha_trials,
        report_every=a.report_every,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        perturbation_interval=a.perturbation_interval,
        address=a.address,
        ray_cpus=a.ray_cpus,
        progress_factory=progress_factory,
    )
    write_report(doc, a.out, console=console)
    if console is not None:
        for name, m in doc["methods"].items():
            exploits = f", {m['exploits']} exploits" if name.startswith("pbt") and "exploits" in m else ""
            console.print(
                f"{name}: {m['trials']} trials, {m['fully_trained']} fully trained, "
                f"{m['weight_steps']} weight steps, {m['wall_seconds']:.0f} s wall{exploits}"
            )
    return doc
