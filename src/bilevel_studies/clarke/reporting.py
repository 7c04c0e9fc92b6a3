"""Reporting a ``clarke`` run beyond the generic report: divergence notes and Table 2's perplexities."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel.rundir import atomic_write_text

from .config import METHODS


def divergence_notes(doc: Mapping[str, Any], hyper_lr_option: str = "--hyper-lr") -> list[str]:
    """One line per method whose every run diverged: when, and what to try."""
    notes = []
    cfg = doc.get("config", {})
    for name, m in doc.get("methods", {}).items():
        finals = m.get("final_test_loss") or []
        if not finals or any(v is not None for v in finals):
            continue
        steps = [s for s in (m.get("diverged_at") or []) if s is not None]
        n = len(finals)
        if steps:
            why = f"non-finite loss by step {max(steps)}"
        elif cfg.get("outlier_threshold") is not None:
            why = f"final test loss above --outlier-threshold {cfg['outlier_threshold']:g} or not finite"
        else:
            why = "non-finite final loss"
        method = METHODS.get(name)
        if method is not None and method.tuned:
            key, option = (
                ("baydin_hyper_lr", "--baydin-hyper-lr") if method.authors_baydin else ("hyper_lr", hyper_lr_option)
            )
            lr = cfg.get(key)
            hint = f"try a smaller {option}" + (f" (now {lr:g})" if isinstance(lr, (int, float)) else "")
        else:
            hint = "these fixed initial hyperparameters do not train (a baseline result, not a fault)"
        notes.append(f"all {n} run{'s' * (n != 1)} of {name} diverged ({why}): {hint}")
    return notes


def perplexity_rows(doc: Mapping[str, Any], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Table 2's Penn Treebank statistics: per-run test perplexities ``exp(cross-entropy)``, then the usual
    bootstrap mean / median (and best) over them, as :func:`bilevel.report.tables.summary_table`."""
    from bilevel.report.tables import summary_table

    def ppl(v: float | None) -> float | None:
        return None if v is None else math.exp(v)

    perplexities = {
        name: {"final_test_loss": [ppl(v) for v in m.get("final_test_loss") or []]}
        for name, m in doc.get("methods", {}).items()
    }
    return summary_table({"methods": perplexities}, n_resamples=n_resamples, seed=seed)


def write_perplexity_table(doc: Mapping[str, Any], out: Path, console=None) -> Path:
    """Print the perplexity table of a ``ptb`` run and write it to ``out/table_perplexity.md``."""
    from rich.console import Console

    from bilevel.report.tables import format_table, markdown_table

    rows = perplexity_rows(doc)
    title = "Final test perplexity (clarke, ptb)"
    (console or Console()).print(format_table(rows, title))
    path = out / "table_perplexity.md"
    atomic_write_text(path, markdown_table(rows, title))
    return path
