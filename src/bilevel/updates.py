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
    """The new weights ``w - u`` (Clarke et al. 2022, eq. 4), key by key."""
    return {k: params[k] - u[k] for k in params}


def detach_state(state: State) -> State:
    """A copy of ``state`` with every tensor (also inside nested dicts) detached.

    Clarke et al. (2022, Appendix A.4) treat optimiser buffers as constants:
    "the only extra care required is to detach these buffers from the
    computational graph". Call this between steps for that behaviour; keep the
    state as returned to differentiate through several steps instead.
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

    hyperparameters: ClassVar[tuple[str, ...]]

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """Fresh optimiser state for ``params`` (step counter 0, zero buffers)."""
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
    """

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False

    hyperparameters: ClassVar[tuple[str, ...]] = ("lr", "alpha", "eps", "weight_decay", "momentum")

    def init_state(self, params: Mapping[str, Tensor]) -> State:
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
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)


def from_torch(optimizer: torch.optim.Optimizer) -> SGD | Adam | AdamW | RMSprop:
    """The differentiable twin of a ``torch.optim`` SGD / Adam / AdamW / RMSprop, with its hyperparameters.

    Raises ``ValueError`` for other optimisers, for options the twin lacks (``maximize``) and for
    parameter groups with different hyperparameters.
    """
    kinds: dict[type, tuple[type, tuple[str, ...]]] = {
        torch.optim.SGD: (SGD, ("lr", "momentum", "dampening", "weight_decay", "nesterov")),
        torch.optim.AdamW: (AdamW, ("lr", "betas", "eps", "weight_decay", "amsgrad")),
        torch.optim.Adam: (Adam, ("lr", "betas", "eps", "weight_decay", "amsgrad")),
        torch.optim.RMSprop: (RMSprop, ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")),
    }
    if type(optimizer) not in kinds:
        raise ValueError(
            f"cannot tune the hyperparameters of torch.optim.{type(optimizer).__name__}: its "
            "differentiable twin exists for SGD, Adam, AdamW and RMSprop (or pass bilevel.optim.SGD(...))"
        )
    cls, fields = kinds[type(optimizer)]
    groups = optimizer.param_groups
    values = {f: groups[0][f] for f in fields}
    differ = [f for f in fields if any(g[f] != values[f] for g in groups[1:])]
    if differ:
        raise ValueError(f"the optimiser's parameter groups differ in {differ}; tuning needs one value to start from")
    if groups[0].get("maximize"):
        raise ValueError("maximize=True is not supported; minimise the negated objective")
    values = {k: (float(v) if isinstance(v, Tensor) else v) for k, v in values.items()}
    return cls(**values)
