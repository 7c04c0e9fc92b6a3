"""Weight decay as a hyperparameter: one per weight (Lorraine et al. 2020, sec. 5.2, 5.6) or one global decay.

The training objective is ``L_T(w) + 1/2 sum_i lambda_i w_i^2``; :func:`tune_weight_decay` runs
Algorithm 1 of Lorraine et al. on it (T weight steps, one IFT hypergradient step on ``log10 lambda``)
through :class:`bilevel.tuner.OnlineTuner`, with any :mod:`bilevel.solvers` solver. This is what
overfitting a validation set (Fig. 5), the validation-split study (Fig. 9) and the small-data
LSTM check use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import population as pop
from .hparams import IDENTITY, Granularity, HyperParameter, HyperParameterSpace, weight_decay
from .regularizers import l2_penalty
from .solvers import Solver, check_size
from .tuner import OnlineTuner, TunerConfig
from .updates import SGD, Adam

__all__ = [
    "DECAY",
    "decay_space",
    "OPTIMIZERS",
    "weight_decay_penalty",
    "tune_weight_decay",
    "tuned_raw",
    "decay_summary",
]

DECAY = "l2"
"""Name of the decay hyperparameter (raw keys ``"l2/<param>"``): a loss-form hyperparameter, entering only
through the penalty :func:`weight_decay_penalty` whichever rule steps the weights."""


def decay_space(per_weight: bool, max_decay: float | None = None, signed: bool = False) -> HyperParameterSpace:
    """One weight decay per weight (Lorraine et al. Sec. 5.2, 5.6) or one global decay, in log10 space.

    The hyperparameter is called :data:`DECAY` (raw keys ``"l2/<param>"``).

    ``max_decay`` clips the natural value to ``[1e-12, max_decay]`` (raw-space clamp, zero gradient while
    clipped): with SGD at learning rate ``lr`` a decay above ``2/lr`` makes the weight steps diverge.
    ``signed=True`` optimises the decay itself (identity transform, either sign, clipped to
    ``[-max_decay, max_decay]``): a negative decay pushes its weight away from zero, which a log-space
    decay cannot do.

    Args:
        per_weight: one decay per weight element (``True``) or one global decay.
        max_decay: the upper clip of the natural decay, or ``None`` for no clip.
        signed: optimise the decay itself, of either sign, instead of ``log10`` of it.

    Returns:
        A space with the one hyperparameter :data:`DECAY`.
    """
    g = "element" if per_weight else "scalar"
    if not signed:
        clip = None if max_decay is None else (1e-12, float(max_decay))
        return HyperParameterSpace([weight_decay(g, clip=clip, name=DECAY)])
    clip = None if max_decay is None else (-float(max_decay), float(max_decay))
    return HyperParameterSpace([HyperParameter(DECAY, IDENTITY, 0.0, 0.0, "natural", Granularity(g), clip)])


OPTIMIZERS = ("sgd", "adam")


def weight_decay_penalty(params: Mapping[str, Tensor], nat: Mapping[str, Any]) -> Tensor:
    """Per-member L2 penalty ``1/2 sum_i lambda_i w_i^2`` of a stacked population, shape (P,).

    ``nat[DECAY]`` is the natural value from :func:`decay_space`: shape (P,) for one global
    decay, or ``{name: (P, ...)}`` for one decay per weight. Its gradient ``lambda * w`` is what
    ``torch.optim``'s (coupled) ``weight_decay`` adds to the training gradient.

    Args:
        params: the stacked weights, each of shape ``(P, ...)``.
        nat: the natural hyperparameters by name (:data:`DECAY` among them).

    Returns:
        The penalty of each member, shape ``(P,)``.
    """
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
    implicit: Literal["update", "loss"] | None = None,
    hyper_lr: float = 0.01,
    hyper_eps: float = 1e-8,
    init_decay: float = 1e-3,
    max_decay: float | None = None,
    signed: bool = False,
    raw: Mapping[str, Tensor] | None = None,
    batch_size: int | None = None,
    tune: bool = True,
    seed: int = 0,
    eval_every: int | None = None,
    on_eval: Callable[[int, dict[str, Tensor]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> OnlineTuner:
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
    ``signed`` tunes decays of either sign (:func:`decay_space`).
    ``raw`` (one member's raw decays, e.g. tuned ones) replaces ``init_decay``. ``tune=False`` keeps
    ``lambda`` fixed (training with given decays, e.g. re-training). ``batch_size`` draws seeded
    minibatches (``None``: full batch). ``on_eval(t, params)`` is called every ``eval_every`` steps with
    member 0's weights. Returns the tuner (``tuner.raw`` holds the decays,
    ``tuner.history.diverged_at[0]`` the step a non-finite value appeared, else ``None``).

    Args:
        forward: ``forward(params, x) -> logits`` of one member.
        params: the initial weights of one member.
        train: the training set ``(X, y)`` (``y`` class indices).
        val: the validation set ``(X, y)``.
        per_weight: one decay per weight (``True``) or one global decay.
        solver: the :mod:`bilevel.solvers` solver of the IFT.
        steps: the number of weight steps.
        interval: weight steps between two hyperparameter steps (T).
        lr: the weights' learning rate.
        optimizer: the weight optimiser, ``"sgd"`` or ``"adam"``.
        implicit: the fixed point the IFT differentiates, ``"update"`` or ``"loss"`` (``None``: see above).
        hyper_lr: RMSprop's learning rate on ``log10 lambda``.
        hyper_eps: RMSprop's ``eps``.
        init_decay: the initial natural decay of every weight.
        max_decay: the upper clip of the decays (``None``: ``1/lr`` for SGD, none for Adam).
        signed: tune decays of either sign.
        raw: one member's raw decays to start from instead of ``init_decay``, or ``None``.
        batch_size: the minibatch size, or ``None`` for full batches.
        tune: ``False`` keeps the decays fixed.
        seed: the seed of the loop and of the minibatch draws.
        eval_every: weight steps between two calls of ``on_eval`` (``None``: only at the start and the end).
        on_eval: ``on_eval(t, params)`` with member 0's weights, or ``None``.
        progress: called with the number of weight steps just taken (e.g. a progress bar's ``update``), or
            ``None``.

    Returns:
        The :class:`~bilevel.tuner.OnlineTuner` after ``steps`` weight steps.

    Raises:
        ValueError: for an unknown ``optimizer``, or an :class:`~bilevel.solvers.Exact` solver too small for
            the model.
    """
    check_size(solver, sum(v.numel() for v in params.values()))
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown weight optimiser {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    implicit = implicit or ("update" if optimizer == "sgd" else "loss")
    if max_decay is None and optimizer == "sgd":
        max_decay = 1.0 / lr
    space = decay_space(per_weight, max_decay=max_decay, signed=signed)
    stacked = pop.stack([dict(params)])
    if raw is None:
        raw = space.from_natural(params, {DECAY: init_decay})
    raw = pop.stack([{k: v.detach() for k, v in raw.items()}])
    loss = pop.vmap_loss(forward, F.cross_entropy)
    cfg = TunerConfig(
        tuned=(DECAY,),
        interval=interval,
        mode="ift" if tune else "none",
        solver=solver,
        hyper_lr=hyper_lr,
        hyper_optimizer=functools.partial(torch.optim.RMSprop, eps=hyper_eps),
        record_every=10**9,
        implicit=implicit,
    )
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


def tuned_raw(tuner: OnlineTuner) -> dict[str, Tensor]:
    """Member 0's raw hyperparameters (detached).

    Args:
        tuner: a tuner from :func:`tune_weight_decay`.

    Returns:
        ``{key: raw value}`` of member 0, fresh tensors without the population axis.
    """
    return {k: v.detach()[0].clone() for k, v in tuner.raw.items()}


def decay_summary(tuner: OnlineTuner) -> dict[str, float]:
    """Median, min and max of the tuned natural weight decays (member 0).

    Args:
        tuner: a tuner from :func:`tune_weight_decay`.

    Returns:
        ``{"median", "min", "max", "count"}``: statistics over every decay of member 0 and their number.
    """
    nat = tuner.natural({k: v.detach() for k, v in tuner.raw.items()})[DECAY]
    vals = [nat] if isinstance(nat, Tensor) else list(nat.values())
    flat = torch.cat([v[0].reshape(-1).to(torch.float64) for v in vals])
    return {"median": float(flat.median()), "min": float(flat.min()), "max": float(flat.max()), "count": flat.numel()}
