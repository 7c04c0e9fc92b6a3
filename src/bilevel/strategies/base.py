"""The strategy protocol: *how* a hyperparameter step is computed (the loop, :mod:`bilevel.loop`, decides *when*).

A strategy turns the tuner's state at a scheduled boundary into a hypergradient dL_V/dlambda of the tuned raw
hyperparameters and hands it to :meth:`bilevel.tuner.OnlineTuner.apply_hypergradient`. Strategies that need
the weights before a step (the unrolled window, Baydin's previous weights) keep them through
:meth:`Strategy.remember`, called by the weight step; everything a strategy keeps is in its
:meth:`Strategy.state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..tree import Tree

if TYPE_CHECKING:  # the tuner imports the strategies; they only see it as an argument
    from ..loop import Schedule
    from ..tuner import OnlineTuner, TunerConfig

__all__ = ["Strategy"]


class Strategy:
    """Base class: no hypergradient, no memory (subclasses override what they need).

    Attributes:
        name: the strategy's name (``TunerConfig.mode``'s value for it).
        tunes: whether the strategy moves the hyperparameters (``False``: no hyperparameter optimiser).
        differentiable_rule: whether it differentiates through the update rule (refuses a ``torch.optim`` rule).
    """

    name = "base"
    tunes = True
    differentiable_rule = True

    def default_schedule(self, cfg: TunerConfig) -> Schedule:
        """The schedule of a config that names none: ``Every(cfg.interval)``, cold when ``not cfg.warm_start``.

        Args:
            cfg: the loop's configuration.

        Returns:
            The schedule.
        """
        from ..loop import Every

        return Every(cfg.interval, cold_steps=None if cfg.warm_start else cfg.cold_steps)

    def check(self, tuner: OnlineTuner) -> None:
        """Raise ``ValueError`` when this strategy cannot tune ``tuner`` (called once, at construction).

        Args:
            tuner: the loop being built.
        """

    def remember(self, tuner: OnlineTuner, batch: Any) -> None:
        """Called by each weight step just before the weights move (``tuner.params`` are the old ones).

        Args:
            tuner: the loop.
            batch: the step's training context.
        """

    def reuse(self, tuner: OnlineTuner, batch: Any) -> Any:
        """A ``(gradient, losses)`` pair the weight step may take instead of computing it, else ``None``.

        Args:
            tuner: the loop about to take a weight step.
            batch: its training context.

        Returns:
            ``None`` (see :class:`bilevel.strategies.SharedGradient`).
        """
        return None

    def follow(self, tuner: OnlineTuner, old: Tree) -> None:
        """Called when the loop rebuilt its weights dict from ``old`` (a sync-free freeze of diverged members).

        Args:
            tuner: the loop.
            old: the weights dict before the rebuild.
        """

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """dL_V/dlambda of the tuned raw hyperparameters at the tuner's current state.

        Args:
            tuner: the loop.
            train_batch: the training context of the last weight step.
            val_batch: the validation context.

        Returns:
            ``{raw key: hypergradient}`` for every tuned raw key.

        Raises:
            ValueError: always (this strategy has none).
        """
        raise ValueError(f"strategy {self.name!r} has no hypergradient")

    def hyper_step(self, tuner: OnlineTuner, train_batch: Any, val_batches: Callable[[], Any]) -> Tree | None:
        """The scheduled hyperparameter step: draw a validation context and step along :meth:`hypergradient`.

        Args:
            tuner: the loop.
            train_batch: the training context of the last weight step.
            val_batches: returns the next validation context.

        Returns:
            The hypergradient applied, or ``None``.
        """
        return tuner.hyper_step(train_batch, val_batches())

    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy keeps between steps (plain containers and tensors).

        Returns:
            A dictionary for :meth:`load_state_dict`.
        """
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
