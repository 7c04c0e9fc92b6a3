"""Helpers shared by the studies.

* the command-line validators of every study's numeric options (``type=`` of ``argparse``):
  :func:`positive_int`, :func:`nonnegative_int`, :func:`positive_float`, :func:`nonnegative_float`,
  :func:`finite_float`, :func:`fraction`, :func:`unit_interval`, :func:`seed`, :func:`int_list`,
  :func:`float_list`, :func:`existing_dir`, :func:`device`, so that a bad value is refused at parse time
  with one line, e.g. ``bilevel run clarke: error: argument --steps: must be an integer >= 1, got 0``;
* the per-initialisation seeds (:func:`derived_seed`, :data:`SEED_STRIDE`);
* the solver choice on the command line (``--solver neumann|cg|identity|exact --lookback K``) of the
  Lorraine et al. (2020) studies (inverse-study, overfit-validation, distill, val-split);
* accuracies, rich tables and results files.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.population import SEED_STRIDE, derived_seed
from bilevel.rundir import atomic_write_json
from bilevel.solvers import SOLVERS, Solver, make_solver

__all__ = [
    "positive_int",
    "threads",
    "THREADS_HELP",
    "nonnegative_int",
    "int_at_least",
    "positive_float",
    "nonnegative_float",
    "finite_float",
    "fraction",
    "unit_interval",
    "seed",
    "int_list",
    "float_list",
    "existing_dir",
    "device",
    "SEED_STRIDE",
    "derived_seed",
    "SEED_HELP",
    "add_solver_arguments",
    "add_deprecated_alias",
    "solver_from_args",
    "accuracy",
    "batched_logits",
    "config_of",
    "write_results",
    "print_table",
    "load_image_set",
]


# ---------------------------------------------------------------------------- option validators


def _validator(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """``type=`` for an integer option ``>= low`` (and ``<= high``)."""

    def check(text: str) -> int:
        v = _number(text, int)
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {low}" + (f" and <= {high}" if high is not None else "") + f", got {v}"
            )
        return v

    return _validator(f"integer >= {low}", check)


#: ``type=`` of counts, sizes, steps and intervals (``>= 1``)
positive_int = int_at_least(1)
#: ``type=`` of counts that may be zero (``>= 0``), e.g. Neumann steps
nonnegative_int = int_at_least(0)


def _threads(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


#: ``type=`` of ``--threads``: ``auto`` or an integer >= 1 (:mod:`bilevel.threads`)
threads = _validator("threads", _threads)
THREADS_HELP = (
    "CPU threads for torch: N, or auto (default): the cores other processes leave idle when the run starts "
    "(2 alone on a 2-core machine, 1 beside another run), kept on resume; pin N for results identical to the "
    "last bit under any load"
)


def _float_check(name: str, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def check(text: str) -> float:
        v = _number(text, float)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    return _validator(name, check)


#: ``type=`` of learning rates, temperatures, thresholds (finite, ``> 0``)
positive_float = _float_check("positive_float", lambda v: v > 0, "a number > 0")
#: ``type=`` of decays, damping, clipping (finite, ``>= 0``)
nonnegative_float = _float_check("nonnegative_float", lambda v: v >= 0, "a number >= 0")
#: ``type=`` of any finite number
finite_float = _float_check("finite_float", lambda v: True, "a finite number")
#: ``type=`` of a share of a data set: strictly between 0 and 1
fraction = _float_check("fraction", lambda v: 0 < v < 1, "a number in (0, 1)")
#: ``type=`` of rates and momenta in [0, 1]
unit_interval = _float_check("unit_interval", lambda v: 0 <= v <= 1, "a number in [0, 1]")

#: the largest ``--seed``: seeds derived from it (:func:`derived_seed`) stay below 2**63
MAX_SEED = 2**32 - 1
#: ``type=`` of ``--seed``
seed = _validator("seed", int_at_least(0, MAX_SEED))

SEED_HELP = (
    f"base seed S (0 .. {MAX_SEED}): initialisation i uses seed S * {SEED_STRIDE:_} + i, so different "
    f"seeds give disjoint initialisations (fewer than {SEED_STRIDE:_} per run), --seed 0 gives 0, 1, 2, ... "
    "and the same seed gives the same numbers"
)


def int_list(low: int = 0, empty: bool = False) -> Callable[[str], list[int]]:
    """``type=`` of a comma-separated list of integers ``>= low`` (at least one, unless ``empty``)."""

    def check(text: str) -> list[int]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            values = [int(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {low}, got {text!r}") from None
        if (not values and not empty) or any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"must be comma-separated integers >= {low}, got {text!r}")
        return values

    return _validator(f"integers >= {low}", check)


def float_list(
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    empty: bool = False,
) -> Callable[[str], list[float]]:
    """``type=`` of a comma-separated list of finite numbers in ``[low, high]`` (``open_*``: bound excluded; at
    least one, unless ``empty``)."""
    lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if open_high else '<='} {high:g}"
    what = (
        "comma-separated numbers" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    )

    def ok(v: float) -> bool:
        return (
            math.isfinite(v)
            and (low is None or (v > low if open_low else v >= low))
            and (high is None or (v < high if open_high else v <= high))
        )

    def check(text: str) -> list[float]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            values = [float(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (not values and not empty) or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return values

    return _validator("numbers", check)


def existing_dir(text: str) -> str:
    """``type=`` of ``--data-dir``: an existing directory (nothing is created for a mistyped one), as a string."""
    path = Path(text).expanduser()
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(
            f"{text} {why} (create it, or leave the option out to use $BILEVEL_DATA or ~/.cache/bilevel)"
        )
    return str(path)


def device(text: str) -> str:
    """``type=`` of ``--device``: a torch device that exists on this machine."""
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


class _DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's ``dest`` and says once, in one line, to use the new one."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import sys

        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Keep ``old`` working as a hidden, deprecated spelling of the option ``new`` (already added to ``p``).

    ``old`` takes the same values (``type=``, ``nargs``: pass them in ``kwargs`` as for ``new``) into ``new``'s
    ``dest``, is left out of ``--help`` and prints one line ``PROG: warning: OLD is deprecated; use NEW`` to
    stderr when used, so that recorded commands still run.
    """
    dest = next(a.dest for a in p._actions if new in a.option_strings)
    p.add_argument(
        old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
    )


