"""One-call report: table to the terminal, ``table.md`` and every figure the data allow."""

from __future__ import annotations

import json
from pathlib import Path

from .figures import (initial_hparams, plot_cdf, plot_landscape, plot_lr_trajectories,
                      plot_median_curves)
from .tables import _title, markdown_table, print_table

__all__ = ["load_results", "write_report"]


def load_results(results_or_path) -> dict:
    """A results dict, or one read from a ``results.json`` path (``NaN`` and ``null`` allowed)."""
    if isinstance(results_or_path, dict):
        return results_or_path
    with open(results_or_path) as f:
        return json.load(f)


def _landscape_method(methods: dict, baseline: str, preferred: str) -> str | None:
    if preferred in methods:
        return preferred
    for name, m in methods.items():
        if name != baseline and initial_hparams(m)[0].size:
            return name
    return None


def write_report(results_or_path, out_dir, console=None, baseline: str = "random",
                 method: str = "ours-wd-lr", n_resamples: int = 1000, seed: int = 0) -> list[Path]:
    """Print the summary table and write ``table.md``, ``median_curves.png``, ``cdf.png``,
    ``lr_trajectories.png`` and ``landscape.png`` into ``out_dir`` (each figure only when
    the data allow it: ``curves``/``hparams`` may be absent).  Returns the written paths.
    For the landscape, ``method`` falls back to the first other method with lr/weight-decay
    trajectories."""
    results = load_results(results_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = print_table(results, console=console, n_resamples=n_resamples, seed=seed)
    table = out / "table.md"
    table.write_text(markdown_table(rows, _title(results)))
    written = [table]
    methods = results.get("methods", {})
    lm = _landscape_method(methods, baseline, method)
    for p in (plot_median_curves(results, out / "median_curves.png", n_resamples=n_resamples, seed=seed),
              plot_cdf(results, out / "cdf.png"),
              plot_lr_trajectories(results, out / "lr_trajectories.png", seed=seed),
              plot_landscape(results, out / "landscape.png", baseline=baseline,
                             method=lm or method, seed=seed)):
        if p is not None:
            written.append(p)
    return written
