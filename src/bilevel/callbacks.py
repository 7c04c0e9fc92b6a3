"""Callbacks of the online loop: things that happen around Algorithm 1 without being part of it.

An :class:`~bilevel.tuner.OnlineTuner` calls, on each of its callbacks that defines them,
``on_weight_step(tuner)`` after every weight step, ``on_interval(tuner)`` at every T-step
boundary (before the hyperparameter step) and ``on_record(tuner)`` after every history record.
A callback with state defines ``state_dict()`` / ``load_state_dict(sd)``; the tuner's
checkpoint holds it, so a resumed run continues the same random stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RandomLRMultiplier", "EveryStep", "TensorBoardLogger", "autolog", "default_callbacks"]


class RandomLRMultiplier:
    """Clarke et al. (2022, sec. 4) "Random (x LR)": every T steps, ``lr <- lr * U[low, high]`` per member.

    The factors are drawn in float64 from a generator seeded with ``seed`` and applied by
    :meth:`bilevel.tuner.OnlineTuner.rescale`.

    Args:
        low: the smallest factor (> 0).
        high: the largest factor (>= ``low``).
        seed: the seed of the generator the factors are drawn from.
        name: the hyperparameter to rescale (default the learning rate ``"lr"``).

    Raises:
        ValueError: unless ``0 < low <= high``.
    """

    def __init__(self, low: float, high: float, seed: int = 0, name: str = "lr") -> None:
        if not 0 < low <= high:
            raise ValueError(f"RandomLRMultiplier needs 0 < low <= high, got ({low}, {high})")
        self.low, self.high, self.name = float(low), float(high), name
        self.generator = torch.Generator().manual_seed(seed)

    def on_interval(self, tuner: Any) -> None:
        """Draw one factor per member and rescale the hyperparameter ``name`` by it.

        Args:
            tuner: the :class:`~bilevel.tuner.OnlineTuner` at a T-step boundary.
        """
        f = self.low + (self.high - self.low) * torch.rand(tuner.P, generator=self.generator, dtype=torch.float64)
        tuner.rescale(self.name, f)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, so a resumed run draws the same factors.

        Returns:
            ``{"generator": <the generator's state>}``.
        """
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the generator's state.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.generator.set_state(sd["generator"])


class EveryStep:
    """Call ``fn(tuner)`` after every weight step (a progress bar, a logger, committing module buffers).

    Args:
        fn: called with the tuner after every weight step.
    """

    def __init__(self, fn: Callable[[Any], None]) -> None:
        self.fn = fn

    def on_weight_step(self, tuner: Any) -> None:
        """Call ``fn(tuner)``.

        Args:
            tuner: the :class:`~bilevel.tuner.OnlineTuner` that has just taken a weight step.
        """
        self.fn(tuner)


