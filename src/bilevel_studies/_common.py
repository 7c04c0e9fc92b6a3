"""Helpers shared by the Lorraine et al. (2020) studies (inverse-study, overfit-validation, distill, val-split).

* the solver choice on the command line (``--solver neumann|cg|identity|exact --steps K``);
* accuracies, rich tables and results files.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel._io import atomic_write_json
from bilevel.solvers import SOLVERS, Solver, make_solver


def add_solver_arguments(p: argparse.ArgumentParser, solver: str = "neumann", steps: int = 20,
                         alpha: float | None = None) -> None:
    """``--solver``, ``--steps``, ``--alpha`` and ``--damping`` (the inverse-Hessian approximation)."""
    p.add_argument("--solver", choices=SOLVERS, default=solver,
                   help=f"inverse-Hessian approximation in the IFT hypergradient (default {solver})")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"Neumann steps (steps + 1 terms of the series) / CG iterations (default {steps})")
    p.add_argument("--alpha", type=float, default=alpha,
                   help="Neumann step size alpha (default: " + ("1/lambda_max(J) by power iteration" if alpha is None
                                                                 else str(alpha)) + ")")
    p.add_argument("--damping", type=float, default=0.0,
                   help="proximal damping eps: (J + eps I)^-1 (Vicol et al. 2021; default 0)")


def solver_from_args(args: argparse.Namespace, alpha: float | None = None, divergence: str = "raise") -> Solver:
    """:func:`make_solver` from ``--solver/--steps/--alpha/--damping``; ``alpha`` is the fallback for ``--alpha``."""
    a = args.alpha if args.alpha is not None else alpha
    return make_solver(args.solver, args.steps, a, args.damping, divergence)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(-1) == y).to(torch.float64).mean())


def batched_logits(forward: Callable[[Any, Tensor], Tensor], params: Any, X: Tensor, batch: int = 2000) -> Tensor:
    """``forward(params, X)`` evaluated in chunks of ``batch`` rows (without gradients)."""
    with torch.no_grad():
        return torch.cat([forward(params, X[i:i + batch]) for i in range(0, len(X), batch)])


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

    cifar = {"cifar10": (load_cifar10, "CIFAR-10", "cifar-10-batches-py"),
             "cifar100": (load_cifar100, "CIFAR-100", "cifar-100-python")}
    if name in cifar:
        loader, title, folder = cifar[name]
        try:
            return loader(data_dir)
        except FileNotFoundError as exc:
            raise SystemExit(f"{experiment}: the {title} data are not available ({exc}). Put the {title} python "
                             f"batches under $BILEVEL_DATA/{folder} or allow the download.") from None
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"{experiment}: unknown image data set {name!r}")
    return load_mnist(data_dir, fashion=name == "fashion-mnist")
