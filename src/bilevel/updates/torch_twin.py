"""The differentiable twin of a ``torch.optim`` SGD / Adam / AdamW / RMSprop.

:func:`~bilevel.updates.from_torch` (one set of hyperparameters) and :func:`~bilevel.updates.twin`, which
keeps the optimiser's parameter groups: the hyperparameters that differ across groups become per-parameter
mappings (:class:`~bilevel.updates.TorchTwin`), applied by :class:`~bilevel.updates.WithDefaults`
(:meth:`~bilevel.updates.TorchTwin.with_defaults`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .adam import Adam, AdamW
from .defaults import WithDefaults
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = [
    "TwinRule",
    "from_torch",
    "TorchTwin",
    "twin",
]


TwinRule = SGD | Adam | AdamW | RMSprop
"""The differentiable twins of ``torch.optim``'s SGD, Adam, AdamW and RMSprop."""

_TORCH_KINDS: dict[type, str] = {
    torch.optim.SGD: "SGD",
    torch.optim.Adam: "Adam",
    torch.optim.AdamW: "AdamW",
    torch.optim.RMSprop: "RMSprop",
}


def _torch_kind(optimizer: torch.optim.Optimizer) -> str:
    kind = _TORCH_KINDS.get(type(optimizer))
    if kind is None:
        raise ValueError(
            f"cannot tune the hyperparameters of torch.optim.{type(optimizer).__name__}: its "
            "differentiable twin exists for SGD, Adam, AdamW and RMSprop (or pass bilevel.optim.SGD(...))"
        )
    return kind


def _float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, Tensor) else float(v)


def _group_hparams(kind: str, group: Mapping[str, Any]) -> dict[str, float]:
    """One parameter group's hyperparameters in the twin's names (``betas`` -> ``beta1, beta2``), as floats."""
    if kind == "SGD":
        names: tuple[str, ...] = ("lr", "momentum", "dampening", "weight_decay")
    elif kind == "RMSprop":
        names = ("lr", "alpha", "eps", "weight_decay", "momentum")
    else:
        b1, b2 = group["betas"]
        return {
            "lr": _float(group["lr"]),
            "beta1": _float(b1),
            "beta2": _float(b2),
            "eps": _float(group["eps"]),
            "weight_decay": _float(group["weight_decay"]),
        }
    return {h: _float(group[h]) for h in names}


def _group_structure(kind: str, group: Mapping[str, Any]) -> dict[str, bool]:
    """One parameter group's structural options (those the twin fixes at construction)."""
    if kind == "SGD":
        return {"nesterov": bool(group["nesterov"])}
    if kind == "RMSprop":
        return {"centered": bool(group["centered"])}
    return {
        "amsgrad": bool(group["amsgrad"]),
        "decoupled_weight_decay": kind == "AdamW" or bool(group.get("decoupled_weight_decay", False)),
    }


def _structure(optimizer: torch.optim.Optimizer) -> tuple[str, dict[str, bool]]:
    """``(kind, structural options)`` of ``optimizer``; refuses ``maximize`` and groups differing structurally."""
    kind = _torch_kind(optimizer)
    groups = optimizer.param_groups
    for i, g in enumerate(groups):
        if g.get("maximize"):
            raise ValueError(
                f"maximize=True (parameter group {i}) is not supported by the differentiable twin; "
                "minimise the negated objective instead"
            )
    structs = [_group_structure(kind, g) for g in groups]
    for opt in structs[0]:
        vals = [st[opt] for st in structs]
        if len(set(vals)) > 1:
            raise ValueError(
                f"the {type(optimizer).__name__} optimiser's parameter groups differ in the structural option "
                f"{opt!r} ({vals} by group): the differentiable twin needs one value for all groups"
            )
    return kind, structs[0]


