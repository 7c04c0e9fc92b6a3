"""Running the ``clarke`` experiment into a run directory: every method, resumable, and ``results.json``.

Resumable: every method's population is checkpointed every ``checkpoint_every`` steps
(``checkpoints/METHOD.pt``: the whole loop state, batch samplers included, as plain data read back with
``torch.load(weights_only=True)``, :mod:`bilevel.rundir`) and a finished method is kept in
``methods/METHOD.json``; re-running the same command continues from there and gives the same numbers as
an uninterrupted run (see "Runs, interruptions and resume" in docs/design.md). ``--backend ray`` trains
the methods as Ray Tune trials (:mod:`bilevel_studies.clarke.search`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bilevel import data as D
from bilevel.rundir import (
    atomic_save,
    atomic_write_json,
    check_run_config,
    load_torch_state,
    read_json_state,
    save_run_config,
)

from . import search
from .config import RESUME_FREE, ClarkeConfig, validate_config
from .methods import AUTHORS_BAYDIN, method_results, start_method, three_batched
from .problem import Problem, load_problem


def run_method(
    cfg: ClarkeConfig,
    problem: Problem,
    name: str,
    ckpt: Path | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    first: int = 0,
) -> dict[str, Any]:
    """Train the population for one method (resuming from ``ckpt`` if it exists); return its results."""
    if cfg.checkpoint_every < 1 or cfg.steps < 1:
        raise ValueError(f"checkpoint_every and steps must be >= 1, got {cfg.checkpoint_every} and {cfg.steps}")
    run = start_method(cfg, problem, name, first=first)
    tuner = run.tuner
    state = load_torch_state(ckpt, f"{name} starts again from step 0") if ckpt is not None else None
    if state is not None:
        run.load_state_dict(state)
        if progress is not None:
            progress(tuner.t)
    while tuner.t < cfg.steps:
        run.advance(min(cfg.checkpoint_every, cfg.steps - tuner.t), progress)
        if ckpt is not None:
            atomic_save(run.state_dict(), ckpt)
    return method_results(cfg, problem, run)


def run_experiment(
    cfg: ClarkeConfig,
    out: Path,
    progress_factory=None,
    *,
    backend: str = "local",
    address: str | None = None,
    ray_cpus: int | None = None,
    block_size: int | None = None,
) -> dict[str, Any]:
    """Run every method of ``cfg`` into ``out`` (resumable) and write ``out/results.json``.

    ``backend="ray"`` trains the methods still to do as Ray Tune trials of ``block_size``
    initialisations each (:func:`bilevel_studies.clarke.search.run_clarke`; a local Ray instance with
    ``ray_cpus`` CPUs, or the cluster at ``address``); the results are the same per initialisation
    and land in the same files.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}: use 'local' or 'ray'")
    out = Path(out)
    methods = validate_config(cfg)
    cfg_dict = asdict(cfg)
    cfg_dict["methods"] = methods
    # a key added since the run started has its default; nothing is written before the data are loaded
    check_run_config(out, cfg_dict, free=RESUME_FREE, defaults=asdict(ClarkeConfig(dataset=cfg.dataset)), save=False)
    problem = load_problem(cfg)
    save_run_config(out, cfg_dict)
    (out / "methods").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    _migrate_baydin(out)
    results: dict[str, Any] = {}
    needed = [m for m in methods if m != "random-3batched"]
    if "random-3batched" in methods and "random" not in needed:
        needed.insert(0, "random")
    if backend == "ray":
        todo = [m for m in needed if _finished(out / "methods" / f"{m}.json") is None]
        for name, res in search.run_clarke(
            cfg, todo, out, address=address, num_cpus=ray_cpus, block_size=block_size, progress_factory=progress_factory
        ).items():
            atomic_write_json(out / "methods" / f"{name}.json", res)
    for name in needed:
        done = out / "methods" / f"{name}.json"
        finished = _finished(done)
        if finished is not None:
            results[name] = finished
            continue
        progress = progress_factory(name, cfg.steps) if progress_factory else None
        res = run_method(cfg, problem, name, out / "checkpoints" / f"{name}.pt", progress)
        atomic_write_json(done, res)
        (out / "checkpoints" / f"{name}.pt").unlink(missing_ok=True)
        results[name] = res
    if "random-3batched" in methods:
        results["random-3batched"] = three_batched(results["random"])
    ordered = {m: results[m] for m in methods if m in results}
    doc = {
        "experiment": "clarke",
        "dataset": D.dataset_name(cfg.dataset),
        "config": cfg_dict,
        "test_loss": "MSE in original target units" if problem.kind == "regression" else "cross-entropy",
        "methods": ordered,
    }
    atomic_write_json(out / "results.json", doc, indent=None, allow_nan=False, default=nan_to_none)
    return doc


def _migrate_baydin(out: Path) -> None:
    """Files of method ``baydin`` written when ``baydin`` was what is now ``baydin-ours`` become ``baydin-ours``'s.

    ``methods/baydin.json`` / ``checkpoints/baydin.pt`` without ``variant == "authors"`` are renamed to
    ``baydin-ours.json`` / ``baydin-ours.pt`` (same configuration, same code, so the same numbers), unless
    ``baydin-ours`` has its own already (then they are set aside as ``NAME.earlier-baydin``), with a warning.
    """
    for folder, ext in (("methods", "json"), ("checkpoints", "pt")):
        path = out / folder / f"baydin.{ext}"
        if not path.exists():
            continue
        try:
            doc = (
                json.loads(path.read_text())
                if ext == "json"
                else torch.load(path, weights_only=True, map_location="cpu")
            )
        except Exception:  # unreadable: left for the usual set-aside of damaged files
            continue
        if not isinstance(doc, dict) or doc.get("variant") == AUTHORS_BAYDIN:
            continue
        target = out / folder / f"baydin-ours.{ext}"
        if target.exists():
            target = path.with_name(path.name + ".earlier-baydin")
        path.replace(target)
        warnings.warn(
            f"{path} was written by the earlier 'baydin' (now method 'baydin-ours'); moved to {target.name}; "
            "'baydin' is now Clarke et al.'s Baydin baseline",
            stacklevel=2,
        )


def _finished(path: Path) -> dict[str, Any] | None:
    """A finished method's results (``methods/NAME.json``), or ``None``: absent, or damaged (then set aside
    with a warning, and the method is trained again from its checkpoint, if any)."""
    return read_json_state(
        path, f"{path.stem} is trained again", check=lambda d: isinstance(d, dict) and "final_test_loss" in d
    )


def nan_to_none(x: Any) -> Any:
    """``json.dumps``'s ``default=``: a non-finite float (a diverged run's loss) is written as ``null``.

    Args:
        x: a value ``json`` cannot write.

    Returns:
        ``None`` for a non-finite float.

    Raises:
        TypeError: anything else (as ``json`` would).
    """
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x).__name__)
