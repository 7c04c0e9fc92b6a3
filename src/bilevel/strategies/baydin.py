"""Hypergradient descent (Baydin et al. 2018): the hyperparameters follow the training loss through one step.

:class:`Baydin` (``mode="baydin"``) differentiates the training loss at the new weights through the whole
step just taken, ``d L_T(w_{t+1}(lambda); c_t) / d lambda`` with ``w_{t+1} = w_t - u(lambda, w_t; c_t)``
(momentum buffer, weight decay and the hyperparameter transform's chain rule included).

:class:`AuthorsBaydin` is the form of Clarke et al.'s (2022) code for their Baydin baseline:

    h = -(dL(w_t; B') . dL(w_{t-1}; B))

the dot product of the plain loss gradients (no weight decay, no momentum, no clipping) at the weights after
and before the step, on the step's batch B and on a second batch B' (``next_batches``; ``None``: B itself,
as for full-batch data). ``h`` is dL/d lr of plain SGD, applied to the raw (log10) learning rate as it is (no
chain-rule factor) by the tuner's hyperparameter optimiser (their plain SGD, 0.001); afterwards the raw value
is clamped into ``raw_clip`` (their ``hyperparameter_clipping: lr: [-10, 0]``).

Both take a step after every weight step (their default schedule is ``Every(1)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import tree as _T
from ..tree import Tree
from ..unroll import unrolled_hypergradient
from .base import Strategy

if TYPE_CHECKING:
    from ..loop import Schedule
    from ..tuner import OnlineTuner, TunerConfig

__all__ = ["Baydin", "AuthorsBaydin"]


class Baydin(Strategy):
    """Baydin et al. (2018) through the step just taken, every step (see the module docstring)."""

    name = "baydin"

    def __init__(self) -> None:
        self.prev: tuple[Tree, Any] | None = None  # (w, optimiser state) before the last step

    def default_schedule(self, cfg: TunerConfig) -> Schedule:
        """``Every(1)``: a hyperparameter step after every weight step."""
        from ..loop import Every

        return Every(1)

    def remember(self, tuner: OnlineTuner, batch: Any) -> None:
        """Keep the weights and optimiser state before the step."""
        self.prev = (_T.detach(tuner.params), tuner.state)

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """``d L_T(w_{t+1}; c_t) / d lambda`` through the last step on ``train_batch`` (``val_batch`` unused)."""
        if self.prev is None:
            raise ValueError("Baydin's hypergradient goes through the last weight step: take one first")
        tuned, fixed = tuner.split()
        w_prev, state = self.prev

        def outer(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
            return tuner.train_loss(p, tuner.natural({**fixed, **h}), train_batch).sum()

        update = lambda p, h: tuner.step_map(p, {**fixed, **h}, train_batch, state, True)[0]  # noqa: E731
        check = tuner.cfg.on_divergence == "raise"
        return unrolled_hypergradient(outer, w_prev, tuned, update=update, steps=1, check=check)

    def hyper_step(self, tuner: OnlineTuner, train_batch: Any, val_batches: Callable[[], Any]) -> Tree | None:
        """Step along :meth:`hypergradient` on the step's own batch (no validation context is drawn)."""
        hg = self.hypergradient(tuner, train_batch, None)
        tuner.apply_hypergradient(hg)
        return hg

    def state_dict(self) -> dict[str, Any]:
        """The weights and optimiser state before the last step."""
        return {"prev": self.prev}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.prev = sd.get("prev")


class AuthorsBaydin(Baydin):
    """Clarke et al.'s (2022) Baydin baseline, as their code computes it (see the module docstring).

    Args:
        next_batches: returns B', the second batch (``None``: the step's own batch).
        raw_clip: the box the raw tuned values are clamped into after every step, or ``None``.
    """

    name = "authors-baydin"

    def __init__(
        self, next_batches: Callable[[], Any] | None = None, raw_clip: tuple[float, float] | None = (-10.0, 0.0)
    ) -> None:
        super().__init__()
        self.next_batches = next_batches
        self.raw_clip = raw_clip

    @staticmethod
    def _loss_gradients(
        tuner: OnlineTuner, params: Mapping[str, Tensor], nat: Mapping[str, Any], batch: Any
    ) -> tuple[Tensor, ...]:
        w = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            loss = tuner.train_loss(w, dict(nat), batch).sum()  # members are independent: the stack of their own
            return torch.autograd.grad(loss, list(w.values()))

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """``{key: -(g_new . g_prev)}`` for every tuned raw key (``val_batch``: B', or ``None`` for B)."""
        if self.prev is None:
            raise ValueError("Baydin's hypergradient goes through the last weight step: take one first")
        w_prev, _ = self.prev
        new_batch = val_batch if val_batch is not None else train_batch
        with torch.no_grad():
            nat = tuner.natural({k: v.detach() for k, v in tuner.raw.items()})
        g_prev = self._loss_gradients(tuner, w_prev, nat, train_batch)
        g_new = self._loss_gradients(tuner, tuner.params, nat, new_batch)
        dot = sum((a * b).reshape(tuner.P, -1).sum(1) for a, b in zip(g_new, g_prev))
        return {k: (-dot).reshape(tuner.raw[k].shape).to(tuner.raw[k].dtype) for k in tuner.tuned_keys}  # type: ignore[union-attr]

    def hyper_step(self, tuner: OnlineTuner, train_batch: Any, val_batches: Callable[[], Any]) -> Tree | None:
        """Step along :meth:`hypergradient` with B' from ``next_batches``, then clamp the raw values."""
        new_batch = self.next_batches() if self.next_batches is not None else train_batch
        hg = self.hypergradient(tuner, train_batch, new_batch)
        tuner.apply_hypergradient(hg)
        if self.raw_clip is not None:
            with torch.no_grad():
                for k in tuner.tuned_keys:
                    tuner.raw[k].clamp_(*self.raw_clip)
        return hg
