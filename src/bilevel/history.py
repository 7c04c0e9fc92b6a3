"""The loop's record: losses, hyperparameters and divergences per member, as plain data.

:class:`History` is what :meth:`bilevel.tuner.OnlineTuner.run` returns and :meth:`~bilevel.tuner.OnlineTuner.record`
appends to; it converts to and from plain containers, so a checkpoint holding it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["History", "Recording", "append_record"]


@dataclass
class History:
    """Trajectories, one list per member; ``diverged_at[i]`` is the step member i went non-finite.

    ``events`` lists every divergence the loop handled, in order, as plain dicts
    ``{"step": t, "member": i, "what": "training loss" | "weights" | "data" | "hypergradient" | ...,
    "action": "frozen" | "rollback"}`` (a rollback also gives ``"factor"``, the learning rate's or the
    hyperparameter step's new multiplier). :meth:`as_dict` / :meth:`from_dict` convert to and from plain
    containers (a checkpoint that loads with ``torch.load(..., weights_only=True)``).

    Args:
        step: the weight step of each record.
        train_loss: per member, the training loss at each record (``None`` once diverged or non-finite).
        val_loss: per member, the validation loss at each record.
        test_loss: per member, the test loss at each record.
        hparams: per hyperparameter, per member, the mean natural value at each record.
        diverged_at: per member, the step it went non-finite, else ``None``.
        seconds: the wall-clock time spent in :meth:`OnlineTuner.run`.
        events: the divergences the loop handled (see above).
    """

    step: list[int] = field(default_factory=list)
    train_loss: list[list[float | None]] = field(default_factory=list)
    val_loss: list[list[float | None]] = field(default_factory=list)
    test_loss: list[list[float | None]] = field(default_factory=list)
    hparams: dict[str, list[list[float | None]]] = field(default_factory=dict)
    diverged_at: list[int | None] = field(default_factory=list)
    seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The history as plain lists, dicts, numbers and strings (a deep copy)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | History) -> History:
        """Inverse of :meth:`as_dict` (a :class:`History` is copied as it is, for old checkpoints).

        Args:
            d: a dictionary from :meth:`as_dict`, or a :class:`History`.

        Returns:
            A new :class:`History` (a deep copy).
        """
        if isinstance(d, History):
            return copy.deepcopy(d)
        return cls(**copy.deepcopy(dict(d)))


def append_record(store: list[list[float | None]], values: Tensor, alive: Tensor) -> None:
    """Append one value per member to ``store`` (``None`` for a dead member or a non-finite value).

    Args:
        store: one list per member (filled on first use).
        values: shape (P,), the values.
        alive: shape (P,), which members are alive.
    """
    if not store:
        store.extend([] for _ in range(values.shape[0]))
    for i, (v, a) in enumerate(zip(values.tolist(), alive.tolist())):
        store[i].append(v if a and math.isfinite(v) else None)


class Recording:
    """The recording side of :class:`bilevel.tuner.OnlineTuner` (its base class): :meth:`record`, :meth:`describe`
    and the :attr:`history` property, which copies divergences marked on the device into the history."""

    P: int
    t: int
    params: Any
    raw: Any
    alive: Tensor
    sync_free: bool
    _history: History
    _diverged_t: Tensor
    train_loss: Any
    val_loss: Any
    test_loss: Any

    natural: Callable[[Mapping[str, Tensor]], dict[str, Any]]  # the tuner's methods
    callback: Callable[..., None]

    @property
    def history(self) -> History:
        """Trajectories and divergence steps (reading it synchronises with the device once)."""
        h = self._history
        if self.sync_free:
            for i, t in enumerate(self._diverged_t.tolist()):
                if t >= 0 and h.diverged_at[i] is None:
                    h.diverged_at[i] = t
                    h.events.append({"step": t, "member": i, "what": "non-finite value", "action": "frozen"})
        return h

    @history.setter
    def history(self, h: History) -> None:
        """Replace the history.

        Args:
            h: the new history.
        """
        self._history = h

    def record(self, train: Any, val: Any, test: Any | None) -> None:
        """Append the losses at the given batches and the hyperparameters' mean natural values to the history.

        Args:
            train: the training batch, or ``None`` to skip the training loss.
            val: the validation batch, or ``None`` to skip the validation loss.
            test: the test batch, or ``None`` to skip the test loss.
        """
        h = self.history
        h.step.append(self.t)
        with torch.no_grad():
            nat = self.natural({k: v.detach() for k, v in self.raw.items()})
            for fn, batch, store in (
                (self.train_loss, train, h.train_loss),
                (self.val_loss, val, h.val_loss),
                (self.test_loss, test, h.test_loss),
            ):
                if batch is not None:
                    append_record(store, fn(self.params, nat, batch).reshape(self.P), self.alive)
            for name, v in self.describe().items():
                append_record(h.hparams.setdefault(name, []), v, self.alive)
        self.callback("on_record")

    def describe(self) -> dict[str, Tensor]:
        """Per-member mean natural value of every hyperparameter, shape (P,)."""
        with torch.no_grad():
            nat = self.natural(self.raw)
        out = {}
        for name, v in nat.items():
            vals = [v] if isinstance(v, Tensor) else list(v.values())
            flat = torch.cat([t.detach().reshape(self.P, -1).to(torch.float64) for t in vals], dim=1)
            out[name] = flat.mean(dim=1)
        return out
