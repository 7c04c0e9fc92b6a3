"""Differentiable Adam (optionally AMSGrad) and AdamW, the twins of ``torch.optim.Adam`` and ``AdamW``.

Defines :class:`~bilevel.updates.Adam` and :class:`~bilevel.updates.AdamW`, re-exported by :mod:`bilevel.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import HValue, State, _fadd, _fmul, _fsafe_sqrt, _fusable, _RuleMixin, _safe_sqrt, _zero_step, _zeros

__all__ = [
    "Adam",
    "AdamW",
]


def _adam_direction(
    rule: _RuleMixin,
    k: str,
    w: Tensor,
    g: Tensor,
    hparams: Mapping[str, Any],
    state: State,
    t: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Adam moments and the bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``.

    Returns ``(m, v, direction, v_max)`` where the direction already includes
    ``1 / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` exactly as torch orders them;
    with AMSGrad (a ``max_exp_avg_sq`` buffer in ``state``) the denominator uses
    ``v_max = max(v_max_prev, v_t)`` and ``v_max`` is returned, else ``None``.
    """
    b1 = rule._h(hparams, "beta1", k, w)
    b2 = rule._h(hparams, "beta2", k, w)
    eps = rule._h(hparams, "eps", k, w)
    m = b1 * state["exp_avg"][k] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"][k] + (1 - b2) * g * g
    bc1 = 1 - b1**t
    bc2_sqrt = torch.sqrt(1 - b2**t)
    vmax = torch.maximum(state["max_exp_avg_sq"][k], v) if "max_exp_avg_sq" in state else None  # AMSGrad
    direction = m / (_safe_sqrt(v if vmax is None else vmax) / bc2_sqrt + eps) / bc1
    return m, v, direction, vmax


@dataclass(frozen=True)
class Adam(_RuleMixin):
    """Adam (Kingma & Ba, 2015) as in ``torch.optim.Adam``, optionally AMSGrad.

    With ``t = step + 1`` and L2 weight decay ``xi`` added to the gradient:

    .. math::
        d &= g + \\xi w, \\quad m_t = \\beta_1 m_{t-1} + (1-\\beta_1) d,
        \\quad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) d^2 \\\\
        u &= \\frac{\\eta}{1-\\beta_1^t}\\,
             \\frac{m_t}{\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    This is Clarke et al. (2022, Appendix A.4, eq. 11) with torch's placement
    of ``epsilon`` (outside the square root). ``lr, beta1, beta2, eps,
    weight_decay`` are all differentiable hyperparameters. The square root has
    a zero (not infinite) derivative where ``v_t == 0``.

    ``amsgrad=True`` (Reddi et al. 2018; a structural option, as in torch) uses
    ``max(v_max, v_t)`` in the denominator, kept in ``"max_exp_avg_sq"``.
    ``betas=(beta1, beta2)`` is accepted as in ``torch.optim.Adam``.

    State: ``{"step", "exp_avg": {name: m}, "exp_avg_sq": {name: v}}`` (plus
    ``"max_exp_avg_sq"`` with AMSGrad); the bias corrections use ``step + 1``
    and the returned state has ``step + 1``.

    Args:
        lr: the default learning rate eta.
        beta1: the default decay rate of the first moment.
        beta2: the default decay rate of the second moment.
        eps: the default epsilon added to the denominator.
        weight_decay: the default L2 weight decay xi (decoupled in :class:`AdamW`).
        amsgrad: use AMSGrad (structural).
        betas: ``(beta1, beta2)`` in torch's spelling, replacing ``beta1`` and ``beta2``; ``None`` keeps them.
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    betas: tuple[float, float] | None = None  # torch's spelling; sets beta1, beta2

    hyperparameters: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "eps", "weight_decay")
    decoupled: ClassVar[bool] = False  # AdamW: True

    def __post_init__(self) -> None:
        if self.betas is not None:
            b1, b2 = self.betas
            object.__setattr__(self, "beta1", float(b1))
            object.__setattr__(self, "beta2", float(b2))
            object.__setattr__(self, "betas", None)

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """Fresh Adam state: step 0, zero moments (and ``max_exp_avg_sq`` with ``amsgrad``).

        Args:
            params: the weights by name (shapes, dtypes and devices of the buffers).

        Returns:
            The state: ``{"step": 0-d int64 zero, buffer_name: {param_name: zeros}, ...}``.
        """
        state = {"step": _zero_step(params), "exp_avg": _zeros(params), "exp_avg_sq": _zeros(params)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = _zeros(params)
        return state

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        """Return ``(u, new_state)`` for one Adam (AdamW) step; new weights are ``w - u``."""
        return _adam_call(self, params, grads, hparams, state, decoupled=self.decoupled)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019) as in ``torch.optim.AdamW``.

    Weight decay is decoupled from the gradient: torch first scales
    ``w <- (1 - eta xi) w`` and then takes an Adam step, so

    .. math::
        u = \\eta\\,\\xi\\, w + \\frac{\\eta}{1-\\beta_1^t}\\,
            \\frac{m_t}{\\sqrt{v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    with ``m_t, v_t`` the Adam moments of the raw gradient ``g`` (see
    :class:`Adam`). Same state and hyperparameters as :class:`Adam`; the
    default weight decay is ``1e-2``.

    Args:
        weight_decay: the default decoupled weight decay xi; the other fields are :class:`Adam`'s.
    """

    weight_decay: float = 1e-2
    decoupled: ClassVar[bool] = True


