"""A trial's side of Ray Tune: its reports and checkpoints (plain ``state.pt``, ``result.json``), its id and name."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...rundir import atomic_save, load_torch_state
from .extras import require

if TYPE_CHECKING:
    from ray.tune import Result

__all__ = ["report", "restored_state", "checkpoint_result"]


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> None:
    """``tune.report`` with, optionally, a checkpoint holding ``state`` (torch) and ``result`` (JSON).

    Args:
        metrics: the metrics reported.
        state: the run's state (plain data, :func:`bilevel.rundir.atomic_save`).
        result: the run's final results.

    Raises:
        TypeError: ``state`` holds something that is not plain data.
    """
    tune = require("ray.tune")
    if state is None and result is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if state is not None:
            atomic_save(state, Path(d) / "state.pt")  # plain data only: read back with weights_only=True
        if result is not None:
            (Path(d) / "result.json").write_text(json.dumps(result))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def restored_state() -> dict[str, Any] | None:
    """The ``state`` of the checkpoint this trial (re)starts from.

    Returns:
        The state (read with ``torch.load(weights_only=True)``; a damaged or refused file is set aside and the
        trial starts again), or ``None`` on a fresh start.
    """
    ckpt = require("ray.tune").get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_torch_state(Path(d) / "state.pt", "the trial starts again from step 0")


def checkpoint_result(result: Result) -> dict[str, Any]:
    """The ``result.json`` stored in a finished trial's last checkpoint.

    Args:
        result: the trial's Ray Tune ``Result``.

    Returns:
        The block's results.

    Raises:
        RuntimeError: the trial has no checkpoint or did not finish.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"trial {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        f = Path(d) / "result.json"
        if not f.exists():
            raise RuntimeError(
                f"trial {result.path} has not finished (its last checkpoint, at step "
                f"{(result.metrics or {}).get('step')}, holds no result.json); run the same command "
                "again to resume it"
            )
        return json.loads(f.read_text())


def _named(f: Callable, factory: Callable, default: str) -> Callable:
    """Name the trainable after its factory (Ray Tune's ``Tuner.restore`` checks the trainable's name)."""
    f.__name__ = f.__qualname__ = getattr(factory, "__name__", default)
    return f


def _trial_id() -> str | None:
    try:
        return require("ray.tune").get_context().get_trial_id()
    except Exception:  # pragma: no cover - outside a Tune session
        return None
