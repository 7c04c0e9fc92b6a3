"""One-pass online hyperparameter tuning: Algorithm 1 of Lorraine et al. (2020) and Clarke et al. (2022).

    repeat:  T times  w <- w - u(lambda, w)          (weight steps with the current lambda)
             lambda <- HyperOpt(lambda, dL_V/dlambda) (one hypergradient step)

on a population of P independent initialisations at once (see
:mod:`bilevel.population`). Hyperparameters live in a
:class:`~bilevel.hparams.HyperParameterSpace` (raw, transformed values, with
clipping); those named by the rule (learning rate, momentum, weight decay...) are
*update-form*, the others *loss-form* (passed to ``penalty``, e.g. a per-weight L2).
Both enter the one residual u(lambda, w) = rule(w, dL_T/dw, lambda, state), so one
IFT hypergradient (Clarke et al. eq. 4-7) serves both kinds. Optimiser state is
detached between steps and treated as constant in the hypergradient (Clarke A.4);
the graph is cut after every hyperparameter update.

Hypergradient modes: ``"ift"`` (Neumann with look-back i, or any solver),
``"unroll"`` (Diff-through-Opt: exact differentiation through the last i steps),
``"baydin"`` (hypergradient descent, Baydin et al. 2018: every step, d L_T(w_t) /
d lambda through the last step), ``"none"`` (hyperparameters fixed).
``warm_start=False`` gives Vicol et al.'s cold start: before each hypergradient
the weights are re-trained from their initial values for ``cold_steps`` steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import _tree as _T
from . import population as pop
from .hparams import HyperParameterSpace
from .hypergradient import hypergradient
from .solvers import Neumann, Solver
from .unroll import replay_hypergradient, unrolled_hypergradient
from .updates import UpdateRule, detach_state

Tree = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
PerMemberLoss = Callable[[Tree, Tensor, Tensor], Tensor]  # (stacked params, x, y) -> (P,)


@dataclass
class TunerConfig:
    """Meta-hyperparameters of the online loop (defaults: Clarke et al. 2022, sec. 4)."""

    tuned: Sequence[str] = ("lr", "weight_decay", "momentum")
    interval: int = 10          # T: weight steps between hyperparameter steps
    lookback: int = 5           # i: Neumann terms (IFT) or unrolled steps (Diff-through-Opt)
    mode: Literal["ift", "unroll", "baydin", "none"] = "ift"
    solver: Solver | None = None  # default Neumann(lookback, alpha=1)
    hyper_lr: float = 0.05
    hyper_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam
    warm_start: bool = True
    cold_steps: int = 100
    lr_multiplier: tuple[float, float] | None = None  # Random (x LR): lr *= U[a, b] every T steps
    record_every: int = 10
    grad_clip: float | None = None  # clip each member's training-gradient norm (Clarke et al. on PTB: 0.25)
    seed: int = 0
    # "update": IFT on the update map u(lambda, w) = 0 (Clarke et al. eq. 4-7, J = du/dw); "loss": IFT on
    # dL_T/dw = 0 with J the Hessian of training loss + penalty (Lorraine et al. 2020 Alg. 2-3), whatever
    # rule steps the weights (e.g. Adam); "loss" needs every tuned hyperparameter to be loss-form (penalty)
    implicit: Literal["update", "loss"] = "update"


@dataclass
class History:
    """Trajectories, one list per member; ``diverged_at[i]`` is the step member i went non-finite."""

    step: list[int] = field(default_factory=list)
    train_loss: list[list[float | None]] = field(default_factory=list)
    val_loss: list[list[float | None]] = field(default_factory=list)
    test_loss: list[list[float | None]] = field(default_factory=list)
    hparams: dict[str, list[list[float | None]]] = field(default_factory=dict)
    diverged_at: list[int | None] = field(default_factory=list)
    seconds: float = 0.0


class OnlineTuner:
    """Runs Algorithm 1 on a population (leading axis P on every tensor).

    Args:
        params: stacked weights, each of shape (P, ...).
        raw: stacked raw hyperparameters for ``space`` (shape (P,) for scalars).
        space: the hyperparameter parametrisation.
        rule: the differentiable weight update (e.g. ``updates.SGD()``).
        train_loss, val_loss: ``(params, x, y) -> (P,)`` per-member losses
            (build them with :func:`bilevel.population.vmap_loss`).
        penalty: optional loss-form term ``(params, natural_hparams) -> (P,)``.
        config: :class:`TunerConfig`.
    """

    def __init__(self, params: Mapping[str, Tensor], raw: Mapping[str, Tensor], space: HyperParameterSpace,
                 rule: UpdateRule, train_loss: PerMemberLoss, val_loss: PerMemberLoss, *,
                 penalty: Callable[[Tree, dict[str, Any]], Tensor] | None = None,
                 config: TunerConfig | None = None, test_loss: PerMemberLoss | None = None) -> None:
        self.cfg = config or TunerConfig()
        unknown = [n for n in self.cfg.tuned if n not in space]
        if unknown:
            raise ValueError(f"tuned hyperparameters {unknown} are not in the space {space.names}")
        space.check(raw)
        unused = [n for n in self.cfg.tuned if n not in rule.hyperparameters]
        if unused and penalty is None:
            raise ValueError(f"tuned hyperparameters {unused} are neither hyperparameters of {type(rule).__name__} "
                             f"({list(rule.hyperparameters)}) nor passed to a penalty: they would never change")
        self.space, self.rule, self.penalty = space, rule, penalty
        self.train_loss, self.val_loss = train_loss, val_loss
        self.test_loss = test_loss or val_loss
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.initial_params = {k: v.clone() for k, v in self.params.items()}
        self.raw = {k: v.detach().clone() for k, v in raw.items()}
        self.P = pop.size(self.params)
        self.tuned_keys = [k for k in self.raw if k.split("/", 1)[0] in self.cfg.tuned]
        self.hyper_opt = (self.cfg.hyper_optimizer([self.raw[k].requires_grad_() for k in self.tuned_keys],
                                                   lr=self.cfg.hyper_lr)
                          if self.tuned_keys and self.cfg.mode != "none" else None)
        self.state = rule.init_state(self.params)
        self.device = next(iter(self.params.values())).device
        self.alive = torch.ones(self.P, dtype=torch.bool, device=self.device)
        self.t = 0
        self.history = History(diverged_at=[None] * self.P)
        self._window: list[tuple[Tree, Any, Batch]] = []  # (w, state, batch) of the last i steps, for unrolling
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        if self.cfg.solver is None:
            self.cfg.solver = Neumann(self.cfg.lookback, alpha=1.0, divergence="ignore")
        if self.cfg.implicit not in ("update", "loss"):
            raise ValueError(f"implicit must be 'update' or 'loss', got {self.cfg.implicit!r}")
        if self.cfg.implicit == "loss":
            in_rule = [n for n in self.cfg.tuned if n in self.rule.hyperparameters]
            if in_rule or self.penalty is None:
                raise ValueError("implicit='loss' differentiates dL_T/dw = 0, so tuned hyperparameters must enter "
                                 f"through `penalty`; {in_rule or 'no penalty'} would get no implicit term")

    # ------------------------------------------------------------------ the update map u(lambda, w)

    def _rule_hparams(self, nat: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Natural update-form values, each viewed to broadcast against the (P, ...) parameters."""
        out = {}
        for name in self.rule.hyperparameters:
            if name not in nat:
                continue
            v = nat[name]
            if isinstance(v, Tensor):
                out[name] = {k: pop.per_member(v, p) for k, p in params.items()}
            else:
                out[name] = {k: pop.per_member(v[k], p) for k, p in params.items() if k in v}
        return out

    def _step_map(self, params: Tree, raw: Mapping[str, Tensor], batch: Batch, state: Any,
                  create_graph: bool) -> tuple[Tree, Any, Tensor]:
        """(u, new_state, per-member training losses) at ``params`` with raw hyperparameters ``raw``."""
        nat = self.space.natural(raw)
        losses = self.train_loss(params, *batch)
        total = losses.sum()
        if self.penalty is not None:
            total = total + self.penalty(params, nat).sum()
        grads = torch.autograd.grad(total, list(params.values()), create_graph=create_graph)
        if self.cfg.grad_clip is not None:
            norms = sum(g.reshape(self.P, -1).pow(2).sum(1) for g in grads).sqrt()
            factor = (self.cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            grads = tuple(g * pop.per_member(factor, g) for g in grads)
        u, new_state = self.rule(params, dict(zip(params, grads)), self._rule_hparams(nat, params), state)
        return u, new_state, losses

    def _weight_step(self, batch: Batch) -> Tensor:
        w = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        raw = {k: v.detach() for k, v in self.raw.items()}
        with torch.enable_grad():
            u, state, losses = self._step_map(w, raw, batch, self.state, create_graph=False)
        if self.cfg.mode == "unroll":
            self._window = (self._window + [(_T.detach(self.params), self.state, batch)])[-self.cfg.lookback:]
        self.params = {k: (w[k] - u[k]).detach() for k in w}
        self.state = detach_state(state)
        self._mark_diverged(losses.detach(), "training loss")
        return losses.detach()

    # ------------------------------------------------------------------ hypergradients

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> Tree:
        tuned = {k: self.raw[k].detach() for k in self.tuned_keys}
        fixed = {k: v.detach() for k, v in self.raw.items() if k not in tuned}
        outer = lambda p, h: self.val_loss(p, *val_batch).sum()  # noqa: E731
        if self.cfg.mode == "ift" and self.cfg.implicit == "loss":
            def inner(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
                nat = self.space.natural({**fixed, **h})
                return self.train_loss(p, *train_batch).sum() + self.penalty(p, nat).sum()  # type: ignore[misc]

            return hypergradient(outer, self.params, tuned, inner=inner, solver=self.cfg.solver, check=False)
        if self.cfg.mode == "ift":
            state = self.state
            update = lambda p, h: self._step_map(p, {**fixed, **h}, train_batch, state, True)[0]  # noqa: E731
            return hypergradient(outer, self.params, tuned, update=update, solver=self.cfg.solver, check=False)
        if self.cfg.mode == "unroll":
            return replay_hypergradient(outer, self._step_map, self._window, tuned, fixed, check=False)
        raise AssertionError(self.cfg.mode)

    def _baydin_step(self, batch: Batch) -> None:
        """Baydin et al. (2018): d L_T(w_{t+1}) / d lambda through the step just taken, every step."""
        tuned = {k: self.raw[k].detach() for k in self.tuned_keys}
        fixed = {k: v.detach() for k, v in self.raw.items() if k not in tuned}
        w_prev, state = self._prev
        outer = lambda p, h: self.train_loss(p, *batch).sum()  # noqa: E731
        update = lambda p, h: self._step_map(p, {**fixed, **h}, batch, state, True)[0]  # noqa: E731
        hg = unrolled_hypergradient(outer, w_prev, tuned, update=update, steps=1, check=False)
        self._apply_hypergradient(hg)

    def _apply_hypergradient(self, hg: Mapping[str, Tensor]) -> None:
        for k, g in hg.items():
            bad = ~torch.isfinite(g).reshape(self.P, -1).all(dim=1)
            self._mark(bad, "hypergradient")
            self.raw[k].grad = torch.where(pop.per_member(self.alive, g), g, torch.zeros_like(g))
        self.hyper_opt.step()  # type: ignore[union-attr]
        self.hyper_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ bookkeeping

    def _mark_diverged(self, losses: Tensor, what: str) -> None:
        bad = ~torch.isfinite(losses)
        for k, v in self.params.items():
            bad |= ~torch.isfinite(v).reshape(self.P, -1).all(dim=1)
        self._mark(bad, what)

    def _mark(self, bad: Tensor, what: str) -> None:
        new = bad & self.alive
        if not bool(new.any()):
            return
        for i in torch.nonzero(new).flatten().tolist():
            self.history.diverged_at[i] = self.t
        self.alive &= ~new
        # freeze diverged members at finite values so they cannot disturb anything downstream
        with torch.no_grad():
            self.params = {k: torch.where(pop.per_member(self.alive, v), v, self.initial_params[k])
                           for k, v in self.params.items()}
            self.state = _zero_dead(self.state, self.alive)

    def _cold_restart(self, batches: Callable[[], Batch]) -> None:
        self.params = {k: v.clone() for k, v in self.initial_params.items()}
        self.state = self.rule.init_state(self.params)
        for _ in range(self.cfg.cold_steps):
            self._weight_step(batches())

    def record(self, train: Batch, val: Batch, test: Batch | None) -> None:
        h = self.history
        h.step.append(self.t)
        with torch.no_grad():
            for name, batch, store in (("train", train, h.train_loss), ("val", val, h.val_loss),
                                       ("test", test, h.test_loss)):
                if batch is None:
                    continue
                fn = self.test_loss if name == "test" else (self.train_loss if name == "train" else self.val_loss)
                vals = fn(self.params, *batch)
                _append(store, vals, self.alive)
            for name, v in self.describe().items():
                _append(h.hparams.setdefault(name, []), v, self.alive)

    def describe(self) -> dict[str, Tensor]:
        """Per-member mean natural value of every hyperparameter, shape (P,)."""
        with torch.no_grad():
            nat = self.space.natural(self.raw)
        out = {}
        for name, v in nat.items():
            vals = [v] if isinstance(v, Tensor) else list(v.values())
            flat = torch.cat([t.detach().reshape(self.P, -1).to(torch.float64) for t in vals], dim=1)
            out[name] = flat.mean(dim=1)
        return out

    # ------------------------------------------------------------------ the loop

    def run(self, steps: int, train_batches: Callable[[], Batch], val_batches: Callable[[], Batch], *,
            record_batches: tuple[Batch, Batch, Batch | None] | None = None,
            progress: Callable[[int], None] | None = None) -> History:
        """Take ``steps`` weight steps from the current step, with hyperparameter steps every T."""
        start = time.perf_counter()
        cfg = self.cfg
        for _ in range(steps):
            batch = train_batches()
            if cfg.mode == "baydin":
                self._prev = (_T.detach(self.params), self.state)
            self._weight_step(batch)
            self.t += 1
            if cfg.mode == "baydin" and self.hyper_opt is not None:
                self._baydin_step(batch)
            elif self.t % cfg.interval == 0:
                if cfg.lr_multiplier is not None:
                    self._multiply_lr(*cfg.lr_multiplier)
                if self.hyper_opt is not None and cfg.mode in ("ift", "unroll"):
                    if not cfg.warm_start:
                        self._cold_restart(train_batches)
                    self._apply_hypergradient(self._hypergradient(batch, val_batches()))
            if record_batches is not None and self.t % cfg.record_every == 0:
                self.record(*record_batches)
            if progress is not None:
                progress(1)
        self.history.seconds += time.perf_counter() - start
        return self.history

    def _multiply_lr(self, low: float, high: float) -> None:
        """Random (x LR): lr <- lr * U[low, high] per member (Clarke et al. sec. 4)."""
        f = low + (high - low) * torch.rand(self.P, generator=self._gen, dtype=torch.float64)
        self.rescale("lr", f)

    def rescale(self, name: str, factor: float | Tensor) -> None:
        """Multiply the *natural* value of hyperparameter ``name`` by ``factor`` (a float or shape (P,)).

        ``lambda <- T^{-1}(clamp_into_domain(T(raw) * factor))`` for every raw key of ``name`` (all
        elements of a per-weight one), in float64. Used by Random (x LR) and by PBT + ours (Clarke et
        al. 2022, appendix B.8.2: a PBT mutation old -> new is applied to the tuner's *current* value
        as the ratio new / old). A result on or past a finite end of the domain (a momentum pushed to
        1 or beyond) is moved just inside it, so the raw value stays finite. The hyperparameter
        optimiser's state is kept.
        """
        if name not in self.space:
            raise ValueError(f"cannot rescale {name!r}: not in the space {self.space.names}")
        h = self.space[name]
        f = torch.as_tensor(factor, dtype=torch.float64).reshape(-1)
        if f.numel() not in (1, self.P) or not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
            raise ValueError(f"rescale factor for {name!r} must be positive and finite, one value or one per member "
                             f"({self.P}), got {factor!r}")
        f = f.expand(self.P)
        with torch.no_grad():
            for k in [k for k in self.raw if k.split("/", 1)[0] == name]:
                r = self.raw[k]
                nat = h.transform.forward(r.double()) * pop.per_member(f.to(r.device), r)
                self.raw[k].copy_(h.to_raw(nat).to(r.dtype))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "initial_params": self.initial_params,
                "raw": {k: v.detach() for k, v in self.raw.items()}, "state": self.state, "alive": self.alive,
                "t": self.t, "history": self.history, "gen": self._gen.get_state(),
                "hyper_opt": self.hyper_opt.state_dict() if self.hyper_opt else None}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.params, self.initial_params, self.state = dict(sd["params"]), dict(sd["initial_params"]), sd["state"]
        with torch.no_grad():
            for k, v in sd["raw"].items():
                self.raw[k].copy_(v)
        self.alive, self.t, self.history = sd["alive"], sd["t"], sd["history"]
        self._gen.set_state(sd["gen"])
        if self.hyper_opt is not None:
            self.hyper_opt.load_state_dict(sd["hyper_opt"])


def _zero_dead(state: Any, alive: Tensor) -> Any:
    if isinstance(state, Tensor):
        if state.dim() == 0 or state.shape[0] != alive.shape[0]:
            return state
        return torch.where(pop.per_member(alive, state), state, torch.zeros_like(state))
    if isinstance(state, Mapping):
        return {k: _zero_dead(v, alive) for k, v in state.items()}
    return state


def _append(store: list[list[float | None]], values: Tensor, alive: Tensor) -> None:
    if not store:
        store.extend([] for _ in range(values.shape[0]))
    for i, (v, a) in enumerate(zip(values.tolist(), alive.tolist())):
        store[i].append(v if a and math.isfinite(v) else None)
