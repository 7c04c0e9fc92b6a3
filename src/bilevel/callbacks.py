"""Callbacks of the online loop: things that happen around Algorithm 1 without being part of it.

An :class:`~bilevel.tuner.OnlineTuner` calls, on each of its callbacks that defines them,
``on_weight_step(tuner)`` after every weight step, ``on_interval(tuner)`` at every T-step
boundary (before the hyperparameter step) and ``on_record(tuner)`` after every history record.
A callback with state defines ``state_dict()`` / ``load_state_dict(sd)``; the tuner's
checkpoint holds it, so a resumed run continues the same random stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RandomLRMultiplier", "EveryStep"]


class RandomLRMultiplier:
    """Clarke et al. (2022, sec. 4) "Random (x LR)": every T steps, ``lr <- lr * U[low, high]`` per member.

    The factors are drawn in float64 from a generator seeded with ``seed`` and applied by
    :meth:`bilevel.tuner.OnlineTuner.rescale`.
    """

    def __init__(self, low: float, high: float, seed: int = 0, name: str = "lr") -> None:
        if not 0 < low <= high:
            raise ValueError(f"RandomLRMultiplier needs 0 < low <= high, got ({low}, {high})")
        self.low, self.high, self.name = float(low), float(high), name
        self.generator = torch.Generator().manual_seed(seed)

    def on_interval(self, tuner: Any) -> None:
        f = self.low + (self.high - self.low) * torch.rand(tuner.P, generator=self.generator, dtype=torch.float64)
        tuner.rescale(self.name, f)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.set_state(sd["generator"])


class EveryStep:
    """Call ``fn(tuner)`` after every weight step (a progress bar, a logger, committing module buffers)."""

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self.fn = fn

    def on_weight_step(self, tuner: Any) -> None:
        self.fn(tuner)
