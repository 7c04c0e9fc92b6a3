"""What the loop does when a value goes non-finite (``TunerConfig.on_divergence``).

* ``"raise"``: the first non-finite value raises :class:`~bilevel.errors.NonFiniteError` naming it (the data,
  the training loss, the weights, the gradient, or in a hyperparameter step the validation data, a product or
  the hypergradient) and the weight step; the weights, optimiser state and hyperparameters are left at their
  last finite values.
* ``"record"``: diverged members are recorded (``History.events``) and frozen at their initial weights (on
  an accelerator without a host-device synchronisation: ``sync_free``).
* ``"rollback"``: a member whose weight step goes non-finite returns to its last good state (the last weights
  whose training loss was finite and at most ``rollback_spike`` times the lowest it has seen, with their
  optimiser state) and its learning rate is multiplied by ``rollback_factor``; a non-finite hypergradient
  skips the step and scales that member's later hyperparameter steps; after ``max_rollbacks`` the member is
  frozen as in ``"record"``.

:class:`DivergencePolicy` holds these methods for :class:`bilevel.tuner.OnlineTuner` (its base class).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import is_dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import population as pop
from .errors import NonFiniteError

__all__ = ["DivergencePolicy", "scale_lr"]


class DivergencePolicy:
    """The divergence handling of :class:`bilevel.tuner.OnlineTuner` (see the module docstring).

    It reads and writes the tuner's configuration, weights, optimiser state, ``alive`` mask, history and the
    rollback bookkeeping the tuner initialises.
    """

    cfg: Any
    P: int
    stacked: bool
    t: int
    params: Any
    state: Any
    alive: Tensor
    sync_free: bool
    initial_params: Any
    space: Any
    rule: Any
    strategy: Any
    any_rank: Any
    rolled_back: Tensor | None
    _history: Any
    _diverged_t: Tensor
    _rollbacks: list[int]
    _good: Any
    _best_loss: Tensor
    _hyper_scale: Tensor
    snapshot: Tensor | None
    device: Any
    raw: Any

    def _init_divergence(self) -> None:
        """The bookkeeping of the rollbacks (called once the weights and optimiser state exist)."""
        self.rolled_back = None  # (P,) members whose last weight step was rolled back, else None
        self._rollbacks = [0] * self.P  # rollbacks per member (on_divergence="rollback")
        # per-member multiplier of the hyperparameter step (rollback shrinks it after a non-finite hypergradient)
        self._hyper_scale = torch.ones(self.P, dtype=torch.float64)
        self._good = (self.params, self.state)  # rollback's target: see weight_step
        #: whether a flag computed on this process's data holds on any process (data-parallel training sets an
        #: all-reduce here, so that every rank takes the same branch; one process: the flag itself)
        self.any_rank = lambda flag: flag
        self._best_loss = torch.full((self.P,), math.inf, dtype=torch.float64)  # lowest training loss seen
        self.snapshot = None

    def _per_member(self, value: Tensor, like: Tensor) -> Tensor:
        return pop.per_member(value, like) if self.stacked else value.reshape(value.shape[1:] if value.dim() else ())

    def rescale(self, name: str, factor: float | Tensor) -> None:
        """Multiply the *natural* value of hyperparameter ``name`` by ``factor`` (a float or shape (P,)).

        ``lambda <- T^{-1}(clamp_into_domain(T(raw) * factor))`` for every raw key of ``name`` (all
        elements of a per-weight one), in float64. Used by Random (x LR)
        (:class:`bilevel.callbacks.RandomLRMultiplier`) and by PBT + ours (Clarke et al. 2022,
        appendix B.8.2: a PBT mutation old -> new is applied to the tuner's *current* value as the
        ratio new / old). A result on or past a finite end of the domain (a momentum pushed to 1 or
        beyond) is moved just inside it, so the raw value stays finite. The hyperparameter
        optimiser's state is kept.

        Args:
            name: the hyperparameter, a name in the space.
            factor: a positive finite factor, or one per member (shape ``(P,)``).

        Raises:
            ValueError: when ``name`` is not in the space, or a factor is not positive and finite or
                ``factor`` has neither 1 nor P values.
        """
        if self.space is None or name not in self.space:
            raise ValueError(f"cannot rescale {name!r}: not in the space {self.space.names if self.space else []}")
        h = self.space[name]
        f = torch.as_tensor(factor, dtype=torch.float64).reshape(-1)
        if f.numel() not in (1, self.P) or not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
            raise ValueError(
                f"rescale factor for {name!r} must be positive and finite, one value or one per member "
                f"({self.P}), got {factor!r}"
            )
        f = f.expand(self.P)
        with torch.no_grad():
            for k in [k for k in self.raw if k.split("/", 1)[0] == name]:
                r = self.raw[k]
                fm = self._per_member(f.to(r.device), r)
                nat = h.transform.forward(r.double()) * fm
                self.raw[k].copy_(torch.where(fm == 1, r, h.to_raw(nat).to(r.dtype)))  # factor 1: bit for bit

    def _guard(self, batch: Any, losses: Tensor, new: Any, state: Any, refused: Tensor | None) -> tuple[Any, Any]:
        """A guarded weight step (``"raise"`` / ``"rollback"``): the new weights and state, rolled back per member.

        With ``"rollback"`` the state before the step becomes a member's last good one when its training loss
        was finite and at most ``rollback_spike`` times the lowest it has seen; a member whose step is
        non-finite returns to it (``"raise"``: the step raises instead).

        Args:
            batch: the step's training context.
            losses: the training losses at the weights before the step.
            new: the weights after the step.
            state: the optimiser state after the step.
            refused: (P,) members whose non-finite gradient the rule was not stepped on, or ``None``.

        Returns:
            ``(weights, state)`` to commit.
        """
        bad = self._nonfinite(losses, new) if refused is None else refused
        if self.cfg.on_divergence == "rollback":  # the last good weights: see TunerConfig.on_divergence
            ok = torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
            mean = torch.where(ok, losses.reshape(self.P, -1).double().mean(dim=1), math.inf)
            self._best_loss = torch.minimum(self._best_loss.to(mean.device), mean)
            ok = ok & (mean <= self.cfg.rollback_spike * self._best_loss)
            gp, gs = self._good
            self._good = (
                {k: torch.where(self._per_member(ok, v), v, gp[k]) for k, v in self.params.items()},
                self._where_state(ok, self.state, gs),
            )
            self.snapshot = ok  # (P,) members whose state before this step is now their last good one
        if bool(bad.any()):
            cause = self._cause(batch, losses, "weights" if refused is None else "training gradient")
            if self.cfg.on_divergence == "raise":
                self._raise(cause)
            gp, gs = self._good
            new = {k: torch.where(self._per_member(bad, v), gp[k], v) for k, v in new.items()}
            state = self._where_state(bad, gs, state)
            self._rollback(bad, cause)
        return new, state

    def _skip_hypergradient(self, hg: Mapping[str, Tensor]) -> Tensor:
        """(P,) members whose hypergradient is non-finite: marked diverged, or (``"rollback"``) skipped with their
        later hyperparameter steps scaled by ``rollback_factor``.

        Args:
            hg: ``{raw key: hypergradient}``.

        Returns:
            The members that skip this hyperparameter step.
        """
        rollback = self.cfg.on_divergence == "rollback"
        skip = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        for g in hg.values():
            skip |= ~torch.isfinite(g).reshape(self.P, -1).all(dim=1)
        if rollback:
            if bool(skip.any()):
                members = torch.nonzero(skip).flatten().tolist()
                self._hyper_scale[members] *= self.cfg.rollback_factor
                for i in members:
                    self._event(i, "hypergradient", "rollback", hyper_factor=float(self._hyper_scale[i]))
        else:
            self._mark(skip, "hypergradient")
        return skip

    def _hyper_failure(self, e: NonFiniteError, train_batch: Any, val_batch: Any) -> NonFiniteError:
        """The error a failed hyperparameter step raises: what went non-finite first (the data or ``e``'s quantity).

        Args:
            e: the error of the hypergradient's check.
            train_batch: the residual's training context.
            val_batch: the validation context.

        Returns:
            A :class:`NonFiniteError` naming the cause and the weight step the hyperparameter step followed.
        """
        where = f"at the hyperparameter step after weight step {self.t}"
        cause = self._cause(val_batch, torch.zeros(()), e.quantity, which="validation")
        if cause == e.quantity:
            cause = self._cause(train_batch, torch.zeros(()), e.quantity)
        return NonFiniteError(
            f"{cause} {where}",
            "try a smaller hyper_lr, or a solver with fewer steps or damping; the weights and "
            "hyperparameters are those before this step",
            step=self.t,
        )

    @contextlib.contextmanager
    def _scaled_hyper_step(self, keys: list[str]) -> Iterator[None]:
        """Around the hyperparameter optimiser's step: a rolled-back member's raw change is scaled by its
        ``_hyper_scale`` (``lambda_old + s (lambda_new - lambda_old)``; for Adam or SGD, a smaller hyper
        learning rate). Members at scale 1 keep the optimiser's result bit for bit.

        Args:
            keys: the raw keys the step moves.
        """
        scaled = self.cfg.on_divergence == "rollback" and bool((self._hyper_scale != 1).any())
        before = {k: self.raw[k].detach().clone() for k in keys} if scaled else {}
        yield
        if scaled:
            s = self._hyper_scale.to(self.device)
            with torch.no_grad():
                for k, old in before.items():
                    r = self.raw[k]
                    sm = self._per_member(s, r).to(r.dtype)
                    r.copy_(torch.where(sm == 1, r, old + sm * (r - old)))

    def _nonfinite(self, losses: Tensor, tree: Mapping[str, Tensor]) -> Tensor:
        """Shape (P,): whether a member's losses or any of its tensors in ``tree`` hold NaN or inf."""
        leaves = [v for v in (losses, *tree.values()) if v.numel()]
        if not self.stacked and leaves and all(v.is_floating_point() for v in leaves):
            if all(v.device.type == "cpu" for v in leaves):
                # a NaN or inf entry makes its tensor's sum non-finite (one vectorised pass each); a non-finite sum
                # can also be an overflow of finite entries, so only that case looks entry by entry
                if bool(torch.isfinite(torch.stack([v.sum() for v in leaves])).all()):
                    return torch.zeros(1, dtype=torch.bool)
            else:  # one fused kernel: max |x| of a tensor is finite exactly when all its entries are (NaN propagates)
                return ~torch.isfinite(torch.stack(torch._foreach_norm(leaves, math.inf))).all().reshape(1)
        bad = ~torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
        for v in tree.values():
            bad |= ~torch.isfinite(v.reshape(self.P, -1)).all(dim=1)
        return bad

    def _cause(self, batch: Any, losses: Tensor, otherwise: str, which: str = "training") -> str:
        """What became non-finite first: the data, the loss, or ``otherwise`` (weights, gradient, ...)."""
        bad_data = any(
            isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())
            for x in torch.utils._pytree.tree_leaves(batch)
        )
        if self.any_rank(bad_data):
            return f"data (the {which} batch holds NaN or inf)"
        if not bool(torch.isfinite(losses).all()):
            return f"{which} loss"
        return otherwise

    def _raise(self, cause: str) -> None:
        """Raise :class:`NonFiniteError` for a weight step that was not taken, naming ``cause`` and the step."""
        advice = (
            "a training batch holds NaN or inf: check the data pipeline"
            if cause.startswith("data")
            else "the training loss is non-finite at finite weights and data: check the loss (log of 0, division "
            "by 0) or lower the learning rate"
            if cause == "training loss"
            else "the weight step overflowed: try a smaller learning rate"
        )
        raise NonFiniteError(
            f"{cause} at weight step {self.t + 1}",
            advice + "; the weights, optimiser state and hyperparameters are those before this step",
            step=self.t + 1,
        )

    def _where_state(self, bad: Tensor, old: Any, new: Any) -> Any:
        """The optimiser state with ``old`` for the members in ``bad`` and ``new`` for the others.

        A buffer present on one side only (a momentum buffer a rule creates on its first step) counts as zeros
        on the other, as the rules read a missing buffer."""
        if isinstance(new, Mapping) or isinstance(old, Mapping):
            old = old if isinstance(old, Mapping) else {}
            new = new if isinstance(new, Mapping) else {}
            out = {}
            for k in [*new, *(k for k in old if k not in new)]:
                a, b = old.get(k), new.get(k)
                out[k] = self._where_state(bad, _zeros_as(b) if a is None else a, _zeros_as(a) if b is None else b)
            return out
        if isinstance(new, Tensor) and isinstance(old, Tensor):
            if not self.stacked:
                return old if bool(bad.reshape(())) else new
            if new.dim() == 0 or new.shape[0] != self.P:
                return new
            return torch.where(pop.per_member(bad, new), old, new)
        return new

    def _event(self, member: int, what: str, action: str, **extra: Any) -> None:
        self._history.events.append({"step": self.t, "member": member, "what": what, "action": action, **extra})

    def _rollback(self, bad: Tensor, cause: str) -> None:
        """Members in ``bad`` keep their last finite state (done by the caller); shrink the step that caused it.

        A weight-step divergence multiplies the member's learning rate by ``rollback_factor`` (unless the data
        were non-finite: then the batch is only skipped); after ``max_rollbacks`` the member is frozen."""
        self.rolled_back = bad
        members = torch.nonzero(bad).flatten().tolist()
        data = cause.startswith("data")
        for i in members:
            self._rollbacks[i] += 1
        if not data:
            self._shrink_lr(bad, self.cfg.rollback_factor)
        for i in members:
            factor = None if data else self.cfg.rollback_factor ** self._lr_shrinks(i)
            self._event(i, cause, "rollback", lr_factor=factor)
        spent = [i for i in members if self._rollbacks[i] > self.cfg.max_rollbacks]
        if spent:
            if not self.stacked:
                raise NonFiniteError(
                    f"{cause} at weight step {self.t + 1}",
                    f"still non-finite after {self.cfg.max_rollbacks} rollbacks; "
                    "the weights and optimiser state are those before this step",
                    step=self.t + 1,
                )
            dead = torch.zeros_like(bad)
            dead[spent] = True
            self._mark(dead, f"{cause} (after {self.cfg.max_rollbacks} rollbacks)")

    def _lr_shrinks(self, member: int) -> int:
        return sum(1 for e in self._history.events if e["member"] == member and e.get("lr_factor") is not None) + 1

    def _shrink_lr(self, bad: Tensor, factor: float) -> None:
        """Multiply the learning rate of the members in ``bad`` by ``factor`` (the others' stays bit for bit)."""
        if self.space is not None and "lr" in self.space:
            self.rescale("lr", torch.where(bad.cpu(), factor, 1.0).to(torch.float64))
            return
        self.rule = scale_lr(self.rule, factor)

    def _mark_diverged(self, losses: Tensor, what: str) -> None:
        bad = ~torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
        for v in self.params.values():
            bad |= ~torch.isfinite(v).reshape(self.P, -1).all(dim=1)
        self._mark(bad, what)

    def _mark(self, bad: Tensor, what: str) -> None:
        """Mark the members in ``bad`` (shape (P,)) that are still alive as diverged at step ``t``.

        On a CPU (and with ``on_divergence="raise"``) this asks whether any member is new; with
        ``sync_free`` (on an accelerator) it never waits for the device: the freezing below runs every
        time and is a no-op for members that did not diverge."""
        new = bad & self.alive
        if self.cfg.on_divergence == "raise" or not self.sync_free:
            if not bool(new.any()):
                return
            if self.cfg.on_divergence == "raise":
                raise NonFiniteError(
                    f"{what} at step {self.t}",
                    "the weights or hyperparameters diverged: try a smaller learning rate or hyper_lr",
                    step=self.t,
                )
            for i in torch.nonzero(new).flatten().tolist():
                self._history.diverged_at[i] = self.t
                self._event(i, what, "frozen")
        else:
            self._diverged_t = torch.where(new, torch.full_like(self._diverged_t, self.t), self._diverged_t)
        self.alive = self.alive & ~new
        # freeze diverged members at finite values so they cannot disturb anything downstream
        old = self.params
        with torch.no_grad():
            self.params = {
                k: torch.where(self._per_member(self.alive, v), v, self.initial_params[k])
                for k, v in self.params.items()
            }
            self.state = self._zero_dead(self.state)
        if self.sync_free:
            self.strategy.follow(self, old)

    def _zero_dead(self, state: Any) -> Any:
        if isinstance(state, Tensor):
            if not self.stacked:
                return torch.where(self.alive.reshape(()), state, torch.zeros_like(state)) if state.dim() else state
            if state.dim() == 0 or state.shape[0] != self.P:
                return state
            return torch.where(pop.per_member(self.alive, state), state, torch.zeros_like(state))
        if isinstance(state, Mapping):
            return {k: self._zero_dead(v) for k, v in state.items()}
        return state


