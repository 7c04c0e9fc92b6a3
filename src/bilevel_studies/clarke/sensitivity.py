"""Clarke et al. (2022) Fig. 4 / Fig. 6: sensitivity to the update interval T and look-back distance i.

For every (T, i) on a grid, the same random initialisations are tuned with the
methods of the configuration (default ``random`` and ``ours-wd-lr-m``); the
median final test loss per cell is tabulated and drawn as a heat map.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bilevel.report.stats import split_diverged
from bilevel.rundir import atomic_savefig, atomic_write_json

from .. import _common as C
from . import clarke
from .config import METHODS, ClarkeConfig, parse_methods, validate_config
from .running import run_experiment


def run(
    cfg: ClarkeConfig,
    intervals: list[int],
    lookbacks: list[int],
    out: Path,
    progress_factory=None,
    console=None,
    updates: int | None = None,
) -> dict:
    """Median final test loss per (T, i) cell. With ``updates``, each cell trains for ``updates * T`` steps
    (the paper's Fig. 4: 400 hyperparameter updates whatever T); otherwise for ``cfg.steps``. A method without
    hypergradients (``random*``) does not depend on i, so it is trained once per T and shared along the row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid: dict[str, list[list[float | None]]] = {}
    for method in parse_methods(cfg.methods):
        cells = []
        for T in intervals:
            row = []
            for i in lookbacks:
                uses_lookback = METHODS[method].mode != "none"
                cell_dir = out / f"{method}" / (f"T{T}_i{i}" if uses_lookback else f"T{T}")
                steps = updates * T if updates else cfg.steps
                sub = replace(
                    cfg, methods=[method], interval=T, lookback=i if uses_lookback else cfg.lookback, steps=steps
                )
                doc = run_experiment(
                    sub,
                    cell_dir,
                    progress_factory=(
                        (lambda name, total, T=T, i=i: progress_factory(f"{name} T={T} i={i}", total))
                        if progress_factory
                        else None
                    ),
                )
                finite, _ = split_diverged(doc["methods"][method]["final_test_loss"])
                row.append(float(np.median(finite)) if len(finite) else None)
            cells.append(row)
        grid[method] = cells
    doc = {
        "experiment": "sensitivity",
        "dataset": cfg.dataset,
        "intervals": intervals,
        "lookbacks": lookbacks,
        "updates": updates,
        "steps": None if updates else cfg.steps,
        "median_final_test_loss": grid,
    }
    atomic_write_json(out / "results.json", doc, indent=1)
    _print(doc, console)
    _plot(doc, out / "sensitivity.png")
    return doc


def _print(doc: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for method, cells in doc["median_final_test_loss"].items():
        t = Table(title=f"median final test loss, {method} ({doc['dataset']}): rows T, columns i")
        t.add_column("T \\ i")
        for i in doc["lookbacks"]:
            t.add_column(str(i), justify="right")
        for T, row in zip(doc["intervals"], cells):
            t.add_row(str(T), *("NaN" if v is None else f"{v:.3g}" for v in row))
        console.print(t)


def _plot(doc: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    methods = list(doc["median_final_test_loss"])
    fig = Figure(figsize=(4.5 * len(methods), 4))
    for k, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), k + 1)
        vals = np.array([[np.nan if v is None else v for v in row] for row in doc["median_final_test_loss"][method]])
        im = ax.imshow(np.log10(vals), cmap="viridis_r", origin="lower")
        ax.set_xticks(range(len(doc["lookbacks"])), [str(i) for i in doc["lookbacks"]])
        ax.set_yticks(range(len(doc["intervals"])), [str(T) for T in doc["intervals"]])
        ax.set_xlabel("look-back i")
        ax.set_ylabel("update interval T")
        ax.set_title(method)
        for (r, c), v in np.ndenumerate(vals):
            ax.text(c, r, "NaN" if np.isnan(v) else f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax, label="log10 median final test loss")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)


NAME = "sensitivity"
HELP = (
    "Clarke et al. Fig. 4: median final test loss over update interval T and look-back i, for random and ours-wd-lr-m"
)


def add_arguments(p) -> None:
    clarke.add_arguments(p, dataset="energy", inits=20, steps=400, methods="random,ours-wd-lr-m", backend_options=False)
    p.add_argument(
        "--intervals",
        type=C.int_list(1),
        default=[1, 5, 10, 25, 50],
        help="comma-separated update intervals T (each >= 1)",
    )
    p.add_argument(
        "--lookbacks",
        type=C.int_list(0),
        default=[0, 1, 5, 10, 25],
        help="comma-separated look-back distances i (each >= 0; diff-through-opt needs >= 1)",
    )
    p.add_argument(
        "--updates",
        type=C.positive_int,
        default=None,
        help="train each cell for UPDATES * T steps "
        "(the paper: 400 hyperparameter updates); default: --steps for every cell",
    )


def cells(cfg: ClarkeConfig, intervals: list[int], lookbacks: list[int], updates: int | None = None):
    """``(method, T, i, cell config)`` of every cell of the grid."""
    for method in parse_methods(cfg.methods):
        uses_lookback = METHODS[method].mode != "none"
        for T in intervals:
            for i in lookbacks:
                yield (
                    method,
                    T,
                    i,
                    replace(
                        cfg,
                        methods=[method],
                        interval=T,
                        lookback=i if uses_lookback else cfg.lookback,
                        steps=updates * T if updates else cfg.steps,
                    ),
                )


def check_arguments(a) -> None:
    cfg = clarke.config_from_args(a)
    unrolled = [m for m in parse_methods(cfg.methods) if METHODS[m].mode == "unroll"]
    if unrolled and min(a.lookbacks) < 1:
        raise ValueError(
            f"--lookbacks {','.join(map(str, a.lookbacks))}: {', '.join(unrolled)} differentiates "
            "through the last i weight steps, so every look-back must be >= 1 for it (0 is fine for "
            "the IFT methods: one Neumann term)"
        )
    for *_, sub in cells(cfg, a.intervals, a.lookbacks, a.updates):
        validate_config(sub)


def main(a, progress_factory=None, console=None) -> dict:
    return run(
        clarke.config_from_args(a),
        list(a.intervals),
        list(a.lookbacks),
        a.out,
        progress_factory=progress_factory,
        console=console,
        updates=a.updates,
    )
