"""Clarke et al. (2022) appendix B.5: the Bayesian-optimisation baseline (Tables 6 and 7, Fig. 11).

``--repeats`` independent 30-sample Bayesian optimisations (Optuna's GP sampler, first five
samples random; see :mod:`bilevel.search.bayesopt` for why Optuna; the problem plugs in from
:func:`bilevel_studies.clarke.search.run_bayesopt`) over the Table 5 space of SGD's
learning rate, weight decay and momentum. Each sample is a ``random``-style training run
(hyperparameters fixed) on the training set, compared on a separate validation set; a repeat's
result is the test loss of its best-validation sample. The repeats train side by side as one
vectorised population. Writes ``results.json`` (method ``bayesopt``, one final test loss per
repeat; ``bilevel report`` renders it) and ``incumbent.png`` (Fig. 11: the incumbent's test loss
against training time, median over repeats). Resumable after every sample.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bilevel import data as D
from bilevel.rundir import atomic_write_json, read_json_state, save_run_config

from .. import _common as C
from .config import ClarkeConfig, validate_config
from .problem import load_problem
from .running import nan_to_none

NAME = "bayesopt"
HELP = "Clarke et al. 2022 B.5: repeated 30-sample Bayesian optimisation (Optuna GP) of SGD's lr, wd, momentum"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="energy", help="a UCI set, kin8nm, fashion-mnist, mnist, diabetes, digits")
    p.add_argument(
        "--repeats", type=C.positive_int, default=8, help="independent Bayesian optimisations (the paper: 32)"
    )
    p.add_argument(
        "--samples",
        type=C.positive_int,
        default=30,
        help="trainings per optimisation (the state is saved after each: a kill loses at most one)",
    )
    p.add_argument("--startup", type=C.nonnegative_int, default=5, help="initial random samples")
    p.add_argument("--sampler", default="gp", choices=["gp", "tpe"], help="Optuna sampler")
    p.add_argument("--steps", type=C.positive_int, default=1000, help="weight updates per training (the paper: 4000)")
    p.add_argument("--hidden", type=C.positive_int, default=50, help="hidden units of the MLP")
    p.add_argument(
        "--batch-size", type=C.positive_int, default=None, help="mini-batch size (default: full batch; 50 for images)"
    )
    p.add_argument("--val-fraction", type=C.fraction, default=None, help="UCI: validation share of train+validation")


def check_arguments(a: argparse.Namespace) -> None:
    validate_config(config_from_args(a))
    if a.startup > a.samples:
        raise ValueError(f"--startup {a.startup} must be <= --samples {a.samples}")


def run(
    cfg: ClarkeConfig,
    out: Path,
    *,
    repeats: int,
    samples: int,
    startup: int,
    sampler: str,
    progress_factory=None,
) -> dict[str, Any]:
    from bilevel.rundir import check_run_config
    from bilevel.search.ray_tune import plot_incumbent

    from . import search as S

    settings = {"repeats": repeats, "samples": samples, "startup": startup, "sampler": sampler, "library": "optuna"}
    cfg_dict = {**asdict(cfg), **settings}
    ckpt = out / "bayesopt_state.json"
    validate_config(cfg)
    check_run_config(
        out,
        cfg_dict,
        free=("device", "data_dir", "checkpoint_every"),
        defaults=asdict(ClarkeConfig(dataset=cfg.dataset)),
        save=False,
    )
    problem = load_problem(cfg)
    save_run_config(out, cfg_dict)
    state = read_json_state(
        ckpt, "the optimisations start again from the first sample", check=lambda d: isinstance(d, dict)
    )
    progress = progress_factory(f"bayesopt x{repeats}", samples) if progress_factory else None
    res = S.run_bayesopt(
        cfg,
        problem,
        repeats=repeats,
        samples=samples,
        startup=startup,
        sampler=sampler,
        state=state,
        save=lambda s: atomic_write_json(ckpt, s),
        progress=progress,
    )
    doc = {
        "experiment": NAME,
        "dataset": D.dataset_name(cfg.dataset),
        "config": cfg_dict,
        "test_loss": "MSE in original target units" if problem.kind == "regression" else "cross-entropy",
        "methods": {"bayesopt": res},
    }
    atomic_write_json(out / "results.json", doc, indent=None, allow_nan=False, default=nan_to_none)
    times = res["incumbent"]["seconds"]
    med_t = [statistics.median(ts[k] for ts in times) for k in range(samples)]
    med_v = [
        statistics.median(v) if (v := [c[k] for c in res["incumbent"]["test_loss"] if c[k] is not None]) else None
        for k in range(samples)
    ]
    pts = [(t, v) for t, v in zip(med_t, med_v) if v is not None]
    plot_incumbent(
        {"Bayesian optimisation (median)": ([t for t, _ in pts], [v for _, v in pts])},
        out / "incumbent.png",
        f"{doc['dataset']}: incumbent of {samples}-sample BO (Clarke et al. Fig. 11)",
    )
    return doc


def config_from_args(a: argparse.Namespace) -> ClarkeConfig:
    name = D.dataset_name(a.dataset)
    bs = (
        a.batch_size
        if a.batch_size is not None
        else (50 if D.DATASETS[name].kind == "classification" and name != "digits" else None)
    )
    return ClarkeConfig(
        dataset=name,
        methods=["random"],
        inits=a.repeats,
        steps=a.steps,
        seed=a.seed,
        hidden=a.hidden,
        batch_size=bs,
        val_fraction=a.val_fraction,
        data_dir=a.data_dir,
        device=a.device,
        dtype=a.dtype,
        outlier_threshold=1e3 if D.DATASETS[name].kind == "classification" else None,
    )


def main(a: argparse.Namespace, progress_factory=None, console=None) -> dict:
    from bilevel.report import write_report

    cfg = config_from_args(a)
    doc = run(
        cfg,
        a.out,
        repeats=a.repeats,
        samples=a.samples,
        startup=a.startup,
        sampler=a.sampler,
        progress_factory=progress_factory,
    )
    write_report(doc, a.out, console=console)
    if console is not None:
        m = doc["methods"]["bayesopt"]
        console.print(
            f"bayesopt: {a.repeats} x {a.samples} trainings of {a.steps} steps, "
            f"{m['wall_seconds']:.0f} s of training, {m['diverged_samples']} diverged samples"
        )
    return doc