def scale_lr(rule: Any, factor: float) -> Any:
    """``rule`` with its learning rate(s) multiplied by ``factor`` (a torch.optim optimiser: every group's, in place).

    Used by ``on_divergence="rollback"`` when the learning rate is not in the hyperparameter space. Raises
    ``ValueError`` for a rule without a learning rate it can reach.

    Args:
        rule: an update rule: a dataclass with an ``lr`` field, a wrapper with fixed per-parameter values, or a
            rule holding a ``torch.optim`` optimiser.
        factor: the multiplier of the learning rate(s).

    Returns:
        The rule with the scaled learning rate(s): a new one, or ``rule`` itself for a ``torch.optim`` optimiser.

    Raises:
        ValueError: when the rule's learning rate cannot be reached.
    """
    optimizer = getattr(rule, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        return rule
    inner = getattr(rule, "rule", None)  # a wrapper holding fixed per-parameter values (updates.WithDefaults)
    values = getattr(rule, "values", None)
    if inner is not None and isinstance(values, Mapping):
        lr = values.get("lr")
        scaled = {**values, "lr": {k: v * factor for k, v in lr.items()}} if isinstance(lr, Mapping) else values
        return type(rule)(scale_lr(inner, factor), scaled)
    if is_dataclass(rule) and hasattr(rule, "lr"):
        return replace(rule, lr=rule.lr * factor)  # type: ignore[type-var]
    raise ValueError(
        f"on_divergence='rollback' cannot shrink the learning rate of {type(rule).__name__}: put 'lr' in the "
        "hyperparameter space (tuned or not)"
    )


def _zeros_as(x: Any) -> Any:
    """Zeros shaped like the tensors of a (nested) state entry."""
    if isinstance(x, Tensor):
        return torch.zeros_like(x)
    if isinstance(x, Mapping):
        return {k: _zeros_as(v) for k, v in x.items()}
    return x
