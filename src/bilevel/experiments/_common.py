"""Helpers shared by the Lorraine et al. (2020) studies (inverse-study, overfit-validation, distill, val-split).

* the solver choice on the command line (``--solver neumann|cg|identity|exact --steps K``);
* the per-weight (or single, global) weight-decay tuner: Algorithm 1 of Lorraine et al. on a
  classifier through :class:`bilevel.tuner.OnlineTuner`;
* accuracies, rich tables and results files.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import population as pop
from .._io import atomic_write_json
from ..hparams import HyperParameterSpace, weight_decay
from ..solvers import ConjugateGradient, Exact, Identity, Neumann, Solver

SOLVERS = ("neumann", "cg", "identity", "exact")


def add_solver_arguments(p: argparse.ArgumentParser, solver: str = "neumann", steps: int = 20,
                         alpha: float | None = None) -> None:
    """``--solver``, ``--steps``, ``--alpha`` and ``--damping`` (the inverse-Hessian approximation)."""
    p.add_argument("--solver", choices=SOLVERS, default=solver,
                   help=f"inverse-Hessian approximation in the IFT hypergradient (default {solver})")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"Neumann terms / CG iterations (default {steps})")
    p.add_argument("--alpha", type=float, default=alpha,
                   help="Neumann step size alpha (default: " + ("1/lambda_max(J) by power iteration" if alpha is None
                                                                 else str(alpha)) + ")")
    p.add_argument("--damping", type=float, default=0.0,
                   help="proximal damping eps: (J + eps I)^-1 (Vicol et al. 2021; default 0)")


def make_solver(name: str, steps: int, alpha: float | None = 1.0, damping: float = 0.0,
                divergence: str = "raise") -> Solver:
    """The solver called ``name`` (``neumann``, ``cg``, ``identity``, ``exact``) with ``steps`` terms/iterations.

    Neumann is Lorraine et al. (2020) Alg. 3; CG their Table 1 comparison; identity the
    T1-T2 approximation (Luketina et al. 2016); exact a dense solve (small problems only).
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    if name == "neumann":
        return Neumann(steps, alpha=1.0 if alpha is None else alpha, damping=damping, divergence=divergence)
    if name == "cg":
        return ConjugateGradient(steps, damping=damping)
    if name == "identity":
        return Identity(damping)
    return Exact(damping)


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
    from ..data import load_cifar10, load_cifar100, load_mnist

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


# --------------------------------------------------------------------------- weight-decay tuning


DECAY = "l2"
"""Name of the decay hyperparameter: not an update-rule hyperparameter name (``weight_decay``), so the decay
enters only as the loss-form penalty :func:`weight_decay_penalty`, whichever rule steps the weights."""


def decay_space(per_weight: bool, max_decay: float | None = None) -> HyperParameterSpace:
    """One weight decay per weight (Lorraine et al. Sec. 5.2, 5.6) or one global decay, both in log10 space.

    The hyperparameter is called :data:`DECAY` (raw keys ``"l2/<param>"``).

    ``max_decay`` clips the natural value to ``[1e-12, max_decay]`` (raw-space clamp, zero gradient while
    clipped): with SGD at learning rate ``lr`` a decay above ``2/lr`` makes the weight steps diverge.
    """
    clip = None if max_decay is None else (1e-12, float(max_decay))
    return HyperParameterSpace([weight_decay("element" if per_weight else "scalar", clip=clip, name=DECAY)])


OPTIMIZERS = ("sgd", "adam")


def weight_decay_penalty(params: Mapping[str, Tensor], nat: Mapping[str, Any]) -> Tensor:
    """Per-member L2 penalty ``1/2 sum_i lambda_i w_i^2`` of a stacked population, shape (P,).

    ``nat[DECAY]`` is the natural value from :func:`decay_space`: shape (P,) for one global
    decay, or ``{name: (P, ...)}`` for one decay per weight. Its gradient ``lambda * w`` is what
    ``torch.optim``'s (coupled) ``weight_decay`` adds to the training gradient.
    """
    from ..regularizers import l2_penalty

    wd = nat[DECAY]
    per = {k: (pop.per_member(wd, p) if isinstance(wd, Tensor) else wd[k]).expand_as(p) for k, p in params.items()}
    return torch.stack([l2_penalty(pop.member(params, i), pop.member(per, i)) for i in range(pop.size(params))])


