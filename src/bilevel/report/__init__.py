"""Reporting for random-initialisation HPO experiments (Clarke et al. 2022 style).

Reads the ``results.json`` written by the experiment (``{"methods": {name:
{"final_test_loss": [...], "curves": {...}, "hparams": {...}}}}``, ``null`` =
diverged run) and produces

* statistics: :func:`bootstrap` (estimate, s.e. = std of the statistic over
  bootstrap resamples; diverged runs excluded and counted separately),
  :func:`bootstrap_curve`;
* tables (Table 1): :func:`summary_table`, :func:`format_table` (rich),
  :func:`print_table`, :func:`markdown_table`;
* figures (PNG via Agg): :func:`plot_median_curves` (Fig. 8), :func:`plot_cdf`
  (Fig. 9), :func:`plot_lr_trajectories` (Fig. 10), :func:`plot_landscape` (Fig. 3);
* :func:`write_report`, also ``python -m bilevel.report results.json OUT_DIR``.
"""

from .figures import (
    ecdf,
    fit_landscape,
    initial_hparams,
    plot_cdf,
    plot_landscape,
    plot_lr_trajectories,
    plot_median_curves,
)
from .report import load_results, write_report
from .stats import bootstrap, bootstrap_curve, split_diverged
from .tables import format_pm, format_table, markdown_table, print_table, summary_table

__all__ = [
    "bootstrap",
    "bootstrap_curve",
    "split_diverged",
    "summary_table",
    "format_table",
    "print_table",
    "markdown_table",
    "format_pm",
    "plot_median_curves",
    "plot_cdf",
    "plot_lr_trajectories",
    "plot_landscape",
    "fit_landscape",
    "initial_hparams",
    "ecdf",
    "load_results",
    "write_report",
]
