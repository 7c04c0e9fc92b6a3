"""What the factories build: the protocols of the runs the trials drive, and a per-worker cache for them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["DIVERGED", "Rescalable", "BlockRun", "ScheduledRun", "worker_cached"]


#: Reported as the loss of a diverged trial so that schedulers rank it last
#: (a finite number: Ray Tune's schedulers sort metrics and NaN breaks sorting).
DIVERGED = 1e30


class Rescalable(Protocol):
    """Anything whose hyperparameters PBT's ratio mutation rescales (:func:`apply_pbt_mutation`)."""

    def rescale(self, name: str, factor: float) -> None:
        """Multiply the current value of hyperparameter ``name`` by ``factor``.

        Args:
            name: the hyperparameter.
            factor: the ratio.
        """


class BlockRun(Protocol):
    """A block of population members in training, as :func:`run_population` drives it."""

    @property
    def step(self) -> int:
        """Training steps done."""

    def advance(self, steps: int) -> None:
        """Train ``steps`` more steps.

        Args:
            steps: how many.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``.

        Returns:
            Plain data only (:func:`bilevel.rundir.check_plain`).
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """

    def result(self) -> dict[str, Any]:
        """The block's results once trained.

        Returns:
            JSON-serialisable results, per-member lists (see :func:`merge_blocks`).
        """


class ScheduledRun(Protocol):
    """One trial's run under ASHA or PBT, as :func:`run_scheduled` drives it."""

    @property
    def step(self) -> int:
        """Training steps done."""

    @property
    def alive(self) -> bool:
        """False once the run diverged (its losses are then reported as :data:`DIVERGED`)."""

    def advance(self, steps: int) -> None:
        """Train ``steps`` more steps.

        Args:
            steps: how many.
        """

    def losses(self) -> dict[str, float]:
        """The losses to report.

        Returns:
            Metric name -> value (e.g. ``val_loss`` and ``test_loss``).
        """

    def hparams(self) -> dict[str, float]:
        """The run's current hyperparameters.

        Returns:
            Name -> natural value.
        """

    def rescale(self, name: str, factor: float) -> None:
        """Multiply the current value of hyperparameter ``name`` by ``factor`` (PBT's ratio mutation).

        Args:
            name: the hyperparameter.
            factor: the ratio new / old.
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain data, as :meth:`BlockRun.state_dict`).

        Returns:
            The state.
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
        """


_WORKER_CACHE: dict[str, Any] = {}


def worker_cached(key: str, make: Callable[[], Any]) -> Any:
    """``make()`` once per process for each ``key`` (Ray Tune reuses worker processes across trials).

    Args:
        key: what identifies the value (e.g. the data set and its options).
        make: builds it.

    Returns:
        The cached value.
    """
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]
