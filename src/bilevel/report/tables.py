"""Clarke et al. (2022) Table 1 style summaries: mean ± s.e., median ± s.e., best, #NaN."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .stats import bootstrap, split_diverged

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "summary_table",
    "format_pm",
    "format_best",
    "best_in_error_bars",
    "format_table",
    "print_table",
    "markdown_table",
]


def _methods(results: dict) -> dict:
    return results.get("methods", results) if isinstance(results, dict) else {}


def summary_table(results: dict, n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per method of ``results["methods"]`` (in file order).

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed.

    Returns:
        Rows with keys ``method``; ``n`` (all initialisations); ``diverged`` (final test loss None/NaN/inf);
        ``mean``, ``mean_se``, ``median``, ``median_se`` (bootstrap, :func:`~bilevel.report.stats.bootstrap`,
        over the ``n - diverged`` finite runs only); ``best`` (lowest finite final test loss). Statistics are
        NaN when every run diverged.
    """
    rows = []
    for name, m in _methods(results).items():
        raw = m.get("final_test_loss", []) or []
        finite, diverged = split_diverged(raw)
        mean, mean_se = bootstrap(finite, np.mean, n_resamples, seed)
        median, median_se = bootstrap(finite, np.median, n_resamples, seed)
        rows.append(
            dict(
                method=name,
                n=len(raw),
                diverged=diverged,
                mean=mean,
                mean_se=mean_se,
                median=median,
                median_se=median_se,
                best=float(finite.min()) if finite.size else float("nan"),
            )
        )
    return rows


def format_pm(value: float, se: float) -> str:
    """``"value ± se"`` with se to one significant figure and value to the same decimal place (as in Clarke et
    al. Table 1: ``24 ± 2``, ``8.3 ± 0.7``, ``17.192 ± 0.004``).

    Args:
        value: the estimate.
        se: its standard error.

    Returns:
        The text (``—`` for a non-finite value; the value alone for a non-finite or zero se).
    """
    if not math.isfinite(value):
        return "—"
    if not math.isfinite(se) or se <= 0:
        return f"{value:.4g}"
    exp = math.floor(math.log10(se))
    digit = round(se / 10.0**exp)  # 1..10
    if digit == 10:  # e.g. 0.96 -> 1
        exp, digit = exp + 1, 1
    if exp >= 0:
        mag = 10**exp
        return f"{round(value / mag) * mag:.0f} ± {digit * mag:.0f}"
    return f"{value:.{-exp}f} ± {digit * 10.0**exp:.{-exp}f}"


def format_best(value: float) -> str:
    """Three significant figures, keeping trailing zeros (``5.70``, ``0.124``, ``15.4``).

    Args:
        value: the number.

    Returns:
        The text.
    """
    if not math.isfinite(value):
        return "—"
    s = f"{value:#.3g}"
    return s.rstrip(".") if "e" not in s else s


def best_in_error_bars(rows: Sequence[dict], key: str) -> set[str]:
    """Methods whose ``key`` value lies within the error bars of the best (lowest) method (Clarke et al.
    embolden these). For ``best`` (no error bar) only the minimum.

    Args:
        rows: :func:`summary_table`'s rows.
        key: ``"mean"``, ``"median"`` or ``"best"``.

    Returns:
        The methods' names.
    """
    finite = [r for r in rows if math.isfinite(r[key])]
    if not finite:
        return set()
    top = min(finite, key=lambda r: r[key])
    se = top.get(f"{key}_se", 0.0)
    se = se if se is not None and math.isfinite(se) else 0.0
    return {r["method"] for r in finite if r[key] <= top[key] + se}


def _cells(rows: Sequence[dict]) -> Iterator[tuple[dict, dict[str, str], dict[str, bool]]]:
    bold = {k: best_in_error_bars(rows, k) for k in ("mean", "median", "best")}
    for r in rows:
        yield (
            r,
            {
                "mean": format_pm(r["mean"], r["mean_se"]),
                "median": format_pm(r["median"], r["median_se"]),
                "best": format_best(r["best"]),
            },
            {k: r["method"] in v for k, v in bold.items()},
        )


def format_table(rows: Sequence[dict], title: str | None = None) -> Table:
    """A :class:`rich.table.Table`: Method, Mean, Median, Best, #NaN (best entries bold).

    Args:
        rows: :func:`summary_table`'s rows.
        title: the table's title.

    Returns:
        The table.
    """
    from rich.table import Table

    table = Table(title=title)
    table.add_column("Method", style="cyan", no_wrap=True)
    for col in ("Mean", "Median", "Best"):
        table.add_column(col, justify="right")
    table.add_column("#NaN", justify="right")
    for r, cells, bold in _cells(rows):
        table.add_row(
            r["method"],
            *[f"[bold]{cells[k]}[/bold]" if bold[k] else cells[k] for k in ("mean", "median", "best")],
            f"{r['diverged']}/{r['n']}",
        )
    return table


def _title(results: dict) -> str:
    parts = [str(results.get(k)) for k in ("experiment", "dataset") if results.get(k)]
    return "Final test loss" + (f" ({', '.join(parts)})" if parts else "")


def print_table(results: dict, console: Console | None = None, **kwargs: Any) -> list[dict]:
    """Print the summary of ``results`` with rich.

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        console: where to print (default: a new rich console).
        **kwargs: passed to :func:`summary_table`.

    Returns:
        The rows.
    """
    from rich.console import Console

    rows = summary_table(results, **kwargs)
    (console or Console()).print(format_table(rows, _title(results)))
    return rows


def markdown_table(rows: Sequence[dict], title: str | None = None) -> str:
    """GitHub-flavoured markdown version of :func:`format_table` (bold = within best's error bars).

    Args:
        rows: :func:`summary_table`'s rows.
        title: a bold line above the table.

    Returns:
        The markdown text.
    """
    lines = [f"**{title}**", ""] if title else []
    lines += ["| Method | Mean | Median | Best | #NaN |", "|---|---:|---:|---:|---:|"]
    for r, cells, bold in _cells(rows):
        c = [f"**{cells[k]}**" if bold[k] else cells[k] for k in ("mean", "median", "best")]
        lines.append(f"| {r['method']} | {c[0]} | {c[1]} | {c[2]} | {r['diverged']}/{r['n']} |")
    return "\n".join(lines) + "\n"
