"""One-call report: table to the terminal, ``table.md`` and every figure the data allow."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..rundir import atomic_write_text
from .figures import initial_hparams, plot_cdf, plot_landscape, plot_lr_trajectories, plot_median_curves
from .tables import _title, markdown_table, print_table

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["CLARKE_LAYOUT", "load_results", "write_report"]

#: experiments whose results.json has Clarke et al.'s layout (``methods.<name>.final_test_loss`` per
#: initialisation, optional ``curves`` / ``hparams``): bootstrap table and figures
CLARKE_LAYOUT = ("clarke", "bayesopt", "asha-pbt")
#: experiments whose table is not under ``metrics``
TABLE_KEY = {"sensitivity": "median_final_test_loss"}


def load_results(results_or_path: dict | str | os.PathLike[str]) -> dict:
    """A results dict, or one read from a ``results.json`` path (``NaN`` and ``null`` allowed).

    Args:
        results_or_path: the dict itself, or the path of its JSON file.

    Returns:
        The results dict.
    """
    if isinstance(results_or_path, dict):
        return results_or_path
    try:
        with open(results_or_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{results_or_path} is not valid JSON ({e})") from None


def _clarke_layout(results: Mapping[str, Any]) -> bool:
    methods = results.get("methods")
    return (
        isinstance(methods, Mapping)
        and bool(methods)
        and all(isinstance(m, Mapping) and "final_test_loss" in m for m in methods.values())
    )


def _kind(results: Any, where: str) -> str:
    """``"clarke"`` or ``"metrics"``; a ``ValueError`` naming what is wrong with anything else."""
    if not isinstance(results, Mapping):
        raise ValueError(f"{where}: a results file must hold a JSON object, not {type(results).__name__}")
    exp = results.get("experiment")
    if exp is None:
        if _clarke_layout(results):  # older Clarke-style files without the field
            return "clarke"
        raise ValueError(f"{where}: no 'experiment' field, so it is not a results.json written by `bilevel run`")
    if not isinstance(exp, str):
        raise ValueError(f"{where}: 'experiment' must be a string, got {exp!r}")
    if exp in CLARKE_LAYOUT:
        if not isinstance(results.get("methods"), Mapping):
            raise ValueError(
                f"{where}: experiment {exp!r} needs a 'methods' mapping (one entry per method with "
                f"its 'final_test_loss' list), which this file lacks"
            )
        return "clarke"
    key = TABLE_KEY.get(exp, "metrics")
    if not isinstance(results.get(key), Mapping):
        raise ValueError(f"{where}: experiment {exp!r} has no {key!r} mapping to report")
    return "metrics"


def _figures(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _metrics_report(results: dict, out: Path, source: Path | None, console: Console | None) -> list[Path]:
    from rich.console import Console

    from .generic import markdown_metrics, print_metrics

    console = console or Console()
    exp = results["experiment"]
    key = TABLE_KEY.get(exp, "metrics")
    title = f"{exp}" + (f" ({results['dataset']})" if results.get("dataset") else "") + f": {key}"
    columns, rows = print_metrics(results[key], title, console)
    folder = source.parent if source is not None else out
    figures = _figures(folder)
    if figures:
        console.print(f"figures already in {folder}: " + ", ".join(p.name for p in figures))
    else:
        console.print(f"no figures in {folder}")
    table = out / "table.md"
    atomic_write_text(table, markdown_metrics(columns, rows, title, figures))
    return [table]


def _landscape_method(methods: dict, baseline: str, preferred: str) -> str | None:
    if preferred in methods:
        return preferred
    for name, m in methods.items():
        if name != baseline and initial_hparams(m)[0].size:
            return name
    return None


def write_report(
    results_or_path: dict | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    console: Console | None = None,
    baseline: str = "random",
    method: str = "ours-wd-lr",
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Print the summary table of a run and write its table and figures.

    For Clarke-style results (experiments in :data:`CLARKE_LAYOUT`): ``table.md``, ``median_curves.png``,
    ``cdf.png``, ``lr_trajectories.png`` and ``landscape.png`` (each figure only when the data allow it:
    ``curves``/``hparams`` may be absent). For the landscape, ``method`` falls back to the first other
    method with lr/weight-decay trajectories. For any other experiment its ``metrics`` are printed as a
    table (:mod:`bilevel.report.generic`) and written to ``table.md`` together with the names of the figures
    already beside results.json (the experiment drew them).

    Args:
        results_or_path: a results dict or the path of a ``results.json``.
        out_dir: where to write.
        console: where to print (default: a new rich console).
        baseline: the landscape's fixed-hyperparameter method.
        method: the method whose trajectories are drawn over the landscape.
        n_resamples: bootstrap resamples of the table's error bars.
        seed: the bootstrap's seed.

    Returns:
        The written paths (``[table.md]`` for a generic experiment).

    Raises:
        ValueError: a file that is neither kind, saying why.
    """
    source = None if isinstance(results_or_path, dict) else Path(results_or_path)
    results = load_results(results_or_path)
    kind = _kind(results, str(source) if source is not None else "results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "metrics":
        return _metrics_report(results, out, source, console)
    rows = print_table(results, console=console, n_resamples=n_resamples, seed=seed)
    table = out / "table.md"
    atomic_write_text(table, markdown_table(rows, _title(results)))
    written = [table]
    methods = results.get("methods", {})
    lm = _landscape_method(methods, baseline, method)
    for p in (
        plot_median_curves(results, out / "median_curves.png", n_resamples=n_resamples, seed=seed),
        plot_cdf(results, out / "cdf.png"),
        plot_lr_trajectories(results, out / "lr_trajectories.png", seed=seed),
        plot_landscape(results, out / "landscape.png", baseline=baseline, method=lm or method, seed=seed),
    ):
        if p is not None:
            written.append(p)
    return written
