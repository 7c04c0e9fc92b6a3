"""Clarke et al. (2022), section 4: one-pass tuning of SGD's learning rate, weight decay and momentum.

Every method starts from the same random initialisations (weights and Table 5
hyperparameters drawn from seed ``S * 1_000_003 + i`` for initialisation i of ``--seed S``,
:func:`bilevel.population.derived_seed`), trained as one vectorised population per method:

=================  ==============================================================
``random``         no HPO; hyperparameters fixed at their initial values
``random-xlr``     ``random`` with lr *= U[0.95, 1.01] every T steps
``random-3batched`` best of every three ``random`` runs by validation loss
``lorraine``       IFT hypergradient on the weight decay only
``baydin``         hypergradient descent on the learning rate, every step, as Clarke et al.'s code
                   (``bilevel.strategies.AuthorsBaydin``: SGD 0.001 on log10 lr along -g_t . g_{t-1})
``baydin-ours``    our earlier reading: Adam 0.05 on log10 lr through the step just taken
``ours-wd-lr``     IFT on weight decay and learning rate
``ours-wd-lr-m``   IFT on weight decay, learning rate and momentum
``ours-wd-hdlr-m`` as above with one learning rate per weight
``diff-through-opt`` exact hypergradient by unrolling the same i-step window
=================  ==============================================================

The ``random*`` methods train on train+validation merged, as in the paper. UCI
sets are full batch and report test MSE in the original target units (as
Clarke et al.'s Table 1); image sets use batches of 50 and cross-entropy.

Resumable: every method's population is checkpointed every ``checkpoint_every`` steps
(``checkpoints/METHOD.pt``: the whole loop state, batch samplers included) and a finished method is
kept in ``methods/METHOD.json``; re-running the same command continues from there and gives the
same numbers as an uninterrupted run (see "Runs, interruptions and resume" in docs/design.md).

This module is the command (``bilevel run clarke``: its options and :func:`main`); the experiment is in
the modules beside it, each one idea, from the bottom up: :mod:`~bilevel_studies.clarke.config` (the
methods and :class:`~bilevel_studies.clarke.config.ClarkeConfig`), :mod:`~bilevel_studies.clarke.problem`
(data, models, losses, batch samplers), :mod:`~bilevel_studies.clarke.methods` (a method's population and
its results, the authors' Baydin), :mod:`~bilevel_studies.clarke.search` (the Ray Tune, ASHA/PBT and
Bayesian-optimisation runs of those populations), :mod:`~bilevel_studies.clarke.running` (the whole
experiment into a run directory, resumable) and :mod:`~bilevel_studies.clarke.reporting`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bilevel import data as D

from .. import _common as C
from .config import METHODS, ClarkeConfig, validate_config
from .problem import LM_SIZES
from .reporting import divergence_notes, write_perplexity_table
from .running import run_experiment

NAME = "clarke"
HELP = "Clarke et al. 2022 sec. 4: random vs one-pass tuned SGD hyperparameters over many initialisations"


def add_arguments(
    p: argparse.ArgumentParser,
    *,
    dataset: str = "energy",
    inits: int = 40,
    steps: int = 4000,
    methods: str = "random,ours-wd-lr-m",
    backend_options: bool = True,
) -> None:
    p.add_argument(
        "--dataset",
        default=dataset,
        help="energy, boston, concrete, kin8nm, naval, power, wine, yacht, fashion-mnist, mnist, diabetes, digits",
    )
    p.add_argument("--methods", default=methods, help=f"comma-separated from {', '.join(METHODS)}, or 'all'")
    p.add_argument(
        "--inits",
        type=C.positive_int,
        default=None,
        help=f"random hyperparameter initialisations per method (default {inits}; --paper-protocol: the paper's)",
    )
    p.add_argument(
        "--steps",
        type=C.positive_int,
        default=None,
        help=f"weight updates (full-batch epochs for UCI; default {steps}; --paper-protocol: the paper's)",
    )
    p.add_argument(
        "--paper-protocol",
        action="store_true",
        help="the paper's scale for the data set where --inits / --steps / --lm-size are not given: UCI 200 x 4000, "
        "fashion-mnist 100 x 8400, ptb 50 x 23910 steps of the 2 x 650 LSTM (Clarke et al. sec. 4; needs a GPU "
        "for ptb)",
    )
    p.set_defaults(clarke_default_inits=inits, clarke_default_steps=steps)
    p.add_argument("--interval", type=C.positive_int, default=10, help="T: weight steps between hyperparameter steps")
    p.add_argument(
        "--max-interval",
        type=C.positive_int,
        default=None,
        help="an adaptive schedule (bilevel.schedules.Adaptive) for the IFT and unrolled methods: a hyperparameter "
        "step every --interval weight steps while the hyperparameters move, up to this many apart once they settle",
    )
    p.add_argument(
        "--lookback",
        type=C.nonnegative_int,
        default=5,
        help="i: Neumann steps of the IFT methods (i + 1 terms; 0 is allowed: one term) / unrolled steps "
        "of diff-through-opt (must be >= 1 there); not used by random* and baydin*",
    )
    p.add_argument("--hyper-lr", type=C.positive_float, default=0.05, help="Adam learning rate on the hyperparameters")
    p.add_argument(
        "--baydin-hyper-lr",
        type=C.positive_float,
        default=0.001,
        help="plain-SGD step on log10 lr of method baydin (Clarke et al.'s Baydin baseline: 0.001); "
        "baydin-ours uses --hyper-lr with Adam",
    )
    p.add_argument(
        "--batch-size",
        type=C.positive_int,
        default=None,
        help="mini-batch size (default: full batch for UCI; "
        "50 for (Fashion-)MNIST, 100 for CIFAR-10, as the paper; the LM size's batch for ptb)",
    )
    p.add_argument("--val-fraction", type=C.fraction, default=None, help="UCI: validation share of train+validation")
    p.add_argument(
        "--test-fraction",
        type=C.fraction,
        default=None,
        help="UCI: share of all rows held out for testing (default: Clarke et al.'s split files, ~10%%)",
    )
    p.add_argument("--hidden", type=C.positive_int, default=50, help="hidden units of the MLP")
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", "mlp", "resnet18", "lstm"],
        help="auto: mlp (UCI, images), resnet18 (cifar10), lstm (ptb)",
    )
    p.add_argument(
        "--lm-size",
        default=None,
        choices=sorted(LM_SIZES),
        help="ptb LSTM: paper (2 x 650 units, bptt 70, batch 40) or cpu (2 x 128, bptt 35, batch 20; the default "
        "without --paper-protocol)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=C.positive_int,
        default=500,
        help="weight steps between checkpoints: a kill loses at most this much work per method; "
        "re-running the same command resumes and gives the same numbers (it may use another "
        "--checkpoint-every: the interval cannot change a result)",
    )
    p.add_argument(
        "--record-every",
        type=C.positive_int,
        default=None,
        help="weight steps between recorded curve points (default: --steps / 50)",
    )
    p.add_argument(
        "--record-rows",
        type=C.positive_int,
        default=5000,
        help="examples (tokens for ptb) of each set on which the curves are recorded",
    )
    p.add_argument(
        "--eval-rows",
        type=C.positive_int,
        default=None,
        help="final validation and test losses on the first this many examples (tokens for ptb) of each set "
        "(default: the whole sets)",
    )
    p.add_argument(
        "--image-scaling",
        choices=["standardise", "unit"],
        default="standardise",
        help="image inputs: zero mean and unit variance per pixel (training statistics), or pixels in [0, 1]",
    )
    p.add_argument(
        "--outlier-threshold",
        type=C.positive_float,
        default=None,
        help="final test losses above this count as diverged (default: 1e3 for image sets, as Clarke et al.)",
    )
    p.add_argument(
        "--lr-max",
        type=C.positive_float,
        default=0.1,
        help="upper end of the initial learning rates, drawn log-uniformly from [1e-6, LR_MAX] (Table 5: 0.1)",
    )
    p.add_argument(
        "--on-divergence",
        choices=["record", "rollback"],
        default="record",
        help="record: a run whose loss or weights go non-finite is frozen and counted as diverged; rollback: it "
        "returns to its last good state with its learning rate halved (a non-finite hypergradient: its "
        "hyperparameter steps halved) and goes on",
    )
    if backend_options:
        add_backend_arguments(p)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend local|ray``, ``--address``, ``--ray-cpus``, ``--block-size``."""
    p.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help="local: one vectorised population per method; ray: blocks of initialisations as Ray Tune "
        "trials (pip install 'bilevel[ray]'); re-running resumes via Ray Tune's restore",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (e.g. auto or ray://host:10001); default: start a local Ray instance",
    )
    p.add_argument(
        "--ray-cpus", type=C.positive_int, default=None, help="CPUs of the local Ray instance (default: all)"
    )
    p.add_argument(
        "--block-size",
        type=C.positive_int,
        default=None,
        help="initialisations per Ray trial (default: the population split evenly over the CPUs)",
    )