def _make_rule(kind: str, struct: Mapping[str, bool], f: Mapping[str, float]) -> TwinRule:
    if kind == "SGD":
        return SGD(
            lr=f["lr"],
            momentum=f["momentum"],
            dampening=f["dampening"],
            weight_decay=f["weight_decay"],
            nesterov=struct["nesterov"],
        )
    if kind == "RMSprop":
        return RMSprop(
            lr=f["lr"],
            alpha=f["alpha"],
            eps=f["eps"],
            weight_decay=f["weight_decay"],
            momentum=f["momentum"],
            centered=struct["centered"],
        )
    cls = AdamW if struct["decoupled_weight_decay"] else Adam
    return cls(
        lr=f["lr"],
        beta1=f["beta1"],
        beta2=f["beta2"],
        eps=f["eps"],
        weight_decay=f["weight_decay"],
        amsgrad=struct["amsgrad"],
    )


def from_torch(optimizer: torch.optim.Optimizer) -> SGD | Adam | AdamW | RMSprop:
    """The differentiable twin of a ``torch.optim`` SGD / Adam / AdamW / RMSprop, with its hyperparameters.

    ``torch.optim.Adam(..., decoupled_weight_decay=True)`` gives :class:`AdamW`. For parameter groups
    with different hyperparameters, and to carry the optimiser's state, use :func:`twin`.

    Args:
        optimizer: the ``torch.optim`` optimiser; all its parameter groups must share every hyperparameter.

    Returns:
        The rule whose fields are the optimiser's hyperparameters.

    Raises:
        ValueError: for other optimisers, for options the twin lacks (``maximize``) and for parameter
            groups with different hyperparameters.
    """
    kind, struct = _structure(optimizer)
    per_group = [_group_hparams(kind, g) for g in optimizer.param_groups]
    differ = [h for h in per_group[0] if any(g[h] != per_group[0][h] for g in per_group[1:])]
    if differ:
        raise ValueError(
            f"the optimiser's parameter groups differ in {differ}; tuning needs one value to start from "
            "(bilevel.updates.twin keeps one value per group)"
        )
    return _make_rule(kind, struct, per_group[0])


