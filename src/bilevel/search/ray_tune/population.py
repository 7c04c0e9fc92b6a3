"""A population as Ray Tune trials, one per block of members: :func:`run_population` and its trainable."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .blocking import blocks, member_blocks
from .experiment import _config, _results, fit, ray_session
from .extras import require
from .runs import BlockRun
from .trial import _named, checkpoint_result

__all__ = ["population_trainable", "run_population"]


def population_trainable(
    factory: Callable[[dict[str, Any]], BlockRun], steps: int, checkpoint_every: int
) -> Callable[[dict[str, Any]], None]:
    """Ray Tune trainable: the block run ``factory(config)`` trained to ``steps``, checkpointed every
    ``checkpoint_every`` steps; its last checkpoint holds ``run.result()`` (:func:`checkpoint_result`).

    Args:
        factory: builds the block's :class:`BlockRun` from the trial's config (a module-level function).
        steps: the training steps.
        checkpoint_every: steps between checkpoints.

    Returns:
        The trainable (named after ``factory``).
    """

    def population_trial(config: dict[str, Any]) -> None:
        # read from the package when the trial runs, so that replacing them there (as the tests do) reaches it
        from . import report, restored_state

        torch.set_num_threads(int(config.get("threads", 1)))
        run = factory(config)
        state = restored_state()
        if state is not None:
            run.load_state_dict(state)
        while True:
            run.advance(min(checkpoint_every, steps - run.step))
            done = run.step >= steps
            result = run.result() if done else None
            report({"step": run.step, "done": done}, run.state_dict(), result)
            if done:
                return

    return _named(population_trial, factory, "population_trial")


def run_population(
    factory: Callable[[dict[str, Any]], BlockRun],
    n: int,
    path: Path,
    *,
    steps: int,
    checkpoint_every: int,
    config: Mapping[str, Any] | None = None,
    tag: Mapping[str, Any] | None = None,
    block_size: int | None = None,
    threads: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    progress_factory: Callable[[str, int], Callable[..., None]] | None = None,
    label: str = "ray",
) -> list[dict[str, Any]]:
    """Train a population of ``n`` members as Ray Tune trials, one per block; return the blocks' results.

    Each trial's config is ``{"job": {**tag, "first": f, "count": c}, **config, "threads": threads}``
    (members ``f .. f + c - 1``); ``factory(config)`` builds its :class:`BlockRun`, which must give
    those members exactly what they would get in one population (e.g. seeds by member index). The
    experiment is restored on re-run (only trials whose job matches ``tag`` are read from it).

    Args:
        factory: builds a block's run (a module-level function, pickled by reference).
        n: the population size.
        path: the experiment's folder.
        steps: training steps per member.
        checkpoint_every: steps between checkpoints.
        config: added to every trial's config.
        tag: added to every trial's job (e.g. the method), selecting its trials on restore.
        block_size: members per trial (default: the population split evenly over the cluster's CPUs).
        threads: torch threads per trial.
        address: a Ray cluster to join (default: a local instance).
        num_cpus: CPUs of the local instance.
        progress_factory: ``(label, total) -> advance``, a progress bar over the trials.
        label: the progress bar's label.

    Returns:
        The results (``run.result()`` of each block) in member order, ready for :func:`merge_blocks`.

    Raises:
        Interrupted: a ``KeyboardInterrupt``, if Ray Tune stopped with unfinished trials (Ctrl-C).
    """
    tune = require("ray.tune")
    tag = dict(tag or {})
    with ray_session(address, num_cpus) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        size = block_size or max(1, math.ceil(n / max(1, cpus // max(1, threads))))
        jobs = [{**tag, "first": f, "count": c} for f, c in blocks(n, size)]
        advance = progress_factory(label, len(jobs)) if progress_factory else None
        grid = fit(
            population_trainable(factory, steps, checkpoint_every),
            {"job": tune.grid_search(jobs), **(config or {}), "threads": threads},
            path,
            cpus_per_trial=threads,
            keep_checkpoints=1,
            on_complete=advance,
        )
        mine = [r for r in _results(grid) if all(_config(r)["job"].get(k) == v for k, v in tag.items())]
        try:
            member_blocks([_config(r)["job"] for r in mine], n)
        except ValueError as e:
            raise ValueError(f"{path}: {e}; delete that folder to train it afresh") from None
        parts = sorted(((int(_config(r)["job"]["first"]), checkpoint_result(r)) for r in mine), key=lambda x: x[0])
    return [res for _, res in parts]
