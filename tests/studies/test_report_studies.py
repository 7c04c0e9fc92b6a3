"""`bilevel report` on the results.json of studies (bilevel.report renders them without importing the studies)."""

import io
import json

from rich.console import Console

from bilevel.report import write_report
from bilevel_studies import cli


def _quiet():
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_write_report_prints_metrics_of_other_experiments(tmp_path, data_dir):
    """`bilevel report DIR` on results.json of two non-Clarke studies: their metrics as a table, the figures
    already in the directory named, no AttributeError."""
    runs = {
        "overfit-validation": [
            "--models",
            "linear",
            "--iterations",
            "4",
            "--eval-every",
            "2",
            "--test-size",
            "50",
            "--lookback",
            "1",
        ],
        "val-split": [
            "--pool",
            "100",
            "--fractions",
            "0.5",
            "--iterations",
            "4",
            "--test-size",
            "50",
            "--lookback",
            "1",
        ],
    }
    for exp, argv in runs.items():
        out = tmp_path / exp
        assert cli.main(["run", exp, *argv, "--data-dir", str(data_dir), "--out", str(out), "--threads", "1"]) == 0
        doc = json.loads((out / "results.json").read_text())
        console, buf = _quiet()
        written = write_report(out / "results.json", out, console=console)
        assert [p.name for p in written] == ["table.md"]
        text, md = buf.getvalue(), (out / "table.md").read_text()
        figure = {"overfit-validation": "overfit_validation.png", "val-split": "val_split.png"}[exp]
        assert f"figures already in {out}: {figure}" in text and f"`{figure}`" in md
        if exp == "overfit-validation":  # wide layout: a row per model, a column per split
            acc = doc["metrics"]["linear"]["test"]
            assert "| linear |" in md and f"{acc:.4g}" in md and "| train | val | test |" in md
        else:
            acc = doc["metrics"]["per-weight"]["0.5"]["retrained_test_accuracy"]
            assert "| per-weight / 0.5 |" in md and f"{acc:.4g}" in md and "val_accuracy" in md
        assert cli.main(["report", str(out)]) == 0  # the command line too
