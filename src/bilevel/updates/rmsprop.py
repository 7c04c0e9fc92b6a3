"""Differentiable RMSprop (momentum, centred variant, L2 weight decay), the twin of ``torch.optim.RMSprop``.

Defines :class:`~bilevel.updates.RMSprop`, re-exported by :mod:`bilevel.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import HValue, State, _fadd, _fmul, _fsafe_sqrt, _fusable, _prev, _RuleMixin, _safe_sqrt, _zero_step, _zeros

__all__ = [
    "RMSprop",
]


@dataclass(frozen=True)
class RMSprop(_RuleMixin):
    """RMSprop (Tieleman & Hinton, 2012) as in ``torch.optim.RMSprop``.

    With smoothing ``alpha``, L2 weight decay ``xi`` and momentum ``mu``:

    .. math::
        d &= g + \\xi w, \\quad s_t = \\alpha s_{t-1} + (1-\\alpha) d^2 \\\\
        a &= \\sqrt{s_t} + \\epsilon \\;\\text{or, centred,}\\;
             \\sqrt{s_t - \\bar g_t^2} + \\epsilon
             \\text{ with } \\bar g_t = \\alpha \\bar g_{t-1} + (1-\\alpha) d \\\\
        u &= \\eta\\, d / a \\;\\text{(no momentum)}, \\qquad
        u = \\eta\\, b_t,\\; b_t = \\mu b_{t-1} + d / a \\;\\text{(momentum)}

    All buffers start at zero (no first-step special case in torch).
    ``centered`` is structural; ``lr, alpha, eps, weight_decay, momentum`` are
    differentiable hyperparameters. A momentum buffer is used when
    ``momentum != 0`` or ``"momentum"`` is in ``hparams``.

    State: ``{"step", "square_avg", ["grad_avg"], ["momentum_buffer"]}``.

    Args:
        lr: the default learning rate eta.
        alpha: the default smoothing constant.
        eps: the default epsilon added to the denominator.
        weight_decay: the default L2 weight decay xi (added to the gradient).
        momentum: the default momentum mu (non-zero: a momentum buffer is kept).
        centered: the centred variant (structural).
    """

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False

    hyperparameters: ClassVar[tuple[str, ...]] = ("lr", "alpha", "eps", "weight_decay", "momentum")

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """Fresh RMSprop state: step 0, zero ``square_avg`` (and ``grad_avg``, ``momentum_buffer`` as configured).

        Args:
            params: the weights by name (shapes, dtypes and devices of the buffers).

        Returns:
            The state: ``{"step": 0-d int64 zero, buffer_name: {param_name: zeros}, ...}``.
        """
        state: State = {"step": _zero_step(params), "square_avg": _zeros(params)}
        if self.centered:
            state["grad_avg"] = _zeros(params)
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
        """Return ``(u, new_state)`` for one RMSprop step; new weights are ``w - u``."""
        hparams, state, use_wd = self._begin(params, grads, hparams, state)
        use_momentum = self.momentum != 0 or "momentum" in hparams
        if _fusable(params, grads, hparams):
            return self._fused(params, grads, hparams, state, use_wd, use_momentum)
        u: dict[str, Tensor] = {}
        sq: dict[str, Tensor] = {}
        gavg: dict[str, Tensor] = {}
        bufs: dict[str, Tensor] = {}
        for k, w in params.items():
            d = grads[k]
            if use_wd:
                d = d + self._h(hparams, "weight_decay", k, w) * w
            alpha = self._h(hparams, "alpha", k, w)
            eps = self._h(hparams, "eps", k, w)
            s = alpha * state["square_avg"][k] + (1 - alpha) * d * d
            sq[k] = s
            if self.centered:
                ga = alpha * _prev(state, "grad_avg", k, w) + (1 - alpha) * d
                gavg[k] = ga
                avg = _safe_sqrt(s - ga * ga) + eps
            else:
                avg = _safe_sqrt(s) + eps
            lr = self._h(hparams, "lr", k, w)
            if use_momentum:
                mu = self._h(hparams, "momentum", k, w)
                buf = mu * _prev(state, "momentum_buffer", k, w) + d / avg
                bufs[k] = buf
                u[k] = lr * buf
            else:
                u[k] = lr * (d / avg)
        new_state: State = {**state, "step": state["step"] + 1, "square_avg": sq}
        if self.centered:
            new_state["grad_avg"] = gavg
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
        """:meth:`__call__` as one ``torch._foreach_*`` call per operation, in the same order (no graph, CPU)."""
        keys = list(params)
        d = self._fused_gradients(params, grads, hparams, use_wd)

        def h(name: str) -> list[float | Tensor]:
            return self._hs(hparams, name, params)

        alpha = h("alpha")
        rest = [1 - a for a in alpha]
        sq = list(
            torch._foreach_add(
                _fmul([state["square_avg"][k] for k in keys], alpha), torch._foreach_mul(_fmul(d, rest), d)
            )
        )
        new_state: State = {**state, "step": state["step"] + 1, "square_avg": dict(zip(keys, sq))}
        if self.centered:
            prev = [_prev(state, "grad_avg", k, params[k]) for k in keys]
            ga = list(torch._foreach_add(_fmul(prev, alpha), _fmul(d, rest)))
            new_state["grad_avg"] = dict(zip(keys, ga))
            avg = _fadd(_fsafe_sqrt(list(torch._foreach_sub(sq, torch._foreach_mul(ga, ga)))), h("eps"))
        else:
            avg = _fadd(_fsafe_sqrt(sq), h("eps"))
        step = list(torch._foreach_div(d, avg))
        if use_momentum:
            prev = [_prev(state, "momentum_buffer", k, params[k]) for k in keys]
            step = list(torch._foreach_add(_fmul(prev, h("momentum")), step))
            new_state["momentum_buffer"] = dict(zip(keys, step))
        return dict(zip(keys, _fmul(step, h("lr")))), new_state
