"""No tuning: the loop's weight steps with the hyperparameters fixed (``mode="none"``; the untuned baseline)."""

from __future__ import annotations

from .base import Strategy

__all__ = ["NoTuning"]


class NoTuning(Strategy):
    """Hyperparameters fixed: the weight steps of the loop and nothing else (any update rule, even ``torch.optim``)."""

    name = "none"
    tunes = False
    differentiable_rule = False
