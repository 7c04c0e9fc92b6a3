"""The update-rule protocol and the helpers every rule shares.

An update rule is a differentiable weight-update map ``u(lambda, w)`` (Clarke et al. 2022, eq. 4): the new
weights are ``w - u`` (:func:`~bilevel.updates.apply`). This module holds the protocol
(:class:`~bilevel.updates.UpdateRule`), the state and hyperparameter-value types
(:data:`~bilevel.updates.State`, :data:`~bilevel.updates.HValue`), the per-parameter look-up of a
hyperparameter (:func:`~bilevel.updates.resolve`), :func:`~bilevel.updates.detach_state` and the private
helpers of the rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import check_like

__all__ = [
    "HValue",
    "State",
    "UpdateRule",
    "resolve",
    "apply",
    "detach_state",
]


State = dict[str, Any]
"""Optimiser state: ``{"step": 0-d int64 tensor, buffer_name: {param_name: Tensor}, ...}``."""

HValue = Tensor | Mapping[str, Tensor]
"""A hyperparameter value: a tensor broadcastable to every parameter, or a per-parameter mapping."""

_Scalar = float | Tensor


# --------------------------------------------------------------------------- helpers


def resolve(
    value: HValue | float,
    name: str,
    like: Tensor | None = None,
    *,
    hparam: str = "hyperparameter",
) -> Tensor:
    """The value of one hyperparameter for the parameter tensor called ``name``.

    ``value`` is either a tensor (shared by all parameters) or a mapping from
    parameter name to tensor. A Python number is accepted too and turned into
    a 0-d tensor (with ``like``'s dtype and device when given, so float64 runs
    do not lose precision).

    When ``like`` (the parameter tensor) is given, the result is checked to
    broadcast to ``like.shape`` without enlarging it, i.e. it is a scalar,
    a per-tensor value or a per-element value (Clarke et al.'s HDLR).

    Raises ``ValueError`` naming the parameter and the hyperparameter
    (``hparam``) when a mapping lacks ``name`` or the shape does not fit.
    The returned tensor is the stored one (no copy, graph preserved).

    Args:
        value: the hyperparameter's value: a tensor, a Python number, or ``{param_name: tensor}``.
        name: the parameter tensor's name.
        like: the parameter tensor (its shape is checked, its dtype and device used for a number), or ``None``.
        hparam: the hyperparameter's name, for error messages.

    Returns:
        The value for ``name``, broadcastable to ``like.shape`` when ``like`` is given.

    Raises:
        ValueError: when a mapping lacks ``name``, the value has another type, or its shape does not
            broadcast to ``like``'s without enlarging it.
    """
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(
                f"hyperparameter {hparam!r} is a mapping without an entry for parameter {name!r} "
                f"(it has keys {sorted(value)})"
            )
        value = value[name]
    if isinstance(value, Tensor):
        out = value
    elif isinstance(value, Real):
        if like is not None:
            out = torch.as_tensor(float(value), dtype=like.dtype, device=like.device)
        else:
            out = torch.as_tensor(float(value), dtype=torch.get_default_dtype())
    else:
        raise ValueError(
            f"hyperparameter {hparam!r} for parameter {name!r} must be a tensor, a number or a "
            f"mapping of tensors, got {type(value).__name__}"
        )
    if like is not None:
        # broadcasts to like.shape without enlarging it (torch.broadcast_shapes, written out: that one
        # costs about 50 us a call, a few percent of a small population's weight step)
        o, w = tuple(out.shape), tuple(like.shape)
        if len(o) > len(w) or any(a != 1 and a != b for a, b in zip(reversed(o), reversed(w))):
            raise ValueError(
                f"hyperparameter {hparam!r} for parameter {name!r} has shape {tuple(out.shape)}, "
                f"which does not broadcast to the parameter's shape {tuple(like.shape)}"
            )
    return out


def apply(params: Mapping[str, Tensor], u: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The new weights ``w - u`` (Clarke et al. 2022, eq. 4), key by key.

    Args:
        params: the weights w by name.
        u: the update u(lambda, w), the keys and shapes of ``params``.

    Returns:
        ``{name: w - u}`` (without a graph on a CPU: one fused subtraction, the same values).
    """
    if _fusable(params, u):
        return dict(zip(params, torch._foreach_sub(list(params.values()), [u[k] for k in params])))
    return {k: params[k] - u[k] for k in params}


def detach_state(state: State) -> State:
    """A copy of ``state`` with every tensor (also inside nested dicts) detached.

    Clarke et al. (2022, Appendix A.4) treat optimiser buffers as constants:
    "the only extra care required is to detach these buffers from the
    computational graph". Call this between steps for that behaviour; keep the
    state as returned to differentiate through several steps instead.

    Args:
        state: an optimiser state (tensors, possibly in nested dicts).

    Returns:
        The same structure with every tensor detached (not copied).
    """

    def _detach(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.detach()
        if isinstance(x, Mapping):
            return {k: _detach(v) for k, v in x.items()}
        return x

    return _detach(state)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with a zero (not NaN) derivative at ``x == 0``.

    ``torch.sqrt`` has an infinite derivative at 0, which turns into NaN
    (``inf * 0``) when a gradient entry is exactly zero (e.g. a dead unit).
    The forward value equals ``torch.sqrt`` for ``x >= 0``; negative inputs
    (only possible by round-off in centred RMSprop) give 0 instead of NaN.
    """
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _zero_step(params: Mapping[str, Tensor]) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _zeros(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def _prev(state: State, buffer: str, name: str, like: Tensor) -> Tensor:
    """A stored buffer entry, or zeros when the buffer was never allocated."""
    buf = state.get(buffer)
    if buf is None:
        return torch.zeros_like(like)
    return buf[name]


def _fusable(params: Mapping[str, Tensor], *others: Mapping[str, Any]) -> bool:
    """Whether a rule may take its fused path: no graph is being recorded, on plain CPU tensors.

    The weight step of :class:`bilevel.tuner.OnlineTuner` calls its rule under ``torch.no_grad()`` (its result
    is detached); then one ``torch._foreach_*`` call per operation over all the weights replaces the loop of
    per-tensor operations. On a CPU the fused calls run the same per-tensor kernels, so the result is the same
    bit for bit (tested against the per-tensor loop and ``torch.optim``); a graph, ``vmap``/``torch.func``
    transforms (of the weights, the gradients or the hyperparameters in ``others``) and other devices keep the
    per-tensor loop.
    """
    if torch.is_grad_enabled() or not params:
        return False
    tensors = list(params.values())
    for tree in others:
        for v in tree.values():
            tensors += [x for x in v.values() if isinstance(x, Tensor)] if isinstance(v, Mapping) else [v]
    return all(
        v.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(v)
        for v in tensors
        if isinstance(v, Tensor)
    )


def _fmul(xs: list[Tensor], hs: list[_Scalar]) -> list[Tensor]:
    """``[h * x for x, h in zip(xs, hs)]`` in one ``torch._foreach_mul`` call when the factors are all numbers or
    all tensors (per-tensor otherwise); elementwise, so the same values as the loop."""
    if all(isinstance(h, float) for h in hs) or all(isinstance(h, Tensor) for h in hs):
        return list(torch._foreach_mul(xs, hs))  # type: ignore[arg-type]
    return [h * x for x, h in zip(xs, hs)]


def _fsafe_sqrt(xs: list[Tensor]) -> list[Tensor]:
    """The values of :func:`_safe_sqrt` (``sqrt(x)`` for ``x > 0``, else 0, also for NaN), fused: one
    ``torch._foreach_sqrt`` and a NaN (of a negative or NaN input) set to 0."""
    return [torch.nan_to_num(r, nan=0.0, posinf=math.inf) for r in torch._foreach_sqrt(xs)]


def _fadd(xs: list[Tensor], hs: list[_Scalar]) -> list[Tensor]:
    """``[x + h for x, h in zip(xs, hs)]``, fused as :func:`_fmul`."""
    if all(isinstance(h, float) for h in hs) or all(isinstance(h, Tensor) for h in hs):
        return list(torch._foreach_add(xs, hs))  # type: ignore[arg-type]
    return [x + h for x, h in zip(xs, hs)]


def _is_zero(v: Any) -> bool:
    """Static check used to skip terms: only Python numbers count, never tensors."""
    return isinstance(v, Real) and float(v) == 0.0


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class UpdateRule(Protocol):
    """A differentiable weight-update map ``u(lambda, w)`` (Clarke et al. 2022, eq. 4).

    ``hyperparameters`` lists the names ``__call__`` accepts in ``hparams``.
    """

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The names ``__call__`` accepts in ``hparams`` (a class variable of the rules)."""
        ...

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """Fresh optimiser state for ``params`` (step counter 0, zero buffers).

        Args:
            params: the weights by name (shapes, dtypes and devices of the buffers).

        Returns:
            The state: ``{"step": 0-d int64 zero, buffer_name: {param_name: zeros}, ...}``.
        """
        ...

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue],
        state: State,
    ) -> tuple[dict[str, Tensor], State]:
        """Return ``(u, new_state)``; the new weights are ``w - u``."""
        ...


