"""Vicol et al.'s (2021) outer-step-first bilevel optimiser, driven by the one online loop.

The loop (:func:`bilevel.loop.run`) decides *when*: a :class:`bilevel.loop.HyperFirst` schedule puts the
outer step before each block of weight steps. The :class:`MethodStrategy` says *how*: the hypergradient of a
:class:`~bilevel.concepts.methods.HypergradientMethod`, applied by the tuner's outer optimiser. The inner
response after the outer step is the block: ``inner_steps`` of the tuner's own gradient steps for a plain
``warm-partial`` concept (Algorithm 1 with the hyperparameter step first), else one weight step of a
:class:`ConceptTuner`, which *is* the concept's response (:meth:`~bilevel.concepts.responses.Concept.respond`:
a re-training to convergence, a proximal solve or a closed form).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import tree as T
from ..hypergradient import Loss, check_inputs
from ..loop import HyperFirst
from ..loop import run as run_loop
from ..strategies.base import Strategy
from ..tuner import OnlineTuner, TunerConfig
from ..updates import SGD
from .methods import HypergradientMethod
from .responses import Concept

__all__ = ["MethodStrategy", "ConceptTuner", "BilevelOptimizer"]

Tree = T.Tree


class MethodStrategy(Strategy):
    """The hyperparameter step of a :class:`~bilevel.concepts.methods.HypergradientMethod` (Vicol et al. 2021).

    dF/dx at the tuner's weights and raw hyperparameters, with ``outer`` F(y, x) and ``inner`` f(y, x) (both
    ``(params, hparams) -> scalar``, no data context: the losses of :class:`BilevelOptimizer`), then one step of
    the tuner's hyperparameter optimiser. It draws no validation context, and it may step before the first
    weight step (:class:`bilevel.loop.HyperFirst`).

    Args:
        method: the hypergradient approximation.
        outer: the outer objective F(y, x).
        inner: the inner objective f(y, x).
    """

    name = "concept-method"

    def __init__(self, method: HypergradientMethod, outer: Loss, inner: Loss) -> None:
        self.method, self.outer, self.inner = method, outer, inner

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """dF/dx of every raw hyperparameter at ``tuner.params`` by :attr:`method` (the batches are not used).

        Args:
            tuner: the loop.
            train_batch: not used.
            val_batch: not used.

        Returns:
            ``{raw key: hypergradient}``.
        """
        return self.method(self.outer, tuner.params, T.detach(tuner.raw), inner=self.inner)

    def hyper_step(self, tuner: OnlineTuner, train_batch: Any, val_batches: Callable[[], Any]) -> Tree:
        """The outer step x_{t+1} = OuterOpt(x_t, dF/dx(x_t, y_t)) (draws no validation context).

        Args:
            tuner: the loop.
            train_batch: not used.
            val_batches: not called.

        Returns:
            The hypergradient applied.

        Raises:
            NonFiniteError: when the hypergradient is not finite (the tuner's ``on_divergence="raise"``).
        """
        g = self.hypergradient(tuner, train_batch, None)
        tuner.apply_hypergradient(g)
        return g


class ConceptTuner(OnlineTuner):
    """An :class:`~bilevel.tuner.OnlineTuner` whose weight step is a concept's inner response.

    The weight step replaces the weights by :meth:`Concept.respond <bilevel.concepts.responses.Concept.respond>`
    at the current raw hyperparameters (from the initial weights for ``cold``, else from the current ones) and
    returns the inner objective at the weights before it. Arguments as :class:`~bilevel.tuner.OnlineTuner`,
    plus the keywords below.

    Args:
        *args: :class:`~bilevel.tuner.OnlineTuner`'s positional arguments.
        concept: the concept whose response is the weight step.
        inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
        **kwargs: :class:`~bilevel.tuner.OnlineTuner`'s keyword arguments.

    Attributes:
        inner_steps_taken: the gradient steps of all responses so far (0 for each closed-form one).
    """

    def __init__(self, *args: Any, concept: Concept, inner: Loss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concept, self.inner = concept, inner
        self.inner_steps_taken = 0

    def weight_step(self, batch: Any) -> Tensor:
        """y <- the concept's response to the current hyperparameters (``batch`` is not used).

        Args:
            batch: not used (the inner objective has no data context).

        Returns:
            The inner objective f(y, x) at the weights before the response (detached).

        Raises:
            NonFiniteError: when a gradient-descent response meets a non-finite inner loss.
        """
        with torch.no_grad():
            loss = self.inner(self.params, T.detach(self.raw)).detach()
        self.params, n = self.concept.respond(self.inner, self.params, self.initial_params, self.raw)
        self.inner_steps_taken += n
        return loss


@dataclass
class _Run:
    """What :meth:`BilevelOptimizer.run` does at the end of each outer step."""

    history: list[dict[str, Any]]
    every: int
    callback: Callable[[BilevelOptimizer], None] | None
    progress: Callable[[int], None] | None


class _OuterSteps:
    """The tuner callback that ends an outer step with the last weight step of its block."""

    def __init__(self, opt: BilevelOptimizer) -> None:
        self.opt = opt

    def on_weight_step(self, tuner: OnlineTuner) -> None:
        if tuner.t % self.opt.block == 0:
            self.opt._outer_step_done()


def _no_context() -> None:
    """The training and validation context of every step: none (the objectives take none)."""
    return None


class BilevelOptimizer:
    """Vicol et al.'s alternating updates (Table 1; App. F Alg. 1 and 3) on the one online loop.

    Each :meth:`step`::

        x_{t+1} = OuterOpt(x_t, dF/dx(x_t, y_t))     (the hypergradient of ``method`` at y_t)
        y_{t+1} = the concept's response from y_t or y_0 to x_{t+1}

    The weights, hyperparameters, outer optimiser and the application of each hypergradient are
    those of a :class:`bilevel.tuner.OnlineTuner` on one model (:attr:`loop`, gradient descent
    with ``concept.inner_lr``), and :func:`bilevel.loop.run` drives it with a
    :class:`bilevel.loop.HyperFirst` schedule of :attr:`block` weight steps per outer step; the
    outer step is the tuner's strategy, a :class:`MethodStrategy`. ``warm-partial`` (without
    ``prox_eps`` or ``closed_form``, ``inner_steps >= 1``) responds with ``inner_steps`` of the
    loop's own weight steps, i.e. Algorithm 1 with the hyperparameter step first; the other
    concepts respond with one weight step of a :class:`ConceptTuner` (:meth:`Concept.respond`):
    ``cold`` and ``warm-full`` re-solve the inner problem to convergence, first for x_0 (an
    uncounted step at construction), so every hypergradient is taken at a best response. The
    loop's callbacks fire as on any loop: ``on_interval`` and ``on_hyper_step`` around each outer
    step, ``on_weight_step`` after each weight step (each response), with the tuner as argument.

    ``outer`` is F(y, x), ``inner`` f(y, x), both ``(params, hparams) -> scalar``; ``hparams``
    are the raw outer parameters (any keys, e.g. a :class:`bilevel.distill.DistilledData`'s raw
    dict), updated by ``outer_optimizer(list(hparams.values()), lr=outer_lr)``.

    Args:
        inner: the inner objective f(y, x), ``(params, hparams) -> scalar``.
        outer: the outer objective F(y, x), ``(params, hparams) -> scalar``.
        params: the initial inner parameters y_0.
        hparams: the initial raw outer parameters x_0.
        concept: how the weights respond to each outer step.
        method: the hypergradient approximation.
        outer_lr: the outer optimiser's learning rate.
        outer_optimizer: the outer optimiser's class, called as ``outer_optimizer(params, lr=outer_lr)``.
        callbacks: loop callbacks (:mod:`bilevel.callbacks`), called with the tuner :attr:`loop`.

    Attributes:
        t: the outer steps taken.
        block: the weight steps of the loop per outer step (``inner_steps`` for a plain ``warm-partial``, else 1).
        loop: the :class:`~bilevel.tuner.OnlineTuner` (a :class:`ConceptTuner` unless plain ``warm-partial``).
    """

    def __init__(
        self,
        inner: Loss,
        outer: Loss,
        params: Tree,
        hparams: Tree,
        concept: Concept,
        method: HypergradientMethod,
        outer_lr: float = 1e-2,
        outer_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        callbacks: Iterable[Any] = (),
    ) -> None:
        check_inputs(params, hparams)
        self.inner, self.outer, self.concept, self.method = inner, outer, concept, method
        self.outer_lr, self.outer_optimizer = outer_lr, outer_optimizer
        c = concept
        plain = c.name == "warm-partial" and not c.prox_eps and c.closed_form is None and c.inner_steps >= 1
        self.block = c.inner_steps if plain else 1
        cfg = TunerConfig(
            tuned=tuple(hparams),
            hyper_lr=outer_lr,
            hyper_optimizer=outer_optimizer,
            on_divergence="raise",
            interval=self.block,
        )
        args = (
            params,
            hparams,
            None,
            SGD(lr=c.inner_lr),
            lambda p, h, ctx: inner(p, h),
            lambda p, h, ctx: outer(p, h),
        )
        kwargs: dict[str, Any] = dict(
            config=cfg,
            stacked=False,
            strategy=MethodStrategy(method, outer, inner),
            schedule=HyperFirst(self.block),
            callbacks=[*callbacks, _OuterSteps(self)],
        )
        self.loop = OnlineTuner(*args, **kwargs) if plain else ConceptTuner(*args, concept=c, inner=inner, **kwargs)
        self.t = 0
        self._run: _Run | None = None
        if c.name != "warm-partial":
            self.loop.weight_step(None)  # the best response to x_0, before any outer step (not counted)

    @property
    def params(self) -> Tree:
        """The current inner parameters y_t."""
        return self.loop.params

    @property
    def hparams(self) -> Tree:
        """The current raw outer parameters x_t."""
        return self.loop.raw

    @property
    def initial(self) -> Tree:
        """The initial inner parameters y_0."""
        return self.loop.initial_params

    @property
    def opt(self) -> torch.optim.Optimizer:
        """The outer optimiser (replace it to use parameter groups)."""
        return self.loop.hyper_opt  # type: ignore[return-value]

    @opt.setter
    def opt(self, value: torch.optim.Optimizer) -> None:
        """Replace the outer optimiser.

        Args:
            value: an optimiser over the raw outer parameters :attr:`hparams`.
        """
        self.loop.hyper_opt = value

    @property
    def inner_steps_taken(self) -> int:
        """The inner gradient steps taken so far (the responses', including the first one to x_0)."""
        if isinstance(self.loop, ConceptTuner):
            return self.loop.inner_steps_taken
        return self.t * self.block

    def losses(self) -> dict[str, float]:
        """Current outer F(y_t, x_t) and inner f(y_t, x_t)."""
        with torch.no_grad():
            h = T.detach(self.hparams)
            return {"outer": float(self.outer(self.params, h)), "inner": float(self.inner(self.params, h))}

    def step(self) -> Tree:
        """One outer step then the concept's inner response (one block of the loop); returns the hypergradient."""
        run_loop(self.loop, self.block, _no_context, _no_context)
        assert self.loop.last_hypergradient is not None  # HyperFirst: the block starts with the outer step
        return self.loop.last_hypergradient

    def run(
        self,
        steps: int,
        record_every: int = 1,
        callback: Callable[[BilevelOptimizer], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """``steps`` outer steps; every ``record_every`` a record ``{t, outer, inner, hparams}`` (see :meth:`record`).

        One call of :func:`bilevel.loop.run` for ``steps`` blocks of :attr:`block` weight steps.
        ``callback(self)`` is called at each record (e.g. to log a trajectory). The first
        record is the state before any step.

        Args:
            steps: the number of outer steps.
            record_every: outer steps between two records (>= 1).
            callback: called with this optimiser at each record after the first, or ``None``.
            progress: called with 1 after every outer step (e.g. a progress bar's ``update``), or ``None``.

        Returns:
            The records, the first one before any step.

        Raises:
            ValueError: when ``record_every < 1`` or ``steps < 0``.
        """
        if record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        history = [self.record()]
        self._run = _Run(history, record_every, callback, progress)
        try:
            run_loop(self.loop, steps * self.block, _no_context, _no_context)
        finally:
            self._run = None
        return history

    def _outer_step_done(self) -> None:
        """Count an outer step whose response is complete; record, call back and report progress within :meth:`run`."""
        self.t += 1
        r = self._run
        if r is None:
            return
        if self.t % r.every == 0:
            r.history.append(self.record())
            if r.callback is not None:
                r.callback(self)
        if r.progress is not None:
            r.progress(1)

    def record(self) -> dict[str, Any]:
        """The current state: ``{"t", "outer", "inner", "hparams"}`` (detached copies of the raw outer parameters).

        Returns:
            The record, as :meth:`run` returns them.
        """
        return {"t": self.t, **self.losses(), "hparams": {k: v.detach().clone() for k, v in self.hparams.items()}}
