"""The online loop's settings: :class:`TunerConfig` (Clarke et al. 2022's defaults, sec. 4).

The strategy (*how*: :mod:`bilevel.strategies`) and the schedule (*when*: :mod:`bilevel.loop`) may be passed
to :class:`bilevel.tuner.OnlineTuner` as objects; without them ``mode``, ``solver``, ``implicit``,
``share_gradient``, ``interval``, ``warm_start`` and ``cold_steps`` here name them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .solvers import Solver

__all__ = ["TunerConfig", "MODES", "check_arguments"]

#: the strategies ``mode`` names (:func:`bilevel.strategies.from_config`)
MODES = ("ift", "unroll", "baydin", "none")


@dataclass
class TunerConfig:
    """Meta-hyperparameters of the online loop (defaults: Clarke et al. 2022, sec. 4: T = 10, i = 5, Adam 0.05).

    Args:
        tuned: the names of the tuned hyperparameters (the others stay fixed).
        interval: T, weight steps between hyperparameter steps.
        lookback: i, Neumann steps of the default solver (IFT) or unrolled steps (Diff-through-Opt).
        mode: ``"ift"``, ``"unroll"``, ``"baydin"`` or ``"none"`` (see the module docstring).
        solver: the IFT solver; ``None``: ``Neumann(lookback, alpha=1)``.
        hyper_lr: the learning rate of the hyperparameter optimiser (> 0).
        hyper_optimizer: the hyperparameter optimiser's class, called as ``hyper_optimizer(raw, lr=hyper_lr)``.
        warm_start: continue from the current weights (``True``) or re-train from the initial ones before each
            hypergradient (Vicol et al.'s cold start).
        cold_steps: weight steps of each cold-start re-training.
        record_every: weight steps between two records of :meth:`OnlineTuner.run`'s ``record_batches``.
        grad_clip: clip each member's training-gradient norm to this, or ``None``.
        implicit: the fixed point the IFT differentiates: ``"update"`` or ``"loss"`` (see the comment below).
        on_divergence: ``"record"``, ``"raise"`` or ``"rollback"`` (see the comment below); ``None`` (the
            default, for every door): ``"raise"`` for one model, ``"record"`` for a stacked population.
        rollback_factor: the multiplier of a rolled-back member's learning rate or hyperparameter step, in (0, 1).
        rollback_spike: a training loss above this many times the lowest seen is not a good state (>= 1).
        max_rollbacks: rollbacks of a member before it is frozen (>= 1).
        share_gradient: reuse a hyperparameter step's training gradient in the next weight step
            (:class:`SharedGradient`).
    """

    tuned: Sequence[str] = ("lr", "weight_decay", "momentum")
    interval: int = 10  # T: weight steps between hyperparameter steps
    lookback: int = 5  # i: Neumann steps of the default solver (IFT) or unrolled steps (Diff-through-Opt)
    mode: Literal["ift", "unroll", "baydin", "none"] = "ift"
    solver: Solver | None = None  # default Neumann(lookback, alpha=1)
    hyper_lr: float = 0.05
    hyper_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam
    warm_start: bool = True
    cold_steps: int = 100
    record_every: int = 10
    grad_clip: float | None = None  # clip each member's training-gradient norm (Clarke et al. on PTB: 0.25)
    # "update": IFT on the update map u(lambda, w) = 0 (Clarke et al. eq. 4-7, J = du/dw); "loss": IFT on
    # dL_T/dw = 0 with J the Hessian of training loss + penalty (Lorraine et al. 2020 Alg. 2-3), whatever
    # rule steps the weights (e.g. Adam); "loss" needs every tuned hyperparameter to be loss-form
    implicit: Literal["update", "loss"] = "update"
    # "record": diverged members are recorded (``History.events``) and frozen at their initial weights;
    # "raise": the first non-finite value raises NonFiniteError naming it, with the weights, optimiser state and
    # hyperparameters left at their last finite values; "rollback": a member whose weight step goes non-finite
    # is put back to its last good state (the last weights whose training loss was finite and at most
    # ``rollback_spike`` times the lowest it has seen) and its learning rate is multiplied by ``rollback_factor``
    # (a non-finite hypergradient: the hyperparameter step is skipped and that member's hyperparameter steps
    # are scaled by ``rollback_factor``), recorded in ``History.events``; after ``max_rollbacks`` a member is
    # recorded and frozen as in "record" (one model: raises)
    on_divergence: Literal["record", "raise", "rollback"] | None = None
    rollback_factor: float = 0.5
    rollback_spike: float = 10.0
    max_rollbacks: int = 30
    # opt-in speed-up: reuse a hyperparameter step's training gradient in the next weight step when the checks
    # of SharedGradient pass (exact only when the training loss is a pure function of the weights and the
    # batch tensors: see SharedGradient for the conditions the checks cannot see)
    share_gradient: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {list(MODES)}")
        if self.implicit not in ("update", "loss"):
            raise ValueError(f"implicit must be 'update' or 'loss', got {self.implicit!r}")
        if self.on_divergence not in (None, "record", "raise", "rollback"):
            raise ValueError(f"on_divergence must be 'record', 'raise' or 'rollback', got {self.on_divergence!r}")
        if not 0 < self.rollback_factor < 1:
            raise ValueError(f"rollback_factor must lie in (0, 1), got {self.rollback_factor}")
        if not self.rollback_spike >= 1:
            raise ValueError(f"rollback_spike must be >= 1, got {self.rollback_spike}")
        if int(self.max_rollbacks) < 1:
            raise ValueError(f"max_rollbacks must be >= 1, got {self.max_rollbacks}")
        for name in ("interval", "record_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lookback < (1 if self.mode == "unroll" else 0):
            raise ValueError(
                f"lookback must be >= {1 if self.mode == 'unroll' else 0} in mode {self.mode!r}, got {self.lookback}"
            )
        if self.cold_steps < 0:
            raise ValueError(f"cold_steps must be >= 0, got {self.cold_steps}")
        if not (self.hyper_lr > 0 and math.isfinite(self.hyper_lr)):
            raise ValueError(f"hyper_lr must be a positive finite number, got {self.hyper_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


def check_arguments(
    cfg: TunerConfig, names: Sequence[str], update_form: Sequence[str], rule: Any, penalty: Any
) -> None:
    """Raise ``ValueError`` when the tuned or update-form names do not fit the space, the rule and the penalty.

    Args:
        cfg: the loop's settings.
        names: the hyperparameters of the space.
        update_form: the hyperparameters passed to the rule.
        rule: the update rule.
        penalty: the loss-form penalty, or ``None``.
    """
    unknown = [n for n in list(cfg.tuned) + list(update_form) if n not in names]
    if unknown:
        raise ValueError(f"hyperparameters {unknown} are not in the space {names}")
    not_rule = [n for n in update_form if n not in rule.hyperparameters]
    if not_rule:
        raise ValueError(
            f"update-form hyperparameters {not_rule} are not hyperparameters of "
            f"{type(rule).__name__} ({list(rule.hyperparameters)})"
        )
    undeclared = [n for n in cfg.tuned if n in rule.hyperparameters and n not in update_form]
    if undeclared and penalty is None:
        raise ValueError(
            f"tuned hyperparameters {undeclared} are hyperparameters of {type(rule).__name__} but not "
            "declared update-form (update_form=...): the rule would never see them"
        )
