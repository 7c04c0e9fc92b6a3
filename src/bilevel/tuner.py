"""The state of Algorithm 1 on one model or a population: weights, hyperparameters and their steps.

Lorraine, Vicol & Duvenaud (2020), Algorithm 1, and Clarke, Oldewage & Hernández-Lobato (2022), Alg. 1::

    repeat:  T times  w <- w - u(lambda, w; c_t)           (weight steps, context c_t: batch, noise)
             lambda <- HyperOpt(lambda, dL_V/dlambda)       (one hypergradient step)

:class:`OnlineTuner` holds the state and takes one weight step (:meth:`~OnlineTuner.step`) or one hyperparameter step
(:meth:`~OnlineTuner.hyper_step`) when asked; *when* is decided by the one loop (:func:`bilevel.loop.run`, with a
schedule such as :class:`bilevel.loop.Every`), *how* by its strategy (:mod:`bilevel.strategies`: IFT with any solver
on the update map or the training loss, unrolled, Baydin, none), and what happens on a non-finite value by
:mod:`bilevel.divergence`. Every study and the :class:`bilevel.Tuner` front door run it.

One model (``stacked=False``) or a population of P independent initialisations (``stacked=True``: a leading
axis of size P, ``vmap``-ed losses of shape (P,), :mod:`bilevel.population`; Jacobians are block diagonal).

Hyperparameters live in a :class:`~bilevel.hparams.HyperParameterSpace` (raw values optimised, natural values used).
Each one is declared *update-form* (``update_form``: passed to the differentiable optimiser ``rule``, e.g. a learning
rate, momentum or decoupled decay) or else *loss-form* (seen by the losses and the ``penalty``: a per-weight L2 decay,
dropout rates, augmentation weights). Both enter the one residual ``u(lambda, w; c) = rule(w, dL_T/dw, lambda)``.
Optimiser state is detached between steps and constant in the IFT hypergradient (Clarke et al. A.4).
:meth:`OnlineTuner.state_dict` holds every piece of loop state, the strategy's and the callbacks' included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from . import loop as _loop
from . import population as pop
from . import strategies as _strategies
from . import tree as _T
from .callbacks import default_callbacks
from .config import TunerConfig, check_arguments
from .divergence import DivergencePolicy, scale_lr
from .errors import NonFiniteError
from .history import History, Recording
from .hparams import HyperParameterSpace
from .solvers import Solver
from .strategies import SharedGradient, Strategy
from .updates import UpdateRule, apply, detach_state
from .updates.clip import clip_grad_norm

__all__ = ["TunerConfig", "History", "OnlineTuner", "SharedGradient", "clip_grad_norm", "scale_lr", "Loss", "Penalty"]

Tree = _T.Tree
#: ``loss(params, natural_hparams, batch)``: shape (P,) for a stacked population, () for one model
Loss = Callable[[Tree, dict[str, Any], Any], Tensor]
#: ``penalty(params, natural_hparams)``: a loss-form term added to the training loss
Penalty = Callable[[Tree, dict[str, Any]], Tensor]


class OnlineTuner(DivergencePolicy, Recording):
    """Algorithm 1 on one model or a stacked population (see the module docstring for the maths).

    Args:
        params: weights, each of shape (P, ...) when ``stacked`` (the default), else one model's.
        raw: raw hyperparameters for ``space`` (shape (P, ...) when stacked).
        space: the hyperparameter parametrisation (``None``: the raw tensors are the hyperparameters, any keys).
        rule: the weight update (e.g. ``updates.SGD()``; a ``updates.TorchOptimizer`` for ``torch.optim``).
        train_loss, val_loss: ``loss(params, natural_hparams, batch)``; per member (shape (P,)) when stacked
            (build them with :func:`bilevel.population.vmap_loss`), a scalar otherwise.
        update_form: names of the hyperparameters passed to ``rule`` (all others are loss-form).
        penalty: optional loss-form term ``(params, natural_hparams) -> (P,) or ()`` added to the training loss.
        config: :class:`TunerConfig`.
        test_loss: for :meth:`record` (default ``val_loss``).
        callbacks: objects with any of ``on_weight_step(tuner)``, ``on_interval(tuner)``, ``on_record(tuner)``,
            ``state_dict()``/``load_state_dict(sd)`` (:mod:`bilevel.callbacks`).
        stacked: whether tensors carry a leading population axis.
        strategy: how a hyperparameter step is computed (:mod:`bilevel.strategies`; ``None``: the one
            ``config`` names through ``mode``, ``solver``, ``implicit`` and ``share_gradient``).
        schedule: when the hyperparameter steps happen (:mod:`bilevel.loop`; ``None``: the strategy's default
            for ``config``, ``Every(config.interval)``, cold when ``not config.warm_start``).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        raw: Mapping[str, Tensor],
        space: HyperParameterSpace | None,
        rule: UpdateRule,
        train_loss: Loss,
        val_loss: Loss,
        *,
        update_form: Sequence[str] = (),
        penalty: Penalty | None = None,
        config: TunerConfig | None = None,
        test_loss: Loss | None = None,
        callbacks: Iterable[Any] = (),
        stacked: bool = True,
        strategy: Strategy | None = None,
        schedule: _loop.Schedule | None = None,
    ) -> None:
        cfg = config or TunerConfig()
        cfg.validate()
        if cfg.on_divergence is None:  # the one default: one model raises, a population records
            cfg = replace(cfg, on_divergence="raise" if not stacked else "record")
        self.cfg = cfg
        check_arguments(cfg, space.names if space is not None else list(raw), update_form, rule, penalty)
        if space is not None:
            space.check(raw)
        self.update_form = tuple(update_form)
        self.strategy: Strategy = strategy if strategy is not None else _strategies.from_config(cfg)
        self.schedule: _loop.Schedule = schedule if schedule is not None else self.strategy.default_schedule(cfg)
        if not getattr(rule, "differentiable", True) and (
            self.strategy.differentiable_rule or self.schedule.cold_steps is not None
        ):
            raise ValueError(
                f"{type(rule).__name__} steps the weights without a graph: it supports mode='ift' with "
                "implicit='loss' (IFT on the training loss) or mode='none', warm start only"
            )
        self.space, self.rule, self.penalty = space, rule, penalty
        self.train_loss, self.val_loss = train_loss, val_loss
        self.test_loss = test_loss or val_loss
        self.callbacks = list(callbacks) + default_callbacks()
        self.stacked = stacked
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.initial_params = {k: v.clone() for k, v in self.params.items()}
        self.raw = {k: v.detach().clone() for k, v in raw.items()}
        self.P = pop.size(self.params) if stacked else 1
        self.tuned_keys = [k for k in self.raw if k in cfg.tuned or k.split("/", 1)[0] in cfg.tuned]
        self.hyper_opt = (
            cfg.hyper_optimizer([self.raw[k].requires_grad_() for k in self.tuned_keys], lr=cfg.hyper_lr)
            if self.tuned_keys and self.strategy.tunes
            else None
        )
        self.strategy.check(self)
        self.state = rule.init_state(self.params)
        self.device = next(iter(self.params.values())).device
        self.alive = torch.ones(self.P, dtype=torch.bool, device=self.device)
        self.t = 0
        self.history = History(diverged_at=[None] * self.P)
        # the step each member diverged at (-1: alive), kept on the device so that marking a divergence
        # needs no host-device synchronisation (:meth:`_mark`); copied into ``history`` when it is read
        self._diverged_t = torch.full((self.P,), -1, dtype=torch.long, device=self.device)
        self.sync_free = self.device.type != "cpu"  # on a CPU a synchronisation costs nothing
        self.hyper_steps = 0  # hyperparameter steps taken by the loop
        self.last_losses: Tensor | None = None  # training losses of the last weight step (for callbacks)
        self.last_hypergradient: Tree | None = None  # the last hyperparameter step's (for callbacks)
        self._init_divergence()

    def natural(self, raw: Mapping[str, Tensor]) -> dict[str, Any]:
        """Natural hyperparameter values (``space.natural``; the raw tensors themselves without a space).

        Args:
            raw: the flat raw dict.

        Returns:
            ``{hp_name: natural value}`` (see :meth:`bilevel.hparams.HyperParameterSpace.natural`).
        """
        return self.space.natural_reused(raw) if self.space is not None else dict(raw)

    def _rule_hparams(self, nat: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Natural update-form values, each viewed to broadcast against the (P, ...) parameters."""
        out: dict[str, Any] = {}
        for name in self.update_form:
            v = nat[name]
            if not self.stacked:
                out[name] = v
            elif isinstance(v, Tensor):
                out[name] = {k: pop.per_member(v, p) for k, p in params.items()}
            else:
                out[name] = {k: pop.per_member(v[k], p) for k, p in params.items() if k in v}
        return out

    def training_objective(self, params: Tree, raw: Mapping[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        """``(sum of training losses + penalty, per-member training losses)`` at raw hyperparameters ``raw``.

        Args:
            params: the weights (shape ``(P, ...)`` when stacked).
            raw: the flat raw hyperparameters.
            batch: the training context.

        Returns:
            ``(total, losses)``: a 0-d tensor, and the training losses, shape ``(P,)`` (stacked) or ``()``.
        """
        nat = self.natural(raw)
        losses = self.train_loss(params, nat, batch)
        total = losses.sum()
        if self.penalty is not None:
            total = total + self.penalty(params, nat).sum()
        return total, losses

    def training_gradient(
        self, params: Tree, raw: Mapping[str, Tensor], batch: Any, create_graph: bool
    ) -> tuple[list[Tensor], Tensor]:
        """(dL_T/dw of the summed training objective, per-member training losses) at ``params``.

        Args:
            params: the weights (leaves that require grad).
            raw: the flat raw hyperparameters.
            batch: the training context.
            create_graph: keep the graph (for a hypergradient through the gradient).

        Returns:
            ``(grads, losses)``: one gradient per weight tensor, and the per-member training losses.
        """
        total, losses = self.training_objective(params, raw, batch)
        return list(torch.autograd.grad(total, list(params.values()), create_graph=create_graph)), losses

    def apply_rule(
        self, params: Tree, grads: Sequence[Tensor], raw: Mapping[str, Tensor], state: Any
    ) -> tuple[Tree, Any]:
        """(u, new_state): the update rule on (clipped) training gradients ``grads``.

        Args:
            params: the weights.
            grads: the training gradients, in the order of ``params``.
            raw: the flat raw hyperparameters.
            state: the optimiser state.

        Returns:
            ``(u, new_state)`` with ``w_new = w - u``.
        """
        grads = clip_grad_norm(grads, self.cfg.grad_clip, self.P if self.stacked else None)
        nat = self.natural(raw) if self.update_form else {}
        return self.rule(params, dict(zip(params, grads)), self._rule_hparams(nat, params), state)

    def step_map(
        self, params: Tree, raw: Mapping[str, Tensor], batch: Any, state: Any, create_graph: bool
    ) -> tuple[Tree, Any, Tensor]:
        """(u, new_state, per-member training losses) at ``params`` with raw hyperparameters ``raw``.

        Args:
            params: the weights.
            raw: the flat raw hyperparameters.
            batch: the training context.
            state: the optimiser state.
            create_graph: keep the graph.

        Returns:
            ``(u, new_state, losses)``.
        """
        grads, losses = self.training_gradient(params, raw, batch, create_graph)
        u, new_state = self.apply_rule(params, grads, raw, state)
        return u, new_state, losses

    def weight_step(self, batch: Any) -> Tensor:
        """One step ``w <- w - u(lambda, w; batch)`` with the current hyperparameters; returns the training losses.

        Right after a hyperparameter step the gradient may be that step's (:class:`SharedGradient`, opt-in).
        A member whose loss or step is non-finite is handled by ``on_divergence`` (see :class:`TunerConfig`):
        ``"raise"`` keeps the weights and optimiser state from before the step; ``"rollback"`` puts the member
        back to its last good state (the last weights at which its training loss was finite and at most
        ``rollback_spike`` times the lowest it has seen, with their optimiser state).

        Args:
            batch: the training context c_t (a batch, or a batch with noise).

        Returns:
            The training losses at the weights before the step (detached), shape ``(P,)`` or ``()``.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when a loss or the step is non-finite.
        """
        w = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        raw = {k: v.detach() for k, v in self.raw.items()}
        guarded = self.cfg.on_divergence != "record"
        self.rolled_back = None
        refused = None
        with torch.enable_grad():
            reused = self.strategy.reuse(self, batch)
            grads, losses = reused if reused is not None else self.training_gradient(w, raw, batch, False)
            losses = losses.detach()
            if guarded and not getattr(self.rule, "differentiable", True):
                # a torch.optim optimiser updates its own state in place: never step it on a non-finite gradient
                refused = self._nonfinite(losses, dict(zip(w, grads)))
            if refused is not None and bool(refused.any()):
                new, state = dict(self.params), self.state
            else:
                refused = None
                with torch.no_grad():  # the step is not differentiated: a rule may take its fused path
                    u, state = self.apply_rule(w, grads, raw, self.state)
                    stepped = getattr(self.rule, "stepped", None)  # a torch.optim step's own result, bit for bit
                    new = dict(stepped) if stepped is not None else apply(w, u)
        if guarded:
            new, state = self._guard(batch, losses, new, state, refused)
        self.strategy.remember(self, batch)
        self.params = new
        self.state = detach_state(state)
        if not guarded:
            self._mark_diverged(losses, "training loss or weights")
        return losses

    def split(self) -> tuple[Tree, Tree]:
        """``(tuned, fixed)``: the tuned and the other raw hyperparameters, detached.

        Returns:
            Two dicts of raw key -> tensor.
        """
        tuned = {k: self.raw[k].detach() for k in self.tuned_keys}
        return tuned, {k: v.detach() for k, v in self.raw.items() if k not in tuned}

    @property
    def solver(self) -> Solver | None:
        """The IFT strategy's linear solver (``None`` for a strategy without one)."""
        return getattr(self.strategy, "solver", None)

    @solver.setter
    def solver(self, value: Solver) -> None:
        self.strategy.solver = value  # type: ignore[attr-defined]

    @property
    def tunes(self) -> bool:
        """Whether the loop moves any hyperparameter (a strategy that tunes, and something tuned)."""
        return self.hyper_opt is not None

    def hypergradient(self, train_batch: Any, val_batch: Any) -> Tree:
        """dL_V/dlambda of the tuned raw hyperparameters at the current state, by the tuner's strategy.

        Args:
            train_batch: the training context of the residual (the last weight step's).
            val_batch: the validation context of L_V.

        Returns:
            ``{raw key: hypergradient}`` for every tuned raw key, shapes of the raw values.

        Raises:
            ValueError: for a strategy without a hypergradient, or one that needs a weight step first (unrolled,
                Baydin) before any.
            NonFiniteError: with ``on_divergence="raise"``, when a quantity is non-finite.
        """
        return self.strategy.hypergradient(self, train_batch, val_batch)

    def hyper_step(self, train_batch: Any, val_batch: Any) -> Tree | None:
        """One hyperparameter step along :meth:`hypergradient` (``None`` when nothing is tuned).

        With ``on_divergence="raise"`` a non-finite quantity raises :class:`NonFiniteError` naming it (the
        validation data, the validation loss, a product, the hypergradient) and the weight step it followed,
        before anything is changed.

        Args:
            train_batch: the training context of the residual (the last weight step's).
            val_batch: the validation context of L_V.

        Returns:
            The hypergradient applied, or ``None`` when nothing is tuned.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when a quantity is non-finite.
        """
        if self.hyper_opt is None:
            return None
        try:
            hg = self.hypergradient(train_batch, val_batch)
        except NonFiniteError as e:
            raise self._hyper_failure(e, train_batch, val_batch) from e
        self.apply_hypergradient(hg)
        return hg

    def apply_hypergradient(self, hg: Mapping[str, Tensor]) -> None:
        """One step of the hyperparameter optimiser along ``hg``.

        Members with a non-finite hypergradient are marked diverged, or (``on_divergence="rollback"``) skip
        this step and have their later hyperparameter steps scaled by ``rollback_factor`` (the raw change
        ``lambda_new - lambda_old`` is multiplied by the member's scale: for Adam or SGD, the same as a
        smaller hyper learning rate).

        Args:
            hg: ``{raw key: hypergradient}`` of the tuned raw hyperparameters.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when the hypergradient is non-finite.
        """
        skip = self._skip_hypergradient(hg)
        go = self.alive & ~skip
        for k, g in hg.items():
            self.raw[k].grad = torch.where(self._per_member(go, g), g, torch.zeros_like(g))
        with self._scaled_hyper_step(list(hg)):
            self.hyper_opt.step()  # type: ignore[union-attr]
            self.hyper_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]

    def callback(self, event: str, *args: Any) -> None:
        """Call ``event(self, *args)`` on every callback that defines it (``on_weight_step``, ``on_interval``,
        ``on_hyper_step``, ``on_record``; the front door adds ``on_epoch`` with the epoch's losses).

        Args:
            event: the method name.
            *args: passed on after the tuner.
        """
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    def reset_good_state(self) -> None:
        """Make the current weights and optimiser state the rollback target (after setting them from outside)."""
        self._good = (self.params, self.state)

    def step(self, batch: Any) -> Tensor:
        """One counted weight step (``t += 1``, callbacks' ``on_weight_step``); returns the training losses.

        The loop (:func:`bilevel.loop.run`) calls it; so can a trainer that owns its own loop (the integrations).

        Args:
            batch: the training context c_t.

        Returns:
            The training losses (see :meth:`weight_step`).
        """
        losses = self.weight_step(batch)
        self.t += 1
        self.last_losses = losses
        self.callback("on_weight_step")
        return losses

    def run(
        self,
        steps: int,
        train_batches: Callable[[], Any],
        val_batches: Callable[[], Any],
        *,
        record_batches: tuple[Any, Any, Any | None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> History:
        """Take ``steps`` weight steps from the current step, hyperparameter steps as :attr:`schedule` says.

        :func:`bilevel.loop.run` with this tuner (see there); ``train_batches()`` / ``val_batches()`` return the
        next context (a batch, or a batch with noise).

        Args:
            steps: the number of weight steps (>= 0).
            train_batches: returns the next training context.
            val_batches: returns the next validation context.
            record_batches: ``(train, val, test)`` batches passed to :meth:`record` every ``record_every`` steps,
                or ``None`` for no records.
            progress: called with 1 after every weight step (e.g. a progress bar's ``update``), or ``None``.

        Returns:
            The :attr:`history`.

        Raises:
            ValueError: when ``steps < 0``.
        """
        return _loop.run(self, steps, train_batches, val_batches, record_batches=record_batches, progress=progress)

    def state_dict(self) -> dict[str, Any]:
        """Every piece of loop state: weights, hyperparameters, optimiser states, unrolling window, Baydin's
        previous step, divergence, history, solver and callback states."""
        return {
            "params": self.params,
            "initial_params": self.initial_params,
            "raw": {k: v.detach() for k, v in self.raw.items()},
            "state": self.state,
            "alive": self.alive,
            "t": self.t,
            "history": self.history.as_dict(),
            "rollbacks": list(self._rollbacks),
            "hyper_scale": self._hyper_scale.clone(),
            "best_loss": self._best_loss.clone(),
            "good": (self._good[0], self._good[1]) if self.cfg.on_divergence == "rollback" else None,
            "hyper_steps": self.hyper_steps,
            "schedule": self.schedule.state_dict() if hasattr(self.schedule, "state_dict") else None,
            "strategy": self.strategy.state_dict(),
            "hyper_opt": self.hyper_opt.state_dict() if self.hyper_opt else None,
            "rule": self.rule.state_dict() if hasattr(self.rule, "state_dict") else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore the loop from :meth:`state_dict` (a loop built with the same arguments).

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.params, self.initial_params, self.state = dict(sd["params"]), dict(sd["initial_params"]), sd["state"]
        with torch.no_grad():
            for k, v in sd["raw"].items():
                self.raw[k].copy_(v)
        self.alive, self.t, self.history = sd["alive"], sd["t"], History.from_dict(sd["history"])
        self._rollbacks = list(sd.get("rollbacks", [0] * self.P))
        self._hyper_scale = sd.get("hyper_scale", torch.ones(self.P, dtype=torch.float64)).clone()
        self._best_loss = sd.get("best_loss", torch.full((self.P,), math.inf, dtype=torch.float64)).clone()
        good = sd.get("good")
        self._good = (dict(good[0]), good[1]) if good is not None else (self.params, self.state)
        at = [-1 if d is None else d for d in self._history.diverged_at]
        self._diverged_t = torch.tensor(at, dtype=torch.long, device=self.device)
        self.hyper_steps = int(sd.get("hyper_steps", 0))
        if sd.get("schedule") is not None:
            self.schedule.load_state_dict(sd["schedule"])  # type: ignore[attr-defined]
        # a checkpoint from before the strategies kept the window, Baydin's previous step and the solver itself
        old = {"window": sd.get("window", []), "prev": sd.get("prev"), "solver": sd.get("solver")}
        self.strategy.load_state_dict(dict(sd["strategy"]) if "strategy" in sd else old)
        if self.hyper_opt is not None:
            self.hyper_opt.load_state_dict(sd["hyper_opt"])
        if sd.get("rule") is not None:
            self.rule.load_state_dict(sd["rule"])
        for cb, s in zip(self.callbacks, sd.get("callbacks", [])):
            if s is not None:
                cb.load_state_dict(s)
