"""A ``torch.optim`` optimiser's state and its twin's, both ways.

:func:`~bilevel.updates.state_from_torch` and :func:`~bilevel.updates.state_to_torch` carry the
optimiser's momentum buffers, moments and step counts into the twin's state and back, so that a plain
``torch.optim`` loop continues where the twin (:func:`~bilevel.updates.twin`) stopped, and vice versa,
step for step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .adam import Adam
from .base import State, UpdateRule
from .defaults import WithDefaults
from .rmsprop import RMSprop
from .sgd import SGD
from .torch_twin import TwinRule, _float, _group_names, _structure, _torch_kind

__all__ = [
    "state_from_torch",
    "state_to_torch",
]


def _base_rule(rule: UpdateRule, optimizer: torch.optim.Optimizer) -> TwinRule:
    """The twin inside ``rule`` (unwrapping :class:`WithDefaults`), checked against ``optimizer``'s kind."""
    base = rule.rule if isinstance(rule, WithDefaults) else rule
    kind, struct = _structure(optimizer)
    expected: dict[str, type] = {"SGD": SGD, "Adam": Adam, "AdamW": Adam, "RMSprop": RMSprop}
    if not isinstance(base, expected[kind]):
        raise ValueError(
            f"the rule {type(base).__name__} is not the twin of torch.optim.{type(optimizer).__name__}; "
            "build it with bilevel.updates.twin(optimizer, named)"
        )
    assert isinstance(base, (SGD, Adam, RMSprop))
    for opt in ("nesterov", "amsgrad", "centered"):
        if opt in struct and bool(getattr(base, opt)) != struct[opt]:
            raise ValueError(
                f"the rule has {opt}={getattr(base, opt)} but the {type(optimizer).__name__} optimiser "
                f"{opt}={struct[opt]}; build the rule with bilevel.updates.twin(optimizer, named)"
            )
    return base


def _count(steps: Mapping[str, float], optimizer: torch.optim.Optimizer, what: str) -> int:
    """The one step count of all parameters; ``ValueError`` when they differ."""
    counts = sorted(set(steps.values()))
    if len(counts) > 1:
        by = {c: [k for k, v in steps.items() if v == c] for c in counts}
        raise ValueError(
            f"the {type(optimizer).__name__} optimiser's parameters have taken different numbers of steps "
            f"({what}: {by}); torch.optim skips a parameter without a gradient, but the twin keeps one step "
            "count for all: give every parameter a gradient (zeros where it has none) at every step"
        )
    c = counts[0] if counts else 0.0
    if c != int(c) or c < 0:
        raise ValueError(f"the {type(optimizer).__name__} optimiser's step count {c} is not a whole number")
    return int(c)


def _buffers(base: TwinRule) -> tuple[str, ...]:
    """Buffer names of the twin's state, which are also ``torch.optim``'s per-parameter state keys."""
    if isinstance(base, SGD):
        return ("momentum_buffer",)
    if isinstance(base, Adam):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if base.amsgrad else ())
    return ("square_avg",) + (("grad_avg",) if base.centered else ()) + ("momentum_buffer",)


def state_from_torch(optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor], rule: UpdateRule) -> State:
    """The twin's state equal to a ``torch.optim`` optimiser's per-parameter state.

    ``optimizer.state[p]`` holds, per parameter, torch's buffers under the twin's buffer names (SGD
    ``momentum_buffer``; Adam/AdamW ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with AMSGrad;
    RMSprop ``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg`` when centred). The result is
    ``{"step": t, buffer: {param_name: copy of torch's buffer}}`` with ``t`` the (common) number of steps
    taken, so the twin's next step ``rule(params, grads, hparams, state)`` is the optimiser's next
    ``step()``. torch keeps no step count for SGD: its first step sets ``b = d`` when the momentum buffer
    is ``None``, which the twin does when ``step == 0``; so SGD gives ``t = 0`` before the first momentum
    step and ``t = 1`` after it. Buffers torch lacks (e.g. a group without momentum) are zeros. An
    optimiser that never stepped gives ``rule.init_state``.

    Args:
        optimizer: the ``torch.optim`` optimiser.
        named: the caller's parameter names to tensors (as for :func:`twin`).
        rule: the twin (:attr:`TorchTwin.rule` or :meth:`TorchTwin.with_defaults`).

    Returns:
        The state for the optimiser's parameters (the names of :attr:`TorchTwin.groups`): detached copies
        with each parameter's dtype and device; ``step`` is a 0-d int64 tensor.

    Raises:
        ValueError: when the rule does not match the optimiser, or the parameters have taken different
            numbers of steps (torch skips a parameter without a gradient).
    """
    base = _base_rule(rule, optimizer)
    groups = _group_names(optimizer, named)
    params = {k: named[k].detach() for g in groups for k in g}
    fresh = base.init_state(params)
    st = {k: optimizer.state.get(named[k], {}) for k in params}
    if isinstance(base, SGD):
        moving = [k for g, names in zip(optimizer.param_groups, groups) if g["momentum"] != 0 for k in names]
        steps = {k: float(st[k].get("momentum_buffer") is not None) for k in moving}
        count = _count(steps, optimizer, "1: a momentum buffer, 0: none yet")
    else:
        steps = {k: _float(st[k]["step"]) if "step" in st[k] else 0.0 for k in params}
        count = _count(steps, optimizer, "steps")
    if count == 0:
        return fresh
    state: State = {**fresh, "step": torch.full_like(fresh["step"], count)}
    required = _buffers(base)
    for key in required:
        if isinstance(base, (SGD, RMSprop)) and key == "momentum_buffer":
            if key not in fresh and not any(st[k].get(key) is not None for k in params):
                continue  # no momentum anywhere: the twin allocates the buffer when momentum is tuned
        out: dict[str, Tensor] = {}
        for k, p in params.items():
            t = st[k].get(key)
            if t is None:
                if key not in ("momentum_buffer", "grad_avg"):
                    raise ValueError(f"the optimiser's state of parameter {k!r} lacks {key!r}")
                out[k] = torch.zeros_like(p)
                continue
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"the optimiser's {key!r} of parameter {k!r} has shape {tuple(t.shape)}, not {p.shape}"
                )
            out[k] = t.detach().to(dtype=p.dtype, device=p.device, copy=True)
        state[key] = out
    return state


