"""The ``clarke`` experiment's configuration: the methods, their settings, and the checks of a configuration.

Clarke et al. (2022), section 4 (see :mod:`bilevel_studies.clarke.clarke` for the command and the table of
methods). :class:`ClarkeConfig` is what a run records in ``config.json`` and ``results.json``;
:func:`validate_config` refuses an invalid one before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bilevel import hparams as H

ALL_TUNED = ("lr", "weight_decay", "momentum")


@dataclass(frozen=True)
class Method:
    mode: str = "ift"
    tuned: tuple[str, ...] = ALL_TUNED
    merge_train_val: bool = False
    lr_multiplier: tuple[float, float] | None = None
    per_weight_lr: bool = False
    # Baydin et al.'s hypergradient descent as Clarke et al.'s code runs it (``bilevel.strategies.AuthorsBaydin``)
    authors_baydin: bool = False


METHODS: dict[str, Method] = {
    "random": Method(mode="none", tuned=(), merge_train_val=True),
    "random-xlr": Method(mode="none", tuned=(), merge_train_val=True, lr_multiplier=(0.95, 1.01)),
    "random-3batched": Method(mode="none", tuned=(), merge_train_val=True),  # derived from "random"
    "lorraine": Method(tuned=("weight_decay",)),
    # Clarke et al.'s Baydin baseline (configs/Baydin.yaml + BaydinHypergradientDescent in their code)
    "baydin": Method(mode="baydin", tuned=("lr",), merge_train_val=True, authors_baydin=True),
    # the earlier "baydin" of this package (Adam 0.05 on log10 lr through the step, training split only)
    "baydin-ours": Method(mode="baydin", tuned=("lr",)),
    "ours-wd-lr": Method(tuned=("lr", "weight_decay")),
    "ours-wd-lr-m": Method(),
    "ours-wd-hdlr-m": Method(per_weight_lr=True),
    "diff-through-opt": Method(mode="unroll"),
}


@dataclass
class ClarkeConfig:
    dataset: str = "energy"
    methods: Sequence[str] = ("random", "ours-wd-lr-m")
    inits: int = 40
    steps: int = 4000
    seed: int = 0
    interval: int = 10
    # None: a hyperparameter step every `interval` steps; M: bilevel.schedules.Adaptive(interval, max_interval=M)
    max_interval: int | None = None
    lookback: int = 5
    hyper_lr: float = 0.05
    baydin_hyper_lr: float = 0.001  # plain SGD step on log10 lr of the authors' Baydin (configs/Baydin.yaml)
    hidden: int = 50
    model: str = "auto"  # mlp (UCI, images), lstm (ptb), resnet18 (cifar10)
    lm_size: str = "cpu"  # ptb: "paper" (2 x 650 units, bptt 70, batch 40) or "cpu" (see LM_SIZES)
    grad_clip: float | None = None  # default 0.25 on ptb, as Clarke et al.
    batch_size: int | None = None  # None: full batch (UCI); 50 for image sets
    val_fraction: float | None = None
    test_fraction: float | None = None  # UCI: share of all rows held out for testing (None: Clarke's split files)
    record_every: int | None = None
    checkpoint_every: int = 500
    record_rows: int = 5000  # train/val/test losses are recorded on at most this many rows of each set
    eval_rows: int | None = None  # final val/test losses on at most this many rows (None: the whole sets)
    outlier_threshold: float | None = None  # final losses above it count as diverged (Clarke: 1e3 on Fashion-MNIST)
    lr_max: float = 0.1  # upper end of the initial learning rates, log-uniform from 1e-6 (Table 5: 0.1)
    on_divergence: str = "record"  # "record": diverged runs frozen and counted; "rollback": see TunerConfig
    # image inputs: "standardise" (zero mean, unit variance per pixel from the training rows, as the UCI inputs)
    # or "unit" (pixels in [0, 1]); see docs/clarke.md for why standardising matches the paper's baselines
    image_scaling: str = "standardise"
    data_dir: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)


#: configuration keys that may change between a run and its resume: the methods (cached one file each), where
#: the data are read from, the device (as before), and how often a checkpoint is written (it cannot change a result)
RESUME_FREE = ("methods", "device", "data_dir", "checkpoint_every")


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    names = (
        list(METHODS)
        if spec == "all" or spec == ["all"]
        else ([s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    )
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)} or 'all'")
    return names


def space_for(method: Method, lr_max: float = 0.1) -> H.HyperParameterSpace:
    """Table 5's space; ``lr_max`` widens (or narrows) the initial learning rates' range ``[1e-6, lr_max]``."""
    lr = H.learning_rate(granularity="element" if method.per_weight_lr else "scalar")
    if lr_max != 0.1:
        lr = replace(lr, init_high=math.log10(lr_max))
    return H.HyperParameterSpace([lr, H.weight_decay(), H.momentum()])


def validate_config(cfg: ClarkeConfig) -> list[str]:
    """Raise ``ValueError`` naming the first invalid field of ``cfg`` (before anything is written); return
    the parsed method names.

    ``lookback`` is per method: Diff-through-Opt unrolls ``lookback`` steps, so it needs ``>= 1``; the IFT
    methods use ``lookback`` Neumann steps (``lookback + 1`` terms), so 0 is legitimate there (one term,
    the identity approximation); ``random*`` and ``baydin*`` do not use it.
    """
    methods = parse_methods(cfg.methods)
    if not methods:
        raise ValueError("no methods given (--methods)")

    def at_least(name: str, low: int, optional: bool = False) -> None:
        v = getattr(cfg, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")

    for name in ("inits", "steps", "interval", "checkpoint_every", "hidden", "record_rows"):
        at_least(name, 1)
    for name in ("batch_size", "record_every", "eval_rows"):
        at_least(name, 1, optional=True)
    at_least("lookback", 0)
    if cfg.max_interval is not None and cfg.max_interval < cfg.interval:
        raise ValueError(f"--max-interval {cfg.max_interval} must be >= --interval {cfg.interval}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")
    for name in ("hyper_lr", "baydin_hyper_lr"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if v is not None and not 0 < v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a number in (0, 1), got {v!r}")
    for name in ("grad_clip", "outlier_threshold"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {v!r}")
    if not (isinstance(cfg.lr_max, (int, float)) and 1e-6 < cfg.lr_max <= 1.0):
        raise ValueError(f"--lr-max must be a number in (1e-6, 1], got {cfg.lr_max!r}")
    if cfg.on_divergence not in ("record", "rollback"):
        raise ValueError(f"--on-divergence must be 'record' or 'rollback', got {cfg.on_divergence!r}")
    unrolled = [m for m in methods if METHODS[m].mode == "unroll"]
    if unrolled and cfg.lookback < 1:
        raise ValueError(
            f"--lookback {cfg.lookback}: {', '.join(unrolled)} differentiates through the last "
            "--lookback weight steps, so it needs --lookback >= 1 (0 is fine for the IFT methods: "
            "one Neumann term)"
        )
    if "random-3batched" in methods and cfg.inits < 3:
        raise ValueError(
            f"random-3batched keeps the best of every three random runs: it needs --inits >= 3, got {cfg.inits}"
        )
    return methods