def add_solver_arguments(
    p: argparse.ArgumentParser, solver: str = "neumann", lookback: int = 20, alpha: float | None = None
) -> None:
    """``--solver``, ``--lookback``, ``--alpha`` and ``--damping`` (the inverse-Hessian approximation).

    ``--lookback`` is the Neumann step count (or CG iterations) as in every study; ``--steps``, its old name in
    these commands (which have no weight-update ``--steps``), is kept as a deprecated alias.
    """
    p.add_argument(
        "--solver",
        choices=SOLVERS,
        default=solver,
        help=f"inverse-Hessian approximation in the IFT hypergradient (default {solver})",
    )
    p.add_argument(
        "--lookback",
        type=nonnegative_int,
        default=lookback,
        help=f"Neumann steps (lookback + 1 terms of the series; 0 = one term, alpha * I) / CG iterations "
        f"(default {lookback})",
    )
    add_deprecated_alias(p, "--steps", "--lookback", type=nonnegative_int)
    p.add_argument(
        "--alpha",
        type=positive_float,
        default=alpha,
        help="Neumann step size alpha (default: "
        + ("1/lambda_max(J) by power iteration" if alpha is None else str(alpha))
        + ")",
    )
    p.add_argument(
        "--damping",
        type=nonnegative_float,
        default=0.0,
        help="proximal damping eps: (J + eps I)^-1 (Vicol et al. 2021; default 0)",
    )


def check_solver_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` for a solver setting that cannot work: CG with 0 iterations returns zero."""
    if args.solver == "cg" and args.lookback < 1:
        raise ValueError(
            f"--solver cg needs --lookback >= 1 (CG iterations; 0 would return a zero solve), got {args.lookback}"
        )


def check_names(option: str, given: Sequence[str], known: Sequence[str]) -> list[str]:
    """The names of a comma-separated option, checked against ``known`` (``ValueError`` naming the unknown ones)."""
    names = [n for n in given if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{option}: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    return names


def names(text: str) -> list[str]:
    """The comma-separated names of an option (spaces and empty items dropped)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def solver_from_args(args: argparse.Namespace, alpha: float | None = None, divergence: str = "raise") -> Solver:
    """:func:`make_solver` from ``--solver/--lookback/--alpha/--damping``; ``alpha`` is the fallback for ``--alpha``."""
    a = args.alpha if args.alpha is not None else alpha
    return make_solver(args.solver, args.lookback, a, args.damping, divergence)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(-1) == y).to(torch.float64).mean())


def batched_logits(forward: Callable[[Any, Tensor], Tensor], params: Any, X: Tensor, batch: int = 2000) -> Tensor:
    """``forward(params, X)`` evaluated in chunks of ``batch`` rows (without gradients)."""
    with torch.no_grad():
        return torch.cat([forward(params, X[i : i + batch]) for i in range(0, len(X), batch)])


def config_of(args: argparse.Namespace) -> dict:
    """The command-line arguments as JSON-ready values (paths as strings, the dispatch function left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}


def write_results(out: Path, doc: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", doc, indent=1)
    return out / "results.json"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(f"{v:.4g}" if isinstance(v, float) else ("diverged" if v is None else str(v)) for v in r))
    (console or Console()).print(t)


def load_image_set(name: str, data_dir, experiment: str):
    """Official ``(X_train, y_train, X_test, y_test)`` uint8 images of ``mnist``, ``fashion-mnist``, ``cifar10``
    or ``cifar100``.

    A missing CIFAR set (they are not in the shared data) ends the run with a message saying where to put it.
    """
    from bilevel.data import load_cifar10, load_cifar100, load_mnist

    cifar = {
        "cifar10": (load_cifar10, "CIFAR-10", "cifar-10-batches-py"),
        "cifar100": (load_cifar100, "CIFAR-100", "cifar-100-python"),
    }
    if name in cifar:
        loader, title, folder = cifar[name]
        try:
            return loader(data_dir)
        except FileNotFoundError as exc:
            raise SystemExit(
                f"{experiment}: the {title} data are not available ({exc}). Put the {title} python "
                f"batches under $BILEVEL_DATA/{folder} or allow the download."
            ) from None
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"{experiment}: unknown image data set {name!r}")
    return load_mnist(data_dir, fashion=name == "fashion-mnist")