def _adam_call(
    rule: Adam | AdamW,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    hparams: Mapping[str, HValue] | None,
    state: State | None,
    *,
    decoupled: bool,
) -> tuple[dict[str, Tensor], State]:
    hparams, state, use_wd = rule._begin(params, grads, hparams, state)
    step = state["step"]
    if rule.amsgrad and "max_exp_avg_sq" not in state:
        state = {**state, "max_exp_avg_sq": _zeros(params)}
    if _fusable(params, grads, hparams):
        return _adam_fused(rule, params, grads, hparams, state, use_wd, decoupled)
    u: dict[str, Tensor] = {}
    ms: dict[str, Tensor] = {}
    vs: dict[str, Tensor] = {}
    vmaxs: dict[str, Tensor] = {}
    for k, w in params.items():
        t = (step + 1).to(w.dtype)
        g = grads[k]
        lr = rule._h(hparams, "lr", k, w)
        wd = rule._h(hparams, "weight_decay", k, w) if use_wd else 0.0
        if use_wd and not decoupled:
            g = g + wd * w
        ms[k], vs[k], direction, vmax = _adam_direction(rule, k, w, g, hparams, state, t)
        if vmax is not None:
            vmaxs[k] = vmax
        u[k] = lr * direction
        if use_wd and decoupled:
            u[k] = lr * wd * w + u[k]
    new_state = {**state, "step": step + 1, "exp_avg": ms, "exp_avg_sq": vs}
    if vmaxs:
        new_state["max_exp_avg_sq"] = vmaxs
    return u, new_state


def _adam_fused(
    rule: Adam | AdamW,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    hparams: Mapping[str, HValue],
    state: State,
    use_wd: bool,
    decoupled: bool,
) -> tuple[dict[str, Tensor], State]:
    """:func:`_adam_call` as one ``torch._foreach_*`` call per operation, in the same order (no graph, CPU: see
    ``_fusable``); the bias corrections are computed once per distinct ``(beta, dtype)``."""
    keys = list(params)
    w = [params[k] for k in keys]

    def h(name: str) -> list[float | Tensor]:
        return rule._hs(hparams, name, params)

    step = state["step"]
    b1, b2, eps, lr = h("beta1"), h("beta2"), h("eps"), h("lr")
    corrections: dict[tuple[Any, Any, torch.dtype], tuple[Tensor, Tensor]] = {}
    bc1: list[Tensor] = []
    bc2_sqrt: list[Tensor] = []
    for x, y, p in zip(b1, b2, w):
        key = (x if isinstance(x, float) else id(x), y if isinstance(y, float) else id(y), p.dtype)
        if key not in corrections:
            t = (step + 1).to(p.dtype)
            corrections[key] = (1 - x**t, torch.sqrt(1 - y**t))
        bc1.append(corrections[key][0])
        bc2_sqrt.append(corrections[key][1])
    g = rule._fused_gradients(params, grads, hparams, use_wd and not decoupled)
    m = list(torch._foreach_add(_fmul([state["exp_avg"][k] for k in keys], b1), _fmul(g, [1 - x for x in b1])))
    gg = torch._foreach_mul(_fmul(g, [1 - y for y in b2]), g)
    v = list(torch._foreach_add(_fmul([state["exp_avg_sq"][k] for k in keys], b2), gg))
    new_state: State = {**state, "step": step + 1, "exp_avg": dict(zip(keys, m)), "exp_avg_sq": dict(zip(keys, v))}
    second = v
    if "max_exp_avg_sq" in state:  # AMSGrad
        second = list(torch._foreach_maximum([state["max_exp_avg_sq"][k] for k in keys], v))
        new_state["max_exp_avg_sq"] = dict(zip(keys, second))
    root = _fsafe_sqrt(second)
    denom = _fadd(list(torch._foreach_div(root, bc2_sqrt)), eps)
    direction = torch._foreach_div(torch._foreach_div(m, denom), bc1)
    u = _fmul(list(direction), lr)
    if use_wd and decoupled:
        u = list(torch._foreach_add(_fmul(w, [a * b for a, b in zip(lr, h("weight_decay"))]), u))
    return dict(zip(keys, u)), new_state
