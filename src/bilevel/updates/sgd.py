"""Differentiable SGD (momentum, dampening, Nesterov, L2 weight decay), the twin of ``torch.optim.SGD``.

Defines :class:`~bilevel.updates.SGD`, re-exported by :mod:`bilevel.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import HValue, State, _fmul, _fusable, _prev, _RuleMixin, _zero_step, _zeros

__all__ = [
    "SGD",
]


@dataclass(frozen=True)
class SGD(_RuleMixin):
    """Stochastic gradient descent as in ``torch.optim.SGD`` (without ``maximize``).

    With learning rate ``eta``, momentum ``mu``, dampening ``tau`` and weight
    decay ``xi`` (all hyperparameters), per weight:

    .. math::
        d &= g + \\xi w \\\\
        b_t &= d \\;\\text{(first step)},\\qquad b_t = \\mu b_{t-1} + (1-\\tau) d \\;\\text{(later)} \\\\
        u &= \\eta\\, b_t \\;\\text{(heavy ball)}, \\qquad u = \\eta\\,(d + \\mu b_t) \\;\\text{(Nesterov)}

    and ``u = eta * d`` when no momentum buffer is used.

    Clarke et al. (2022, Appendix A.4, eq. 10) write
    ``v <- mu v + g + xi w``, ``u = eta v`` with ``v`` starting at zero. This
    equals the rule above whenever ``tau = 0`` (then ``mu * 0 + d = d`` at the
    first step). ``torch.optim.SGD`` instead *sets* the buffer to ``d`` at
    the first step, without dampening; we follow torch, selecting the branch
    with ``torch.where(step == 0, ...)`` (differentiable and vmap-friendly).

    A momentum buffer is used when ``momentum != 0`` or ``"momentum"`` is in
    ``hparams``. ``nesterov`` is a structural option (not a hyperparameter)
    and, as in torch, requires zero dampening.

    State: ``{"step": int64 0-d tensor, "momentum_buffer": {name: Tensor}}``
    (the buffer only when ``momentum != 0`` at construction; it is created as
    zeros on demand otherwise).

    Args:
        lr: the default learning rate eta.
        momentum: the default momentum mu (non-zero: a momentum buffer is kept).
        dampening: the default dampening tau.
        weight_decay: the default L2 weight decay xi (added to the gradient).
        nesterov: Nesterov momentum (structural; needs ``dampening == 0``).

    Raises:
        ValueError: when ``nesterov`` is set with a non-zero ``dampening``.
    """

    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    hyperparameters: ClassVar[tuple[str, ...]] = ("lr", "momentum", "dampening", "weight_decay")

    def __post_init__(self) -> None:
        if self.nesterov and self.dampening != 0:
            raise ValueError("SGD: Nesterov momentum requires zero dampening")

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """Fresh SGD state: step 0, and a zero momentum buffer when ``momentum != 0``.

        Args:
            params: the weights by name (shapes, dtypes and devices of the buffers).

        Returns:
            The state: ``{"step": 0-d int64 zero, buffer_name: {param_name: zeros}, ...}``.
        """
        state: State = {"step": _zero_step(params)}
        if self.momentum != 0:
            state["momentum_buffer"] = _zeros(params)
        return state

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        """Return ``(u, new_state)`` for one SGD step; new weights are ``w - u``."""
        hparams, state, use_wd = self._begin(params, grads, hparams, state)
        if self.nesterov and "dampening" in hparams:
            raise ValueError("SGD: Nesterov momentum requires zero dampening; do not tune 'dampening'")
        use_momentum = self.momentum != 0 or "momentum" in hparams
        step = state["step"]
        first = step == 0
        if _fusable(params, grads, hparams):
            return self._fused(params, grads, hparams, state, use_wd, use_momentum)
        u: dict[str, Tensor] = {}
        bufs: dict[str, Tensor] = {}
        for k, w in params.items():
            d = grads[k]
            if use_wd:
                d = d + self._h(hparams, "weight_decay", k, w) * w
            if use_momentum:
                mu = self._h(hparams, "momentum", k, w)
                tau = self._h(hparams, "dampening", k, w)
                prev = _prev(state, "momentum_buffer", k, w)
                buf = torch.where(first, d, mu * prev + (1 - tau) * d)
                bufs[k] = buf
                d = d + mu * buf if self.nesterov else buf
            u[k] = self._h(hparams, "lr", k, w) * d
        new_state: State = {**state, "step": step + 1}
        if use_momentum:
            new_state["momentum_buffer"] = bufs
        return u, new_state

    def _fused(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue],
        state: State,
        use_wd: bool,
        use_momentum: bool,
    ) -> tuple[dict[str, Tensor], State]:
        """:meth:`__call__` as one ``torch._foreach_*`` call per operation (no graph, CPU: see ``_fusable``)."""
        keys = list(params)
        d = self._fused_gradients(params, grads, hparams, use_wd)
        new_state: State = {**state, "step": state["step"] + 1}
        if use_momentum:
            mu = self._hs(hparams, "momentum", params)
            if bool(state["step"] == 0):  # torch.optim.SGD sets the buffer to d on the first step
                buf = [x.clone() for x in d]
            else:
                prev = [_prev(state, "momentum_buffer", k, params[k]) for k in keys]
                damp = [1 - t for t in self._hs(hparams, "dampening", params)]
                buf = list(torch._foreach_add(_fmul(prev, mu), _fmul(d, damp)))
            new_state["momentum_buffer"] = dict(zip(keys, buf))
            d = list(torch._foreach_add(d, _fmul(buf, mu))) if self.nesterov else buf
        return dict(zip(keys, _fmul(d, self._hs(hparams, "lr", params)))), new_state
