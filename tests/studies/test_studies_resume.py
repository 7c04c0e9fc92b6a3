"""Re-running a study's command in the same --out resumes it: finished parts (overfit-validation: per model;
val-split: per regime x fraction; augment: per method x seed; lstm: per setting) are read back, not recomputed,
and give the same results.json metrics; changing an option the part depends on recomputes it."""

import json

import pytest

from bilevel_studies import cli
from bilevel_studies.lorraine import augment, lstm, overfit_validation, val_split


def _run(out, argv):
    assert cli.main(["run", *argv, "--out", str(out), "--threads", "1"]) == 0
    return json.loads((out / "results.json").read_text())


def _count(monkeypatch, module, name, real, label=lambda a: a[1]):
    """Replace ``module.name`` by ``real`` (the original function) that also records ``label(args)`` per call."""
    calls = []

    def wrapper(*a, **kw):
        calls.append(label(a))
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _forbid(monkeypatch, module, *names):
    for name in names:

        def boom(*a, name=name, **kw):
            raise AssertionError(f"{name} recomputed a finished part")

        monkeypatch.setattr(module, name, boom)


OVERFIT = [
    "overfit-validation",
    "--models",
    "linear",
    "--iterations",
    "10",
    "--eval-every",
    "5",
    "--test-size",
    "100",
    "--lookback",
    "2",
]


def test_overfit_validation_resumes_per_model(tmp_path, data_dir, monkeypatch):
    real = overfit_validation.run_model
    argv = [*OVERFIT, "--data-dir", str(data_dir)]
    calls = _count(monkeypatch, overfit_validation, "run_model", real)
    first = _run(tmp_path, argv)
    assert calls == ["linear"] and first["resumed"] == [] and (tmp_path / "parts" / "linear.json").exists()
    _forbid(monkeypatch, overfit_validation, "run_model")
    again = _run(tmp_path, argv)
    assert again["resumed"] == ["linear"] and again["metrics"] == first["metrics"]
    assert again["models"]["linear"]["curves"] == first["models"]["linear"]["curves"]
    # another hyper learning rate is another part; a run-only option (--threads) is not
    calls = _count(monkeypatch, overfit_validation, "run_model", real)
    changed = _run(tmp_path, [*argv, "--hyper-lr", "0.5"])
    assert calls == ["linear"] and changed["resumed"] == []
    assert changed["models"]["linear"]["weight_decay"] != first["models"]["linear"]["weight_decay"]
    _run(tmp_path, [*argv, "--hyper-lr", "0.5", "--threads", "2"])
    assert calls == ["linear"]


def test_val_split_resumes_per_regime_and_fraction(tmp_path, data_dir, monkeypatch):
    real = val_split.run_split
    argv = [
        "val-split",
        "--data-dir",
        str(data_dir),
        "--pool",
        "200",
        "--iterations",
        "10",
        "--test-size",
        "100",
        "--lookback",
        "2",
    ]
    label = lambda a: (a[1], a[2])  # noqa: E731  (regime, fraction)
    calls = _count(monkeypatch, val_split, "run_split", real, label)
    first = _run(tmp_path, [*argv, "--fractions", "0.5"])
    assert calls == [("global", 0.5), ("per-weight", 0.5)]
    _forbid(monkeypatch, val_split, "run_split")
    again = _run(tmp_path, [*argv, "--fractions", "0.5"])
    assert again["metrics"] == first["metrics"] and again["resumed"] == ["global 0.5", "per-weight 0.5"]
    # a new fraction computes only its own two parts; the finished 0.5 parts are reused
    calls = _count(monkeypatch, val_split, "run_split", real, label)
    more = _run(tmp_path, [*argv, "--fractions", "0.5,0.25"])
    assert calls == [("global", 0.25), ("per-weight", 0.25)]
    assert more["metrics"]["per-weight"]["0.5"] == first["metrics"]["per-weight"]["0.5"]
    # another learning rate: everything again
    calls.clear()
    _run(tmp_path, [*argv, "--fractions", "0.5", "--lr", "0.05"])
    assert calls == [("global", 0.5), ("per-weight", 0.5)]


def test_augment_resumes_per_method_and_seed(tmp_path, data_dir, monkeypatch):
    real = augment.run_one
    argv = [
        "augment",
        "--data-dir",
        str(data_dir),
        "--methods",
        "none,neumann",
        "--steps",
        "4",
        "--interval",
        "2",
        "--train-size",
        "32",
        "--val-size",
        "16",
        "--eval-size",
        "16",
        "--aug-samples",
        "2",
        "--batch-size",
        "8",
    ]
    label = lambda a: (a[1], a[2])  # noqa: E731  (method, seed)
    calls = _count(monkeypatch, augment, "run_one", real, label)
    first = _run(tmp_path, [*argv, "--seeds", "1"])
    assert calls == [("none", 0), ("neumann", 0)] and (tmp_path / "parts" / "neumann-seed0.pt").exists()
    (tmp_path / "augmentations.png").unlink()
    _forbid(monkeypatch, augment, "run_one")
    again = _run(tmp_path, [*argv, "--seeds", "1"])
    assert again["metrics"] == first["metrics"] and again["runs"] == first["runs"]
    assert again["resumed"] == ["none seed 0", "neumann seed 0"]
    assert (tmp_path / "augmentations.png").exists()  # redrawn from the stored augmenter
    # a second seed computes only the new runs
    calls = _count(monkeypatch, augment, "run_one", real, label)
    two = _run(tmp_path, [*argv, "--seeds", "2"])
    assert calls == [("none", 1), ("neumann", 1)] and two["metrics"]["none"]["seeds"] == 2


def test_lstm_resumes_per_setting(tmp_path, data_dir, monkeypatch):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("PTB not available")
    real_setting, real_overfit = lstm.run_setting, lstm.run_overfit
    argv = [
        "lstm",
        "--data-dir",
        str(data_dir),
        "--settings",
        "scalar,overfit",
        "--steps",
        "2",
        "--interval",
        "2",
        "--embed",
        "4",
        "--hidden",
        "4",
        "--bptt",
        "4",
        "--batch-size",
        "2",
        "--eval-windows",
        "2",
        "--record-every",
        "2",
        "--overfit-steps",
        "2",
        "--overfit-interval",
        "1",
        "--overfit-record-every",
        "1",
        "--overfit-sequences",
        "2",
        "--overfit-size",
        "4",
    ]
    setting = _count(monkeypatch, lstm, "run_setting", real_setting)
    overfit = _count(monkeypatch, lstm, "run_overfit", real_overfit, lambda a: "overfit")
    first = _run(tmp_path, argv)
    assert setting == ["scalar"] and overfit == ["overfit"]
    _forbid(monkeypatch, lstm, "run_setting", "run_overfit")
    again = _run(tmp_path, argv)
    assert again["metrics"] == first["metrics"] and again["resumed"] == ["scalar", "overfit"]
    # an --overfit-* option recomputes the overfit setting only
    overfit = _count(monkeypatch, lstm, "run_overfit", real_overfit, lambda a: "overfit")
    changed = _run(tmp_path, [*argv, "--overfit-hyper-lr", "0.2"])
    assert overfit == ["overfit"] and changed["resumed"] == ["scalar"]
    assert changed["metrics"]["scalar"] == first["metrics"]["scalar"]
