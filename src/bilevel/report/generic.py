"""Report of any experiment's ``metrics``: nested dicts of numbers flattened to table rows.

Clarke-style files (``methods`` with per-initialisation final losses) have their own bootstrap table
(:mod:`bilevel.report.tables`); every other ``bilevel run`` experiment writes a ``metrics`` mapping,
and this module prints it: each leaf number becomes a cell, its row named by the path of keys above
it, its column by its own key (``metrics.<method>.<field>`` -> row ``<method>``, column ``<field>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["flatten_metrics", "metrics_table", "format_value", "markdown_metrics", "print_metrics"]

#: most columns of the wide layout (rows = paths, columns = leaf keys); beyond it, one row per leaf
MAX_COLUMNS = 8
#: lists of at most this many numbers are shown in full, longer ones as a count
MAX_LIST = 6


def _is_leaf(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def flatten_metrics(metrics: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every leaf of a nested mapping with its path.

    Leaves are numbers, booleans, strings, ``None`` and lists of them; lists of lists or mappings are
    expanded with their indices as keys.

    Args:
        metrics: the nested mapping.
        prefix: the path of ``metrics`` itself.

    Returns:
        ``[(path, value)]`` in depth-first order.
    """
    rows: list[tuple[tuple[str, ...], Any]] = []
    for k, v in metrics.items():
        path = (*prefix, str(k))
        if isinstance(v, Mapping):
            rows.extend(flatten_metrics(v, path))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in v):
            rows.extend(flatten_metrics({str(i): x for i, x in enumerate(v)}, path))  # e.g. a grid of rows
        else:
            rows.append((path, v))
    return rows


def format_value(v: Any) -> str:
    """One table cell.

    Args:
        v: a leaf value.

    Returns:
        Four significant figures for floats; ``-`` for ``None`` (a diverged run or an undefined value).
    """
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        if len(v) <= MAX_LIST and all(_is_leaf(x) for x in v):
            return "[" + ", ".join(format_value(x) for x in v) + "]"
        return f"[{len(v)} values]"
    return str(v)


def metrics_table(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """Formatted cells for ``metrics``.

    Wide layout when the leaves share few keys (at most :data:`MAX_COLUMNS` distinct ones): a row per
    path above the leaves, a column per leaf key. Otherwise a long layout, one ``(metric, value)`` row per leaf.

    Args:
        metrics: an experiment's nested ``metrics``.

    Returns:
        ``(columns, rows)``.

    Raises:
        ValueError: ``metrics`` is not a non-empty mapping.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"'metrics' must be a mapping of names to numbers, got {type(metrics).__name__}")
    leaves = flatten_metrics(metrics)
    if not leaves:
        raise ValueError("'metrics' is empty: nothing to report")
    columns: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for path, v in leaves:
        row = " / ".join(path[:-1]) or "-"
        if path[-1] not in columns:
            columns.append(path[-1])
        rows.setdefault(row, {})[path[-1]] = v
    if len(columns) <= MAX_COLUMNS and len(rows) < len(leaves):
        return ["", *columns], [
            [r, *(format_value(cells[c]) if c in cells else "" for c in columns)] for r, cells in rows.items()
        ]
    return ["metric", "value"], [[" / ".join(path), format_value(v)] for path, v in leaves]


def print_metrics(metrics: Mapping, title: str, console: Console | None = None) -> tuple[list[str], list[list[str]]]:
    """Print ``metrics`` as a rich table (:func:`metrics_table`).

    Args:
        metrics: an experiment's nested ``metrics``.
        title: the table's title.
        console: where to print (default: a new rich console).

    Returns:
        ``(columns, rows)`` as printed.
    """
    from rich.console import Console
    from rich.table import Table

    columns, rows = metrics_table(metrics)
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    (console or Console()).print(t)
    return columns, rows


def markdown_metrics(
    columns: list[str], rows: list[list[str]], title: str | None = None, figures: list[Path] | None = None
) -> str:
    """The table of :func:`print_metrics` in GitHub-flavoured markdown.

    Args:
        columns: the header.
        rows: the formatted cells.
        title: a bold line above the table.
        figures: the figures of the run, listed below the table (``None``: no list; empty: "none").

    Returns:
        The markdown text, ending in a newline.
    """
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if figures is not None:
        lines += ["", "Figures: " + (", ".join(f"`{p.name}`" for p in figures) if figures else "none")]
    return "\n".join(lines) + "\n"