def _torch_step(kind: str, group: Mapping[str, Any], p: Tensor, count: int) -> Tensor:
    """A per-parameter ``step`` tensor as ``torch.optim`` makes it (dtype, device) for ``count`` steps."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    if group.get("fused"):
        return torch.tensor(float(count), dtype=torch.float32, device=p.device)
    if group.get("capturable"):
        return torch.tensor(float(count), dtype=dtype, device=p.device)
    if kind == "RMSprop":
        return torch.tensor(float(count), dtype=dtype)  # torch: the default device
    return torch.tensor(float(count), dtype=dtype, device="cpu")


def state_to_torch(
    state: State, optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor], rule: UpdateRule
) -> None:
    """Write the twin's state into a ``torch.optim`` optimiser, so that its next ``step()`` is the twin's.

    The inverse of :func:`state_from_torch`: for each parameter ``p`` of the optimiser,
    ``optimizer.state[p]`` is replaced by copies of the twin's buffers (``state[buffer][name]``, as
    ``torch.empty_like(p)``) and, for Adam/AdamW/RMSprop, ``step = t`` (``t = state["step"]``) as torch
    makes it: a float tensor (float32, float64 under a float64 default dtype) on the CPU, or on ``p``'s
    device when ``capturable``/``fused``; one tensor per parameter, as torch increments them in place.
    ``t == 0`` (the twin never stepped) empties ``optimizer.state[p]``, torch's state before its first
    step; for SGD ``t > 0`` writes the momentum buffers (torch's "not the first step"). Every buffer
    the twin's state holds is written, also for a group whose options do not read it (momentum 0: torch
    then ignores it), so a tuned value written into ``optimizer.param_groups`` before or after this call
    continues from the twin's buffer. The weights and the groups' hyperparameters are not written.

    Args:
        state: the twin's state (one member: ``step`` is 0-d).
        optimizer: the ``torch.optim`` optimiser to write into.
        named: the caller's parameter names to tensors (as for :func:`twin`).
        rule: the twin (:attr:`TorchTwin.rule` or :meth:`TorchTwin.with_defaults`).

    Raises:
        ValueError: when the rule does not match the optimiser, the state lacks a buffer the optimiser
            needs (e.g. momentum in a group the twin ran without it) or a buffer has the wrong shape.
    """
    base = _base_rule(rule, optimizer)
    kind = _torch_kind(optimizer)
    groups = _group_names(optimizer, named)
    step = state["step"]
    if isinstance(step, Tensor) and step.dim() != 0:
        raise ValueError(f"state_to_torch takes one member's state; its step has shape {tuple(step.shape)}")
    count = int(step)
    for g, names in zip(optimizer.param_groups, groups):
        needed = {
            "momentum_buffer": (g["momentum"] != 0) if isinstance(base, (SGD, RMSprop)) else False,
            "grad_avg": bool(g.get("centered", False)),
        }
        for k in names:
            p = named[k]
            if count == 0:
                optimizer.state.pop(p, None)
                continue
            new: dict[str, Any] = {} if isinstance(base, SGD) else {"step": _torch_step(kind, g, p, count)}
            for key in _buffers(base):
                buf = state.get(key)
                if buf is None or k not in buf:
                    if needed.get(key, True):
                        raise ValueError(
                            f"the twin's state lacks {key!r} for parameter {k!r}, which the "
                            f"{type(optimizer).__name__} optimiser needs"
                        )
                    continue
                v = buf[k]
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"the twin's {key!r} of parameter {k!r} has shape {tuple(v.shape)}, not {p.shape}")
                with torch.no_grad():
                    new[key] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(v)
            if new:
                optimizer.state[p] = new
            else:
                optimizer.state.pop(p, None)
