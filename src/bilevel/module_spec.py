"""What the front door tunes, from where it starts, and how: :class:`bilevel.Tuner`'s settings, read once.

:func:`parse_tune` reads ``tune=``, :func:`hyperparameter_specs` builds the hyperparameters and their start
values from the optimiser (or its parameter groups) and the penalty, :func:`optimised_weights` finds the
weights the optimiser holds, and :func:`strategy_and_schedule` turns ``strategy=`` / ``schedule=`` (and the
older keyword names) into the loop's :mod:`bilevel.strategies` strategy and :mod:`bilevel.loop` schedule.
Its defaults are the loop's (:class:`bilevel.config.TunerConfig`, :func:`bilevel.strategies.default_solver`):
IFT with :class:`~bilevel.solvers.AutoNeumann` (``lookback`` steps) for one model, ``Neumann(lookback,
alpha=1)`` for a population, a hyperparameter step every 10 weight steps, warm start.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import strategies as S
from .config import TunerConfig
from .hparams import Granularity, HyperParameter, for_rule, start_value
from .loop import Every, Schedule
from .updates import SGD, Adam, AdamW, RMSprop, TorchTwin

__all__ = [
    "ModuleLoss",
    "DEFAULT_TUNED",
    "STRATEGIES",
    "optimised_weights",
    "parse_tune",
    "hyperparameter_specs",
    "warn_double_decay",
    "rule_names",
    "strategy_and_schedule",
    "to_device",
    "supervised",
    "batch_size",
]

#: ``loss(model, batch) -> scalar``: any function of the module (called as ``model(x)``) and a batch
ModuleLoss = Callable[[nn.Module, Any], Tensor]
#: what ``tune=None`` tunes: the learning rate, and momentum / weight decay where the optimiser uses them
DEFAULT_TUNED = ("lr", "momentum", "weight_decay")
#: the strategies ``strategy=`` may name
STRATEGIES = S.MODES
#: the keywords of earlier versions and what replaces each
_OLDER = {
    "mode": "strategy=",
    "interval": "schedule=",
    "solver": "strategy=IFT(solver)",
    "implicit": "strategy=IFT(implicit=...)",
    "warm_start": "schedule=Every(T, cold_steps=N)",
    "cold_steps": "schedule=Every(T, cold_steps=N)",
    "share_gradient": "strategy=SharedGradient(IFT())",
}


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (lists, tuples, dicts) moved to ``device``.

    Args:
        batch: a tensor, or a list / tuple / mapping of them (nested), or anything else (returned as it is).
        device: where to move the tensors.

    Returns:
        The batch of the same structure and container types (``dict``, ``OrderedDict``, transformers'
        ``BatchEncoding``, ...; a mapping type that cannot be rebuilt from a dict gives a ``dict``).
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        items = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return cast(Any, type(batch))(items)
        except TypeError:
            return items
    return batch


def supervised(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> ModuleLoss:
    """``loss_fn(model(*inputs), target)`` for a batch ``(inputs..., target)``.

    Args:
        loss_fn: e.g. ``F.cross_entropy``.

    Returns:
        ``loss(model, batch) -> scalar``, refusing a batch that is not ``(inputs..., target)`` with one line.
    """

    def loss(model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(
                "with loss_fn=, each batch must be (inputs, target); pass train_loss=/val_loss= "
                "callables (model, batch) -> scalar for other batches"
            )
        return loss_fn(model(*batch[:-1]), batch[-1])

    return loss


def batch_size(batch: Any) -> int:
    """The number of examples in ``batch`` (the leading size of its first tensor; 1 for anything else).

    Args:
        batch: a tensor, or a sequence / mapping whose first entry is one.

    Returns:
        The batch size, for size-weighted means.
    """
    first = (
        batch[0]
        if isinstance(batch, (list, tuple))
        else next(iter(batch.values()))
        if isinstance(batch, Mapping)
        else batch
    )
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1


def optimised_weights(
    model: nn.Module, trainable: Mapping[str, Tensor], torch_opt: torch.optim.Optimizer | None
) -> dict[str, Tensor]:
    """The weights to train: the model's trainable parameters that the optimiser holds.

    Args:
        model: the module.
        trainable: its parameters with ``requires_grad``, by name.
        torch_opt: the ``torch.optim`` optimiser, or ``None`` for a ``bilevel.optim`` rule (then all of them).

    Returns:
        ``{name: parameter}`` in the model's order.

    Raises:
        ValueError: when the optimiser holds tensors that are not the model's trainable parameters, or none.
    """
    if torch_opt is None:
        return dict(trainable)
    held = [p for g in torch_opt.param_groups for p in g["params"]]
    ids = {id(p) for p in trainable.values()}
    foreign = [tuple(p.shape) for p in held if id(p) not in ids]
    if foreign:
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        why = (
            "some have requires_grad=False"
            if any(id(p) in frozen for p in held)
            else "they are not the model's parameters"
        )
        raise ValueError(
            f"the {type(torch_opt).__name__} optimiser holds tensors of shapes {foreign} that the Tuner cannot "
            f"train ({why}): build it on the model's trainable parameters"
        )
    held_ids = {id(p) for p in held}
    named = {k: v for k, v in trainable.items() if id(v) in held_ids}
    if not named:
        raise ValueError("the optimiser holds none of the model's trainable parameters")
    return named


def hyperparameter_specs(
    granularity: Mapping[str, str],
    penalty: Any,
    penalty_h: Mapping[str, HyperParameter],
    names: list[str],
    rule: Any,
    twin: TorchTwin | None,
) -> tuple[list[HyperParameter], dict[str, Any]]:
    """The hyperparameter specifications and their natural initial values (from the optimiser's groups).

    Args:
        granularity: ``{name: granularity}`` of the tuned hyperparameters (:func:`parse_tune`).
        penalty: the loss-form penalty, or ``None``.
        penalty_h: the penalty's hyperparameters by name.
        names: the trained weights' names.
        rule: the update rule (its values start the scalar ones when there is no twin).
        twin: the differentiable twin of a ``torch.optim`` optimiser (its groups' values start them), or ``None``.

    Returns:
        ``(specs, init)``: the :class:`~bilevel.hparams.HyperParameter` list and their natural start values
        (:func:`bilevel.hparams.start_value`: a decay at 0 starts at ``ZERO_DECAY_START``).

    Raises:
        ValueError: for a granularity the optimiser or the penalty cannot give.
    """
    specs: list[HyperParameter] = []
    init: dict[str, Any] = {}
    for name, g in granularity.items():
        if name in penalty_h:
            h = penalty_h[name]
            if g != h.granularity.value:
                raise ValueError(f"{name!r} is the penalty's own hyperparameter: set its granularity on the penalty")
            specs.append(h)
            init[name] = start_value(h, float(penalty.initial()[name]), decay=True)
            continue
        groups = twin.groups if twin is not None else None
        if g == "group":
            if groups is None:
                raise ValueError(
                    f"tune[{name!r}]='group' needs a torch.optim optimiser (one value per parameter group)"
                )
            h = for_rule(name, g, groups=groups)
        else:
            h = for_rule(name, g, params=None if g == "scalar" else names)
        specs.append(h)
        decay = name == "weight_decay"
        if twin is None:
            init[name] = start_value(h, float(getattr(rule, name)), decay=decay)
            continue
        values = twin.group_values[name]
        filled = [v for v, grp in zip(values, groups or ()) if grp]
        if g == "scalar" and len(set(filled)) > 1:
            raise ValueError(
                f"the optimiser's parameter groups differ in {name} ({list(values)}): tune it per group "
                f"(tune={{{name!r}: 'group'}}) or per tensor ('tensor')"
            )
        starts = [start_value(h, float(v), decay=decay) for v in values]
        if g == "scalar":
            init[name] = starts[0] if not filled else start_value(h, float(filled[0]), decay=decay)
        elif g == "group":
            init[name] = starts
        else:
            init[name] = {k: starts[i] for i, grp in enumerate(groups or ()) for k in grp}
    return specs, init


def warn_double_decay(optimizer: Any, granularity: Mapping[str, str]) -> None:
    """A penalty on top of an optimiser that decays the weights too: say so (a warning, not an error).

    Args:
        optimizer: the optimiser given to the Tuner.
        granularity: the tuned hyperparameters (a tuned ``weight_decay``: no warning).
    """
    if "weight_decay" in granularity:
        return
    if isinstance(optimizer, torch.optim.Optimizer):
        decays = sorted({float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups} - {0.0})
    else:
        decays = [float(getattr(optimizer, "weight_decay", 0.0))] if getattr(optimizer, "weight_decay", 0) else []
    if decays:
        warnings.warn(
            f"the {type(optimizer).__name__} optimiser also decays the weights (weight_decay="
            f"{decays[0] if len(decays) == 1 else decays}); the tuned penalty comes on top of it. Build the "
            "optimiser with weight_decay=0 to have only the penalty",
            UserWarning,
            stacklevel=4,
        )


def parse_tune(
    tune: Any, hyperparameters: Sequence[str], penalty_h: Mapping[str, HyperParameter], rule: Any
) -> dict[str, str]:
    """``{name: granularity}`` from the Tuner's ``tune=`` (see :class:`bilevel.Tuner`).

    Args:
        tune: ``None``, a name, names, or ``{name: granularity}``.
        hyperparameters: the optimiser's hyperparameter names.
        penalty_h: the penalty's hyperparameters by name.
        rule: the optimiser (its momentum / decay values decide the default).

    Returns:
        ``{name: "scalar" | "group" | "tensor" | "element"}``.

    Raises:
        ValueError: for nothing to tune or an unknown granularity.
    """
    if tune is None:
        names = list(penalty_h) or [
            n for n in DEFAULT_TUNED if n in hyperparameters and (n == "lr" or float(getattr(rule, n, 0.0)) != 0.0)
        ]
        if not names:
            raise ValueError("nothing to tune: pass tune=(...) or a penalty")
        return {n: penalty_h[n].granularity.value if n in penalty_h else "scalar" for n in names}
    if isinstance(tune, str):
        tune = (tune,)
    items = (
        tune.items()
        if isinstance(tune, Mapping)
        else [(n, penalty_h[n].granularity.value if n in penalty_h else "scalar") for n in tune]
    )
    out = {}
    for n, g in items:
        try:
            out[n] = Granularity(g).value
        except ValueError:
            raise ValueError(
                f"tune[{n!r}]: unknown granularity {g!r}; use 'scalar', 'group', 'tensor' or 'element'"
            ) from None
    if not out:
        raise ValueError("tune is empty: name at least one hyperparameter")
    return out


def rule_names(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The hyperparameter names of a ``torch.optim`` optimiser's twin (those ``tune=`` may name).

    Args:
        optimizer: a ``torch.optim`` optimiser.

    Returns:
        Its twin's hyperparameter names, or ``()`` for an optimiser without a twin.
    """
    twins: dict[type, type[SGD | Adam | RMSprop]] = {
        torch.optim.SGD: SGD,
        torch.optim.Adam: Adam,
        torch.optim.AdamW: AdamW,
        torch.optim.RMSprop: RMSprop,
    }
    rule = twins.get(type(optimizer))
    return rule.hyperparameters if rule is not None else ()


def strategy_and_schedule(
    strategy: str | S.Strategy,
    schedule: int | Schedule,
    lookback: int,
    implicit: str,
    old: Mapping[str, Any],
) -> tuple[S.Strategy, Schedule]:
    """The loop's strategy and schedule from :class:`bilevel.Tuner`'s ``strategy=``, ``schedule=`` and ``lookback=``.

    ``strategy="ift"`` is :class:`~bilevel.strategies.IFT` with the default solver
    (:func:`bilevel.strategies.default_solver`) and the residual ``implicit``;
    ``"unroll"`` is :class:`~bilevel.strategies.Unrolled` (``lookback`` steps), ``"baydin"``
    :class:`~bilevel.strategies.Baydin`, ``"none"`` :class:`~bilevel.strategies.NoTuning`; a strategy object is
    used as it is (an :class:`~bilevel.strategies.IFT` without a solver gets the default one). An integer
    ``schedule`` T is :class:`~bilevel.loop.Every` (T) (Baydin: every step). ``old`` holds the keywords of
    earlier versions (``mode``, ``interval``, ``solver``, ``implicit``, ``warm_start``, ``cold_steps``,
    ``share_gradient``), each mapped to its place here with a ``DeprecationWarning``.

    Args:
        strategy: a name in :data:`STRATEGIES` or a strategy.
        schedule: T, or a schedule.
        lookback: Neumann steps of the default solver, or unrolled steps.
        implicit: the default residual of IFT (``"update"`` when an optimiser hyperparameter is tuned).
        old: the older keyword arguments given.

    Returns:
        ``(strategy, schedule)``.

    Raises:
        TypeError: for an unknown keyword.
        ValueError: for an unknown strategy name, or an older keyword that contradicts a new one.
    """
    unknown = [k for k in old if k not in _OLDER]
    if unknown:
        raise TypeError(f"Tuner() got unexpected keyword arguments {unknown}")
    for k in old:
        warnings.warn(f"Tuner({k}=...) is deprecated: pass {_OLDER[k]}", DeprecationWarning, stacklevel=3)
    # an older keyword may only fill in what the new ones left at their defaults: never override silently
    clash = [k for k in old if k in ("mode", "solver", "implicit", "share_gradient") and strategy != "ift"]
    clash += [k for k in old if k == "interval" and schedule != TunerConfig.interval]
    clash += [k for k in old if k in ("warm_start", "cold_steps") and not isinstance(schedule, int)]
    if clash:
        raise ValueError(f"Tuner({', '.join(f'{k}=' for k in clash)}...) contradicts strategy= / schedule=: pass one")
    if "mode" in old:
        strategy = old["mode"]
    if "interval" in old:
        schedule = int(old["interval"])
    unused = [k for k in ("solver", "implicit", "share_gradient") if k in old and strategy != "ift"]
    unused += ["cold_steps"] if "cold_steps" in old and old.get("warm_start") is not False else []
    if unused:
        warnings.warn(f"Tuner({', '.join(f'{k}=' for k in unused)}...) has no effect here", UserWarning, stacklevel=3)
    implicit = old.get("implicit") or implicit
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)} or a bilevel.strategies object")
        if strategy == "ift":
            strategy = S.IFT(old.get("solver"), implicit)  # type: ignore[arg-type]  # no solver: the default
            if old.get("share_gradient"):
                strategy = S.SharedGradient(strategy)
        else:
            strategy = {"unroll": lambda: S.Unrolled(lookback), "baydin": S.Baydin, "none": S.NoTuning}[strategy]()
    if not isinstance(strategy, S.Strategy):
        raise TypeError(
            f"strategy must be a name in {list(STRATEGIES)} or a bilevel.strategies object, got {strategy!r}"
        )
    if isinstance(schedule, bool) or not (isinstance(schedule, int) or hasattr(schedule, "due")):
        raise TypeError(f"schedule must be an integer T or a bilevel.loop schedule, got {schedule!r}")
    if isinstance(schedule, int):
        cold = old.get("cold_steps", 100) if old.get("warm_start") is False else None
        return strategy, Every(1) if isinstance(strategy, S.Baydin) else Every(schedule, cold_steps=cold)
    return strategy, schedule