#: ``--paper-protocol``: Clarke et al.'s initialisations and weight steps per data set (Tables 1 and 2; Fashion-MNIST:
#: 10 epochs of our 42,000-image training split; Penn Treebank: their config's 2391 x 10 steps = 72 epochs of
#: bptt-70 windows of 40 sequences, with the 2 x 650 LSTM)
PAPER_PROTOCOL: dict[str, dict[str, Any]] = {
    **{name: dict(inits=200, steps=4000) for name in D.UCI_DATASETS},
    "fashion-mnist": dict(inits=100, steps=8400),
    "ptb": dict(inits=50, steps=23910, lm_size="paper"),
}


def protocol_settings(a: argparse.Namespace, name: str) -> dict[str, Any]:
    """``inits``, ``steps`` and ``lm_size``: those given on the command line, else the paper's
    (``--paper-protocol``), else the command's defaults."""
    paper = getattr(a, "paper_protocol", False)
    if paper and name not in PAPER_PROTOCOL:
        raise ValueError(
            f"--paper-protocol: no paper protocol for {name!r}; known: {', '.join(sorted(PAPER_PROTOCOL))}"
        )
    table = PAPER_PROTOCOL.get(name, {}) if paper else {}
    fallback = {
        "inits": getattr(a, "clarke_default_inits", 40),
        "steps": getattr(a, "clarke_default_steps", 4000),
        "lm_size": "cpu",
    }
    return {
        key: given if (given := getattr(a, key, None)) is not None else table.get(key, fallback[key])
        for key in ("inits", "steps", "lm_size")
    }


