"""Algorithm 1 of Lorraine et al. (2020) on one model whose training loss takes a per-step context.

Lorraine, Vicol & Duvenaud (2020), Algorithm 1 ("gradient-based HO for
L_V*(lambda)"): alternate

    T times:  w <- w - u(lambda, w; c_t)                      (weight steps, context c_t)
    once:     lambda <- HyperOpt(lambda, dL_V/dlambda)          (one hypergradient step)

where ``u(lambda, w; c) = rule(w, clip(dL_T(w, lambda; c)/dw))`` is one step of a
differentiable optimiser (:mod:`bilevel.updates`) on the training loss with context ``c``
(the mini-batch *and* any noise: dropout masks, augmentation noise). The hypergradient is

* ``mode="ift"``: the implicit-function-theorem estimate (Lorraine et al. eq. 2-3 on the
  update map, Clarke et al. 2022 eq. 4-7)

      dL_V/dlambda - dL_V/dw (du/dw)^{-1} du/dlambda,

  with ``(du/dw)^{-1}`` from a :mod:`bilevel.solvers` solver: ``Neumann(i, alpha=1)`` is
  Lorraine et al.'s Alg. 2/3 with step ``alpha = lr`` for plain SGD, ``Identity()`` is
  Luketina et al.'s (2016) ``J^{-1} ~ I`` (:func:`bilevel.hypergradient`);
* ``mode="unroll"``: exact differentiation through the last ``lookback`` weight steps,
  each replayed *with its own stored context* (:func:`bilevel.unroll.replay_hypergradient`);
* ``mode="none"``: hyperparameters fixed (the "no HO" baseline).

Why a context. With dropout or augmentation noise the training loss is random; the IFT
needs one deterministic function ``L_T(w, lambda)``. Each weight step draws its context
once and the hypergradient taken after it linearises the training loss *with that same
context*, so the estimate is that of the loss the weights were actually trained on.
Hyperparameters may enter the loss (dropout rates, augmenter weights: "loss-form") or the
rule (a per-weight ``weight_decay`` or ``lr``: "update-form"; pass ``rule_hparams`` to say
which raw keys the rule receives); both enter the one map ``u``. Optimiser state is
detached between steps and constant in the IFT hypergradient (Clarke et al. A.4).

:class:`bilevel.tuner.OnlineTuner` is the population version for ``(x, y)`` batches
with loss-independent hyperparameters; this class is for one model with arbitrary contexts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import _tree as T
from .errors import NonFiniteError
from .hparams import HyperParameterSpace
from .hypergradient import hypergradient
from .solvers import Neumann, Solver
from .unroll import replay_hypergradient
from .updates import UpdateRule, detach_state

Tree = dict[str, Tensor]
#: ``step(params, raw_hparams, ctx, optimiser_state, create_graph) -> (u, new_state, training loss)``
StepMap = Callable[[Tree, Tree, Any, Any, bool], tuple[Tree, Any, Tensor]]
ContextLoss = Callable[[Tree, Tree, Any], Tensor]
MODES = ("ift", "unroll", "none")


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float | None) -> list[Tensor]:
    """Scale ``grads`` so that their joint 2-norm is at most ``max_norm``, differentiably.

    ``g * min(1, max_norm / (||g|| + 1e-6))``, exactly ``torch.nn.utils.clip_grad_norm_``
    (AWD-LSTM's gradient clipping, Merity et al. 2018). ``None`` returns the gradients.
    """
    if max_norm is None:
        return list(grads)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return [g * factor for g in grads]


def loss_step_map(loss: ContextLoss, rule: UpdateRule, clip: float | None = None,
                  space: HyperParameterSpace | None = None, rule_hparams: Sequence[str] = ()) -> StepMap:
    """The weight update ``u(lambda, w; c) = rule(w, clip(dL_T(w, lambda; c)/dw), lambda_rule)`` as a step map.

    ``loss(params, raw, ctx)`` receives the *raw* hyperparameters (it maps them to natural
    values itself). The hyperparameters named in ``rule_hparams`` (e.g. ``"weight_decay"``)
    are passed to the rule in natural units through ``space`` (needed then), so an
    update-form hyperparameter and a loss-form one are differentiated the same way.
    """
    if rule_hparams and space is None:
        raise ValueError("rule_hparams needs the hyperparameter space (space=)")
    unknown = [n for n in rule_hparams if n not in rule.hyperparameters]
    if unknown:
        raise ValueError(f"{type(rule).__name__} has no hyperparameters {unknown}; it has {list(rule.hyperparameters)}")

    def step(p: Tree, raw: Tree, ctx: Any, state: Any, create_graph: bool) -> tuple[Tree, Any, Tensor]:
        value = loss(p, raw, ctx)
        grads = torch.autograd.grad(value, list(p.values()), create_graph=create_graph)
        hp: dict[str, Any] = {}
        if rule_hparams:
            nat = space.natural(raw)  # type: ignore[union-attr]
            hp = {n: nat[n] for n in rule_hparams}
        u, new_state = rule(p, dict(zip(p, clip_grad_norm(grads, clip))), hp, state)
        return u, new_state, value
    return step


class Algorithm1:
    """Lorraine et al. (2020) Algorithm 1 on one model (see the module docstring for the maths).

    Args:
        step: the step map (e.g. :func:`loss_step_map`).
        params: initial weights.
        raw: initial raw (optimisation-space) hyperparameters, a flat dict of tensors.
        rule: the update rule, for its optimiser state.
        mode: ``"ift"``, ``"unroll"`` or ``"none"``.
        solver: the IFT solver (default ``Neumann(lookback, alpha=1)``).
        lookback: Neumann terms of the default solver / unrolled steps.
        hyper_lr, hyper_optimizer: the outer optimiser on the tuned raw hyperparameters.
        tuned: hyperparameter names (the part of a raw key before ``"/"``) to tune (``None``: all).
    """

    def __init__(self, step: StepMap, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], rule: UpdateRule, *,
                 mode: Literal["ift", "unroll", "none"] = "ift", solver: Solver | None = None, lookback: int = 3,
                 hyper_lr: float = 1e-3, hyper_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
                 tuned: Sequence[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
        if lookback < 1:
            raise ValueError(f"lookback must be >= 1, got {lookback}")
        if solver is not None and mode != "ift":
            raise ValueError(f"a solver is only used with mode='ift', not {mode!r}")
        self.step_map, self.mode, self.lookback = step, mode, lookback
        self.solver = solver if solver is not None else Neumann(lookback, alpha=1.0, divergence="ignore")
        self.params = T.detach(params)
        self.raw = {k: v.detach().clone() for k, v in raw.items()}
        self.tuned = [k for k in self.raw if tuned is None or k.split("/", 1)[0] in tuned]
        if tuned is not None and not self.tuned:
            raise ValueError(f"none of the tuned names {list(tuned)} matches a raw key {list(self.raw)}")
        self.opt = (hyper_optimizer([self.raw[k].requires_grad_() for k in self.tuned], lr=hyper_lr)
                    if mode != "none" else None)
        self.rule = rule
        self.state = rule.init_state(self.params)
        self.window: list[tuple[Tree, Any, Any]] = []  # (w, state, ctx) of the last `lookback` steps
        self.last_ctx: Any = None
        self.t = 0

    def weight_step(self, ctx: Any) -> float:
        """One step ``w <- w - u(lambda, w; ctx)``; returns the training loss (raises on a non-finite one)."""
        w = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        with torch.enable_grad():
            u, state, loss = self.step_map(w, T.detach(self.raw), ctx, self.state, False)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"training loss is {value} at step {self.t}")
        if self.mode == "unroll":
            self.window = (self.window + [(self.params, self.state, ctx)])[-self.lookback:]
        self.params = {k: (w[k] - u[k]).detach() for k in w}
        self.state = detach_state(state)
        self.last_ctx = ctx
        self.t += 1
        return value

    def hypergradient(self, outer: Callable[[Tree, Tree], Tensor]) -> Tree:
        """dL_V/dlambda for the tuned raw hyperparameters at the current weights (after >= 1 weight step)."""
        if self.t == 0:
            raise ValueError("take at least one weight step before a hypergradient")
        tuned = {k: self.raw[k].detach() for k in self.tuned}
        fixed = {k: v.detach() for k, v in self.raw.items() if k not in tuned}
        if self.mode == "unroll":
            return replay_hypergradient(outer, self.step_map, self.window, tuned, fixed)
        ctx, state = self.last_ctx, self.state
        return hypergradient(outer, self.params, tuned, solver=self.solver,
                             update=lambda p, h: self.step_map(p, {**fixed, **h}, ctx, state, True)[0])

    def hyper_step(self, outer: Callable[[Tree, Tree], Tensor]) -> Tree | None:
        """One outer-optimiser step along :meth:`hypergradient`; returns it (``None`` for mode ``"none"``)."""
        if self.opt is None:
            return None
        hg = self.hypergradient(outer)
        for k, g in hg.items():
            self.raw[k].grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return hg