class _RuleMixin:
    """Shared argument checking and hyperparameter look-up."""

    hyperparameters: ClassVar[tuple[str, ...]] = ()

    def _check(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> None:
        cls = type(self).__name__
        unknown = [h for h in hparams if h not in self.hyperparameters]
        if unknown:
            raise ValueError(f"{cls} got unknown hyperparameter(s) {unknown}; it accepts {list(self.hyperparameters)}")
        check_like(f"{cls}: grads", grads, params, "params")
        for h, v in hparams.items():
            if isinstance(v, Mapping):
                extra_keys = [k for k in v if k not in params]
                if extra_keys:
                    raise ValueError(f"hyperparameter {h!r} is a mapping with unknown parameter name(s) {extra_keys}")
            for k, p in params.items():
                resolve(v, k, p, hparam=h)

    def _begin(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None,
        state: State | None,
    ) -> tuple[Mapping[str, HValue], State, bool]:
        """Defaults and checks shared by every rule; returns ``(hparams, state, use_weight_decay)``."""
        hparams = {} if hparams is None else hparams
        state = self.init_state(params) if state is None else state  # type: ignore[attr-defined]
        self._check(params, grads, hparams)
        return hparams, state, not _is_zero(getattr(self, "weight_decay", 0.0)) or "weight_decay" in hparams

    def _h(self, hparams: Mapping[str, Any], h: str, name: str, like: Tensor) -> _Scalar:
        """Hyperparameter ``h`` for parameter ``name``: the override if given, else the field."""
        if h in hparams:
            return resolve(hparams[h], name, like, hparam=h)
        return float(getattr(self, h))

    def _hs(self, hparams: Mapping[str, Any], h: str, params: Mapping[str, Tensor]) -> list[_Scalar]:
        """:meth:`_h` for every parameter, in order: the factors of a fused path."""
        return [self._h(hparams, h, k, w) for k, w in params.items()]

    def _fused_gradients(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], hparams: Mapping[str, Any], l2: bool
    ) -> list[Tensor]:
        """The gradients in ``params``' order, with the L2 decay ``g + xi w`` added when ``l2`` (fused)."""
        d = [grads[k] for k in params]
        if not l2:
            return d
        return list(torch._foreach_add(d, _fmul(list(params.values()), self._hs(hparams, "weight_decay", params))))