@dataclass(frozen=True)
class TorchTwin:
    """The differentiable twin of a ``torch.optim`` optimiser with parameter groups (:func:`twin`).

    Attributes:
        rule: the twin (:class:`SGD`, :class:`Adam`, :class:`AdamW` or :class:`RMSprop`). Its fields hold every
            hyperparameter that is equal across the (non-empty) groups; for one that differs, the field holds
            the first group's value (for ``momentum`` the first non-zero one, so that :meth:`SGD.init_state`
            allocates the buffer) and :attr:`per_param` the values that apply.
        groups: the parameter names of each of ``optimizer.param_groups``, in group and parameter order.
        per_param: ``{hyperparameter: {param_name: value}}`` for every hyperparameter that differs across
            groups (empty when none does).
        group_values: ``{hyperparameter: (value of group 0, value of group 1, ...)}`` for every hyperparameter
            of the rule, as the optimiser's groups hold them (e.g. to initialise a ``"group"``-granularity
            :class:`bilevel.hparams.HyperParameter`, or to write tuned values back into the groups).
    """

    rule: SGD | Adam | AdamW | RMSprop
    groups: tuple[tuple[str, ...], ...]
    per_param: dict[str, dict[str, float]]
    group_values: dict[str, tuple[float, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        """All the optimiser's parameter names, in group order."""
        return tuple(k for g in self.groups for k in g)

    def with_defaults(self) -> WithDefaults:
        """The rule to step with: :attr:`rule` filling untuned hyperparameters from :attr:`per_param`.

        Returns:
            ``WithDefaults(self.rule, self.per_param)``: the optimiser's update, group by group, with
            ``u = rule(params, grads, hparams + per-group values, state)``.
        """
        return WithDefaults(self.rule, self.per_param)


def _group_names(optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor]) -> tuple[tuple[str, ...], ...]:
    """The names (keys of ``named``) of each parameter group's parameters; refuses parameters ``named`` lacks."""
    by_id: dict[int, str] = {}
    for k, t in named.items():
        by_id.setdefault(id(t), k)
    missing: list[str] = []
    groups: list[tuple[str, ...]] = []
    for i, g in enumerate(optimizer.param_groups):
        names: list[str] = []
        for j, p in enumerate(g["params"]):
            name = by_id.get(id(p))
            if name is None:
                missing.append(f"group {i}, parameter {j} (shape {tuple(p.shape)})")
            else:
                names.append(name)
        groups.append(tuple(names))
    if missing:
        raise ValueError(
            f"the {type(optimizer).__name__} optimiser holds parameters that `named` lacks: {missing}; pass "
            "dict(model.named_parameters()) of the model the optimiser was built on"
        )
    return tuple(groups)


def twin(optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor]) -> TorchTwin:
    """The differentiable twin of a ``torch.optim`` SGD / Adam / AdamW / RMSprop with parameter groups.

    Parameter group ``i`` of the optimiser applies its hyperparameters ``lambda_i`` to its parameters;
    the twin reproduces

    .. math::  w \\leftarrow w - u(\\lambda_{i(w)}, w)

    with one rule whose differing hyperparameters are per-parameter mappings
    ``{param_name: lambda_{i(param)}}`` (:attr:`TorchTwin.per_param`, applied by
    :meth:`TorchTwin.with_defaults`). Tensor-valued ``lr`` (and ``betas``) are turned into floats,
    ``betas`` into ``beta1, beta2``, and ``torch.optim.Adam(decoupled_weight_decay=True)`` gives
    :class:`AdamW`. For SGD whose groups differ in momentum, a group with momentum 0 (which torch steps
    without a buffer, ignoring its dampening) gets dampening 0: the twin's buffer is then ``d`` and its
    update ``eta d``, torch's exactly.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam``, ``AdamW`` or ``RMSprop``.
        named: the caller's parameter names to tensors, e.g. ``dict(model.named_parameters())``; every
            parameter of the optimiser must be one of them (by identity). Tensors the optimiser does not
            hold are left out of the groups.

    Returns:
        The :class:`TorchTwin`: the rule, the names per group, the per-parameter values of the
        hyperparameters that differ across groups and every hyperparameter's value per group.

    Raises:
        ValueError: for other optimisers, ``maximize=True``, groups that differ in a structural option
            (``nesterov``, ``amsgrad``, ``decoupled_weight_decay``, ``centered``), Nesterov momentum with
            non-zero dampening, and optimiser parameters missing from ``named``.
    """
    kind, struct = _structure(optimizer)
    groups = _group_names(optimizer, named)
    raw = [_group_hparams(kind, g) for g in optimizer.param_groups]
    used = [i for i, g in enumerate(groups) if g] or list(range(len(groups)))  # groups holding parameters

    def differs(h: str) -> bool:
        return len({eff[i][h] for i in used}) > 1

    eff = [dict(v) for v in raw]
    if kind == "SGD" and differs("momentum"):
        for v in eff:
            if v["momentum"] == 0:
                v["dampening"] = 0.0  # torch ignores it without momentum; mu = 0, tau = 0 gives u = eta d
    if kind == "SGD" and struct["nesterov"]:
        bad = [i for i in used if eff[i]["momentum"] != 0 and eff[i]["dampening"] != 0]
        if bad:
            raise ValueError(f"SGD: Nesterov momentum requires zero dampening (parameter groups {bad})")
    fields: dict[str, float] = {}
    per_param: dict[str, dict[str, float]] = {}
    for h in raw[0]:
        vals = [eff[i][h] for i in used]
        fields[h] = vals[0]
        if differs(h):
            if h == "momentum":
                fields[h] = next(v for v in vals if v != 0)
            per_param[h] = {k: eff[i][h] for i in used for k in groups[i]}
    return TorchTwin(
        rule=_make_rule(kind, struct, fields),
        groups=groups,
        per_param=per_param,
        group_values={h: tuple(v[h] for v in raw) for h in raw[0]},
    )
