"""Differentiable weight-update maps ``u(lambda, w)``.

Clarke et al. (2022), "Scalable One-Pass Optimisation of High-Dimensional
Weight-Update Hyperparameters by Implicit Differentiation" (ICLR 2022), write
every optimiser step as

.. math::  w_i = w_{i-1} - u(\\lambda, w_{i-1})                       \\quad (4)

for a differentiable *update function* ``u`` of the hyperparameters ``lambda``
(learning rate, momentum, weight decay, Adam's betas, ...) and the weights.
The approximate best-response Jacobian (their eq. 6, converging to eq. 7,
``dw*/dlambda ~ -(du/dw)^{-1} du/dlambda``) then only needs derivatives of
``u``. This module provides ``u`` for the optimisers of ``torch.optim``:

* :class:`SGD` (momentum, dampening, Nesterov, L2 weight decay),
* :class:`Adam` (L2 weight decay added to the gradient),
* :class:`AdamW` (decoupled weight decay),
* :class:`RMSprop` (momentum, centred variant, L2 weight decay),

each reproducing ``torch.optim`` step by step (to round-off), while keeping the
update a pure function of ``(params, grads, hparams, state)``:

* the result carries autograd graph to the hyperparameter tensors **and** to
  ``params`` and ``grads`` (nothing is detached inside), so ``du/dw`` (through
  the gradient) and ``du/dlambda`` are both available;
* only out-of-place tensor ops are used, with no ``.item()`` and no Python
  branch on tensor values, so the rules work under ``torch.func.grad``,
  ``vjp``, ``jvp`` and ``vmap``;
* optimiser state (momentum buffers, Adam moments, the step counter) is
  returned *with* graph, so several steps can be differentiated through
  (unrolled differentiation). Clarke et al. (Appendix A.4) instead treat the
  state as a constant: call :func:`detach_state` between steps for that.

Hyperparameter granularity
--------------------------
The dataclass fields of a rule are its default hyperparameters. ``hparams``
given to ``__call__`` override them by name, and each value may be

* a tensor broadcastable to every parameter (typically a 0-d tensor: one value
  shared by all weights), or
* a mapping ``{param_name: tensor}`` holding, per parameter tensor, either one
  scalar (per-tensor hyperparameters, like ``torch.optim`` parameter groups)
  or a tensor of the parameter's shape (one value per weight: Clarke et al.'s
  "HDLR" high-dimensional learning rates, Section 4).

``torch.optim`` parameter groups and state
------------------------------------------
:func:`twin` turns a ``torch.optim`` optimiser with parameter groups (e.g. a backbone and a head
learning rate, no decay on biases) into its twin: the hyperparameters that differ across groups become
per-parameter mappings, which :class:`WithDefaults` applies wherever the caller does not tune them.
:func:`state_from_torch` and :func:`state_to_torch` carry the optimiser's momentum buffers, moments and
step counts into the twin's state and back, so that a plain ``torch.optim`` loop continues where the
twin stopped (and vice versa), step for step.

Structural options (``nesterov``, ``centered``) are Python booleans, not
hyperparameters. Whether a momentum buffer is used is also decided
structurally: it is used when the field ``momentum`` is non-zero *or* when
``"momentum"`` is passed in ``hparams`` (the tuned value may then be anything,
including 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import check_like

__all__ = [
    "HValue",
    "State",
    "UpdateRule",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "resolve",
    "apply",
    "detach_state",
    "TorchOptimizer",
    "from_torch",
    "WithDefaults",
    "TorchTwin",
    "twin",
    "state_from_torch",
    "state_to_torch",
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
        ``{name: w - u}``.
    """
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


# --------------------------------------------------------------------------- SGD


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


# --------------------------------------------------------------------------- Adam / AdamW


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
    u: dict[str, Tensor] = {}
    ms: dict[str, Tensor] = {}
    vs: dict[str, Tensor] = {}
    vmaxs: dict[str, Tensor] = {}
    if rule.amsgrad and "max_exp_avg_sq" not in state:
        state = {**state, "max_exp_avg_sq": _zeros(params)}
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


# --------------------------------------------------------------------------- RMSprop


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


# --------------------------------------------------------------------------- torch.optim