def config_from_args(a: argparse.Namespace) -> ClarkeConfig:
    name = D.dataset_name(a.dataset)
    kind = D.DATASETS[name].kind
    scale = protocol_settings(a, name)
    default_bs = 100 if name == "cifar10" else (50 if kind == "classification" and name != "digits" else None)
    bs = a.batch_size if a.batch_size is not None else default_bs
    return ClarkeConfig(
        dataset=name,
        methods=a.methods,
        inits=scale["inits"],
        steps=scale["steps"],
        seed=a.seed,
        interval=a.interval,
        max_interval=getattr(a, "max_interval", None),
        lookback=a.lookback,
        hyper_lr=a.hyper_lr,
        baydin_hyper_lr=getattr(a, "baydin_hyper_lr", 0.001),
        record_every=getattr(a, "record_every", None),
        record_rows=getattr(a, "record_rows", 5000),
        eval_rows=getattr(a, "eval_rows", None),
        hidden=a.hidden,
        model=getattr(a, "model", "auto"),
        lm_size=scale["lm_size"],
        test_fraction=getattr(a, "test_fraction", None),
        batch_size=bs,
        val_fraction=a.val_fraction,
        checkpoint_every=a.checkpoint_every,
        data_dir=a.data_dir,
        device=a.device,
        dtype=a.dtype,
        image_scaling=a.image_scaling,
        outlier_threshold=a.outlier_threshold
        if a.outlier_threshold is not None
        else (1e3 if D.DATASETS[name].kind == "classification" else None),
        lr_max=getattr(a, "lr_max", 0.1),
        on_divergence=getattr(a, "on_divergence", "record"),
    )


def check_arguments(a: argparse.Namespace) -> None:
    """The checks across options (``ValueError``), run by the command line before anything is written."""
    validate_config(config_from_args(a))


def main(a: argparse.Namespace, progress_factory=None, console=None) -> dict:
    from bilevel.report import write_report

    doc = run_experiment(
        config_from_args(a),
        a.out,
        progress_factory=progress_factory,
        backend=getattr(a, "backend", "local"),
        address=getattr(a, "address", None),
        ray_cpus=getattr(a, "ray_cpus", None),
        block_size=getattr(a, "block_size", None),
    )
    write_report(doc, a.out, console=console)
    if doc["config"].get("dataset") == "ptb":
        write_perplexity_table(doc, Path(a.out), console=console)
    notes = divergence_notes(doc)
    if notes:
        from rich.console import Console
        from rich.markup import escape

        for line in notes:
            (console or Console()).print(f"[yellow]note:[/] {escape(line)}", soft_wrap=True)
    return doc