class TensorBoardLogger:
    """Live curves in TensorBoard: losses and every hyperparameter of the loop, written as event files.

    Every ``every`` weight steps it writes the training loss of the step just taken, and at every
    record of the loop (:meth:`bilevel.tuner.OnlineTuner.record`) its training / validation / test
    losses, plus each hyperparameter's mean natural value; with :class:`bilevel.Tuner` (which records
    per epoch) the epoch's mean training loss and whole-validation-set loss
    (``Tuner(..., callbacks=[TensorBoardLogger("runs/tb")])``). For a population (P > 1) each quantity is
    written as its median and its 25 % / 75 % quantiles over the members that have not diverged,
    plus the values of the first ``members`` members. Needs the optional ``tensorboard`` package
    (``pip install "bilevel[tensorboard]"``); view with ``tensorboard --logdir LOG_DIR``.

    Args:
        log_dir: the folder the event files are written to.
        every: write the step's training loss every ``every`` weight steps (>= 1).
        members: how many members (the first ones) are also written one by one (>= 0).

    Raises:
        ImportError: when the ``tensorboard`` package is not installed.
        ValueError: when ``every < 1`` or ``members < 0``.
    """

    def __init__(self, log_dir: str, every: int = 10, members: int = 3) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from exc
        if every < 1 or members < 0:
            raise ValueError(
                f"TensorBoardLogger needs every >= 1 and members >= 0, got every={every}, members={members}"
            )
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.every, self.members = every, members

    def _scalars(self, tag: str, values: Any, alive: Any, step: int) -> None:
        vals = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        ok = vals[torch.as_tensor(alive).reshape(-1).cpu() & torch.isfinite(vals)]
        if vals.numel() == 1:
            if ok.numel():
                self.writer.add_scalar(tag, float(ok[0]), step)
            return
        if ok.numel():
            q = torch.quantile(ok, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            self.writer.add_scalars(tag, {"q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}, step)
        for i in range(min(self.members, vals.numel())):
            if torch.isfinite(vals[i]):
                self.writer.add_scalar(f"{tag}/member_{i}", float(vals[i]), step)

    def on_weight_step(self, tuner: Any) -> None:
        """Write the training loss of the step just taken, every ``every`` steps.

        Args:
            tuner: the :class:`~bilevel.tuner.OnlineTuner` that has just taken a weight step.
        """
        if tuner.t % self.every == 0 and getattr(tuner, "last_losses", None) is not None:
            self._scalars("loss/train_step", tuner.last_losses.detach().cpu(), tuner.alive.cpu(), tuner.t)

    def on_record(self, tuner: Any) -> None:
        """Write the losses of the record just made and each hyperparameter's mean natural value.

        Args:
            tuner: the :class:`~bilevel.tuner.OnlineTuner` that has just recorded its history.
        """
        h = tuner.history
        for name, store in (("train", h.train_loss), ("val", h.val_loss), ("test", h.test_loss)):
            if store and store[0] and len(h.step) == len(store[0]):
                vals = [m[-1] if m[-1] is not None else float("nan") for m in store]
                self._scalars(f"loss/{name}", vals, tuner.alive.cpu(), tuner.t)
        for name, v in tuner.describe().items():
            self._scalars(f"hparam/{name}", v.cpu(), tuner.alive.cpu(), tuner.t)
        self.writer.flush()

    def on_epoch(self, tuner: Any, losses: dict[str, Any]) -> None:
        """Per-epoch losses of every member (from :class:`bilevel.Tuner`: mean training loss, whole validation set).

        Args:
            tuner: the online loop of the :class:`bilevel.Tuner` at the end of an epoch.
            losses: the epoch's losses by name (``"train"``, ``"val"``), each a tensor of shape ``(P,)``.
        """
        for name, values in losses.items():
            self._scalars(f"loss/{name}_epoch", values.detach().cpu(), tuner.alive.cpu(), tuner.t)
        for name, v in tuner.describe().items():
            self._scalars(f"hparam/{name}", v.cpu(), tuner.alive.cpu(), tuner.t)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event files."""
        self.writer.close()


@dataclass
class _Autolog:
    dir: str
    every: int
    members: int
    count: int = 0
    loggers: list[TensorBoardLogger] = field(default_factory=list)


_AUTOLOG: list[_Autolog] = []


@contextlib.contextmanager
def autolog(log_dir: str | os.PathLike, every: int = 10, members: int = 3) -> Iterator[None]:
    """Every online loop created inside the ``with`` block logs to TensorBoard (like ``mlflow.autolog``).

    Loop k (in creation order) writes to ``log_dir/loop-k`` through a :class:`TensorBoardLogger`;
    ``bilevel run STUDY --tensorboard DIR`` runs the study inside ``autolog(DIR)``.

    Args:
        log_dir: the folder that receives one ``loop-k`` subfolder per online loop.
        every: as :class:`TensorBoardLogger`'s ``every``: weight steps between two training-loss points.
        members: as :class:`TensorBoardLogger`'s ``members``: members also written one by one.

    Yields:
        Nothing; the loggers are closed when the block ends.
    """
    entry = _Autolog(os.fspath(log_dir), every, members)
    _AUTOLOG.append(entry)
    try:
        yield
    finally:
        _AUTOLOG.remove(entry)
        for logger in entry.loggers:
            logger.close()


def default_callbacks() -> list[Any]:
    """The callbacks an :class:`~bilevel.tuner.OnlineTuner` adds to its own (those of an active :func:`autolog`)."""
    if not _AUTOLOG:
        return []
    entry = _AUTOLOG[-1]
    logger = TensorBoardLogger(os.path.join(entry.dir, f"loop-{entry.count}"), entry.every, entry.members)
    entry.count += 1
    entry.loggers.append(logger)
    return [logger]