class TorchOptimizer:
    """A ``torch.optim`` optimiser as a (non-differentiable) weight update ``u = w - step(w)``.

    Lets any ``torch.optim`` optimiser step the weights of an online loop whose hypergradient does
    not differentiate the update: the IFT on the training loss's stationarity (Lorraine et al.
    2020, Alg. 2-3: ``implicit="loss"``), which holds whatever optimiser found the weights.
    ``named`` maps the loop's parameter names to the tensors the optimiser was built on; each call
    copies the weights in, sets ``.grad``, calls ``optimizer.step()`` and returns the change. The
    optimiser's own state (momenta, moments) is the state of this rule (:meth:`state_dict`). The
    weights it stepped to are kept as ``stepped``, so a loop takes them exactly (not ``w - u``).

    Args:
        optimizer: the ``torch.optim`` optimiser, built on the tensors of ``named``.
        named: the loop's parameter names and the tensors the optimiser holds.

    Raises:
        ValueError: when the optimiser does not hold a tensor of ``named``.
    """

    hyperparameters: ClassVar[tuple[str, ...]] = ()
    differentiable: ClassVar[bool] = False

    def __init__(self, optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor]) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [k for k, p in named.items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"the {type(optimizer).__name__} optimiser does not hold the parameters {missing}; "
                "build it on model.parameters()"
            )
        self.optimizer, self.named = optimizer, dict(named)

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """No state of the loop's own: the optimiser keeps it (see :meth:`state_dict`).

        Args:
            params: the weights by name (not used).

        Returns:
            ``{}``.
        """
        return {}

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        if hparams:
            raise ValueError(f"a torch.optim optimiser takes no tuned hyperparameters, got {list(hparams)}")
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(params[k])
                p.grad = grads[k].detach().clone()
        self.optimizer.step()
        with torch.no_grad():
            self.stepped = {k: p.detach().clone() for k, p in self.named.items()}
            u = {k: params[k].detach() - self.stepped[k] for k in self.named}
        for p in self.named.values():
            p.grad = None
        return u, {}

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's own state dict (momenta, moments, step counts).

        Returns:
            ``optimizer.state_dict()``.
        """
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the optimiser's state.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.optimizer.load_state_dict(sd)


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


# --------------------------------------------------------------------------- parameter groups and state


class WithDefaults:
    """An update rule whose hyperparameters missing from ``hparams`` take fixed (e.g. per-group) values.

    ``WithDefaults(rule, values)(params, grads, hparams, state)`` calls
    ``rule(params, grads, hparams', state)`` with

    .. math::  \\text{hparams}'_h = \\text{hparams}_h \\text{ if given, else } \\text{values}_h,

    and, where both ``hparams[h]`` and ``values[h]`` are per-parameter mappings, parameters missing from
    ``hparams[h]`` take ``values[h][name]``. So a ``torch.optim`` optimiser's parameter groups keep their own
    learning rate, weight decay, ... (:attr:`TorchTwin.per_param`) for every hyperparameter that is not
    tuned, while a tuned one (a tensor or mapping, possibly requiring grad) replaces them; the update
    ``u`` and its graph to the tuned tensors, the weights and the gradients are the wrapped rule's.

    Fixed Python numbers become 0-d tensors of each parameter's dtype and device (made once and cached,
    no ``.item()`` at call time); tensors in ``values`` are passed as they are. Everything else
    (``hyperparameters``, :meth:`init_state`, fields such as ``lr`` or ``nesterov``, ``differentiable``,
    and ``state_dict`` where the wrapped rule has one) is the wrapped rule's.

    Args:
        rule: the wrapped update rule.
        values: ``{hyperparameter: value}``, each a number or tensor (every parameter) or a mapping
            ``{param_name: number or tensor}``; names must be hyperparameters of ``rule``.
    """

    def __init__(self, rule: UpdateRule, values: Mapping[str, float | Tensor | Mapping[str, float | Tensor]]) -> None:
        unknown = [h for h in values if h not in rule.hyperparameters]
        if unknown:
            raise ValueError(
                f"WithDefaults: {unknown} are not hyperparameters of {type(rule).__name__} "
                f"(it has {list(rule.hyperparameters)})"
            )
        self.rule = rule
        self.values: dict[str, float | Tensor | dict[str, float | Tensor]] = {
            h: dict(v) if isinstance(v, Mapping) else v for h, v in values.items()
        }
        self._cache: dict[tuple[str, str, torch.dtype, torch.device], Tensor] = {}

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The wrapped rule's hyperparameter names."""
        return self.rule.hyperparameters

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """The wrapped rule's fresh state for ``params``.

        Args:
            params: the weights by name.

        Returns:
            ``rule.init_state(params)``.
        """
        return self.rule.init_state(params)

    def _const(self, h: str, name: str, value: float | Tensor, like: Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        key = (h, name, dtype, like.device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = torch.tensor(float(value), dtype=dtype, device=like.device)
        return out

    def fill(self, params: Mapping[str, Tensor], hparams: Mapping[str, HValue] | None = None) -> dict[str, HValue]:
        """``hparams`` completed with the fixed values (see the class docstring).

        Args:
            params: the parameters the rule is called on (names, dtypes and devices).
            hparams: the given (tuned) hyperparameters, or ``None``.

        Returns:
            A new dict: ``hparams`` plus, for every hyperparameter in ``values`` that it lacks, the fixed
            value as a per-parameter mapping of tensors (only the parameters in ``params``); mappings in
            ``hparams`` lacking some parameters get those parameters' fixed values.
        """
        out: dict[str, HValue] = dict(hparams or {})
        for h, v in self.values.items():
            given = out.get(h)
            if given is None:
                if isinstance(v, Mapping):
                    out[h] = {k: self._const(h, k, v[k], p) for k, p in params.items() if k in v}
                elif isinstance(v, Tensor):
                    out[h] = v
                else:
                    out[h] = {k: self._const(h, "", v, p) for k, p in params.items()}
            elif isinstance(given, Mapping) and isinstance(v, Mapping):
                fixed = {k: self._const(h, k, v[k], p) for k, p in params.items() if k not in given and k in v}
                if fixed:
                    out[h] = {**fixed, **given}
        return out

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        """Return the wrapped rule's ``(u, new_state)`` with ``hparams`` completed by :meth:`fill`."""
        return self.rule(params, grads, self.fill(params, hparams), self.init_state(params) if state is None else state)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("rule", "values", "_cache"):
            raise AttributeError(name)
        return getattr(self.rule, name)

    def __repr__(self) -> str:
        return f"WithDefaults({self.rule!r}, {self.values!r})"


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