def tune_weight_decay(
    forward: Callable[[Any, Tensor], Tensor],
    params: Mapping[str, Tensor],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    per_weight: bool,
    solver: Solver,
    steps: int,
    interval: int = 10,
    lr: float = 0.1,
    optimizer: str = "sgd",
    implicit: str | None = None,
    hyper_lr: float = 0.01,
    hyper_eps: float = 1e-8,
    init_decay: float = 1e-3,
    max_decay: float | None = None,
    raw: Mapping[str, Tensor] | None = None,
    batch_size: int | None = None,
    tune: bool = True,
    seed: int = 0,
    eval_every: int | None = None,
    on_eval: Callable[[int, dict[str, Tensor]], None] | None = None,
    progress: Callable[[int], None] | None = None,
):
    """Algorithm 1 of Lorraine et al. (2020) with weight decay as the hyperparameter, via :class:`OnlineTuner`.

    The training objective is ``L_T(w) + 1/2 sum lambda_i w_i^2`` (one ``lambda`` per weight or one in
    total; :func:`weight_decay_penalty`) on ``train``. The weights step on it with ``optimizer``:
    ``"sgd"`` (``w <- w - lr (dL_T/dw + lambda * w)``) or ``"adam"`` (``torch.optim.Adam`` with coupled L2
    ``weight_decay``; Lorraine et al. App. E: "for the NN weights we use Adam with a learning rate of
    1e-4"). Every ``interval`` steps the IFT hypergradient of the validation cross-entropy on ``val``
    moves ``log10 lambda`` by RMSprop with ``hyper_lr`` (App. E: RMSprop, 1e-2).

    ``implicit`` picks the fixed point the IFT differentiates (default: ``"update"`` for SGD, ``"loss"``
    for Adam). ``"loss"`` is Lorraine et al.'s Alg. 2-3: ``J`` is the Hessian ``H`` of the penalised
    training loss and ``dr/dlambda = d^2 L_T / dw dlambda`` (``= w`` per weight), independent of the
    optimiser, so a Neumann ``solver`` with ``alpha`` is their Alg. 3 with step ``alpha``. ``"update"``
    differentiates the optimiser's step ``u(lambda, w) = 0`` (Clarke et al. 2022 eq. 4-7); for SGD
    ``J = lr * H``, so Neumann with ``alpha = 1`` is Alg. 3 with ``alpha = lr``.

    Decays are clipped to ``[1e-12, max_decay]`` (default ``1/lr`` for SGD, where a decay above ``2/lr``
    makes the steps diverge; no upper clip for Adam, whose steps are bounded by ``lr``).
    ``raw`` (one member's raw decays, e.g. tuned ones) replaces ``init_decay``. ``tune=False`` keeps
    ``lambda`` fixed (training with given decays, e.g. re-training). ``batch_size`` draws seeded
    minibatches (``None``: full batch). ``on_eval(t, params)`` is called every ``eval_every`` steps with
    member 0's weights. Returns the tuner (``tuner.raw`` holds the decays,
    ``tuner.history.diverged_at[0]`` the step a non-finite value appeared, else ``None``).
    """
    from ..tuner import OnlineTuner, TunerConfig
    from ..updates import SGD, Adam

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown weight optimiser {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    implicit = implicit or ("update" if optimizer == "sgd" else "loss")
    if max_decay is None and optimizer == "sgd":
        max_decay = 1.0 / lr
    space = decay_space(per_weight, max_decay=max_decay)
    stacked = pop.stack([dict(params)])
    if raw is None:
        raw = space.from_natural(params, {DECAY: init_decay})
    raw = pop.stack([{k: v.detach() for k, v in raw.items()}])
    loss = pop.vmap_loss(forward, F.cross_entropy)
    cfg = TunerConfig(tuned=(DECAY,), interval=interval, mode="ift" if tune else "none", solver=solver,
                      hyper_lr=hyper_lr, hyper_optimizer=functools.partial(torch.optim.RMSprop, eps=hyper_eps), record_every=10**9, seed=seed,
                      implicit=implicit)  # type: ignore[arg-type]
    rule = SGD(lr=lr) if optimizer == "sgd" else Adam(lr=lr)
    tuner = OnlineTuner(stacked, raw, space, rule, loss, loss, penalty=weight_decay_penalty, config=cfg)
    gen = torch.Generator().manual_seed(seed)

    def sampler(X: Tensor, y: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
        if batch_size is None or batch_size >= len(X):
            return lambda: (X, y)

        def draw() -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, len(X), (batch_size,), generator=gen).to(X.device)
            return X[idx], y[idx]

        return draw

    train_batches, val_batches = sampler(*train), sampler(*val)
    chunk = eval_every or steps
    done = 0
    if on_eval is not None:
        on_eval(0, pop.member(tuner.params, 0))
    while done < steps:
        n = min(chunk, steps - done)
        tuner.run(n, train_batches, val_batches, progress=progress)
        done += n
        if on_eval is not None:
            on_eval(done, pop.member(tuner.params, 0))
    return tuner


def tuned_raw(tuner) -> dict[str, Tensor]:
    """Member 0's raw hyperparameters (detached)."""
    return {k: v.detach()[0].clone() for k, v in tuner.raw.items()}


def decay_summary(tuner) -> dict[str, float]:
    """Median, min and max of the tuned natural weight decays (member 0)."""
    nat = tuner.space.natural({k: v.detach() for k, v in tuner.raw.items()})[DECAY]
    vals = [nat] if isinstance(nat, Tensor) else list(nat.values())
    flat = torch.cat([v[0].reshape(-1).to(torch.float64) for v in vals])
    return {"median": float(flat.median()), "min": float(flat.min()), "max": float(flat.max()), "count": flat.numel()}
