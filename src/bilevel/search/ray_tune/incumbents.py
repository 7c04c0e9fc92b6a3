"""The incumbent: the best loss found so far against wall time, and its figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...rundir import atomic_savefig
from .runs import DIVERGED

__all__ = ["incumbent", "plot_incumbent"]


def incumbent(rows: Sequence[tuple[float, float | None]]) -> tuple[list[float], list[float]]:
    """Best (lowest) finite loss seen by each time.

    Args:
        rows: ``(seconds, loss)`` pairs (``loss`` ``None``: diverged).

    Returns:
        ``(times, best)``, sorted by time.
    """
    times, best, cur = [], [], math.inf
    for t, v in sorted((t, v) for t, v in rows if v is not None and math.isfinite(v) and v < DIVERGED):
        if v < cur:
            cur = v
            times.append(float(t))
            best.append(float(v))
    return times, best


def plot_incumbent(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    title: str,
    ylabel: str = "incumbent best test loss",
) -> Path | None:
    """Best loss found so far against wall time (log axes), one step curve per search (e.g. Clarke et al.
    2022, Figs. 11 and 19).

    Args:
        series: search name -> ``(seconds, best loss)``.
        path: the PNG to write (atomically).
        title: the figure's title.
        ylabel: the y axis' label.

    Returns:
        ``path``, or ``None`` when every series is empty.
    """
    series = {k: v for k, v in series.items() if len(v[0])}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (t, v) in series.items():
        ax.step(t, v, where="post", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
