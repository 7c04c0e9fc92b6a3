"""Diff-through-Opt: the exact hypergradient through the last ``lookback`` weight steps (``mode="unroll"``).

    dL_V(w_t)/dlambda  with  w_{s+1} = w_s - u(lambda, w_s; c_s),  s = t - i, ..., t - 1,

each step replayed from its stored weights, optimiser state and context (Maclaurin et al. 2015; the
truncated form of Shaban et al. 2019; Clarke et al. 2022's Diff-through-Opt baseline).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import tree as _T
from ..tree import Tree
from ..unroll import replay_hypergradient
from .base import Strategy

if TYPE_CHECKING:
    from ..tuner import OnlineTuner

__all__ = ["Unrolled"]


class Unrolled(Strategy):
    """Differentiate through the last ``lookback`` weight steps (``None``: the tuner config's ``lookback``).

    Args:
        lookback: i, the number of weight steps kept and differentiated through (>= 1), or ``None``.
    """

    name = "unroll"

    def __init__(self, lookback: int | None = None) -> None:
        if lookback is not None and lookback < 1:
            raise ValueError(f"lookback must be >= 1 to unroll, got {lookback}")
        self.lookback = lookback
        self.window: list[tuple[Tree, Any, Any]] = []  # (w, optimiser state, context) of the last i steps

    def check(self, tuner: OnlineTuner) -> None:
        """Take the config's ``lookback`` when none was given."""
        if self.lookback is None:
            self.lookback = tuner.cfg.lookback

    def remember(self, tuner: OnlineTuner, batch: Any) -> None:
        """Keep ``(w_s, state_s, c_s)`` of the step about to be taken (the last ``lookback`` only)."""
        self.window = (self.window + [(_T.detach(tuner.params), tuner.state, batch)])[-int(self.lookback or 1) :]

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """dL_V/dlambda through the remembered steps (see the module docstring)."""
        tuned, fixed = tuner.split()

        def outer(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
            return tuner.val_loss(p, tuner.natural({**fixed, **h}), val_batch).sum()

        check = tuner.cfg.on_divergence == "raise"
        return replay_hypergradient(outer, tuner.step_map, self.window, tuned, fixed, check=check)

    def state_dict(self) -> dict[str, Any]:
        """The remembered steps."""
        return {"window": self.window}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.window = list(sd.get("window", []))
