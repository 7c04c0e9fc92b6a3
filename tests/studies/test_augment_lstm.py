"""Tiny end-to-end runs of `bilevel run augment` and `bilevel run lstm`, and the `lstm` study's Fig. 8 overfit check
(Algorithm 1 itself: tests/test_tuner.py)."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch

from bilevel_studies.cli import main


def test_augment_cli_smoke(tmp_path, data_dir):
    rc = main(
        [
            "run",
            "augment",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--steps",
            "6",
            "--interval",
            "3",
            "--seeds",
            "1",
            "--train-size",
            "64",
            "--val-size",
            "32",
            "--eval-size",
            "32",
            "--aug-samples",
            "2",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["summary"]) == {"none", "neumann", "unroll", "identity"}
    for m, runs in doc["runs"].items():
        r = runs[0]
        assert r["diverged_at"] is None
        assert 0.0 <= r["test_acc_aug"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert math.isfinite(r["test_loss"])
        # the augmenter moves only with hyperparameter optimisation
        assert (r["augmenter_change"] == 0.0) == (m == "none")
    assert (tmp_path / "augmentations.png").exists()
    # metrics.<method>: the 10-augmented-sample accuracies as headline numbers, plain ones beside them
    fields = {
        "val_accuracy",
        "test_accuracy",
        "val_accuracy_sd",
        "test_accuracy_sd",
        "val_accuracy_plain",
        "test_accuracy_plain",
        "val_accuracy_plain_sd",
        "test_accuracy_plain_sd",
        "diverged",
        "seeds",
    }
    assert set(doc["metrics"]) == set(doc["summary"])
    for m, met in doc["metrics"].items():
        assert set(met) == fields and met["diverged"] == 0 and met["seeds"] == 1
        assert met["test_accuracy"] == doc["runs"][m][0]["test_acc_aug"] == doc["summary"][m]["test_acc_aug"]["mean"]
        assert met["val_accuracy_plain"] == doc["runs"][m][0]["val_acc"]
        assert met["test_accuracy_sd"] is None  # one seed: no standard deviation


def test_augment_missing_cifar_is_a_clear_error(tmp_path):
    rc = main(
        [
            "run",
            "augment",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(tmp_path),
            "--dataset",
            "cifar10",
            "--steps",
            "1",
            "--seeds",
            "1",
        ]
    )
    assert rc == 2  # FileNotFoundError, printed by the CLI


def test_lstm_cli_smoke(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("PTB not available")
    rc = main(
        [
            "run",
            "lstm",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--steps",
            "4",
            "--interval",
            "2",
            "--embed",
            "8",
            "--hidden",
            "8",
            "--bptt",
            "5",
            "--batch-size",
            "4",
            "--eval-windows",
            "3",
            "--record-every",
            "2",
            "--overfit-steps",
            "4",
            "--overfit-interval",
            "2",
            "--overfit-record-every",
            "2",
            "--overfit-sequences",
            "3",
            "--overfit-size",
            "4",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    res = doc["results"]
    assert set(res) == {"none", "scalar", "many", "overfit"}
    assert res["scalar"]["n_hyperparameters"] == 7
    assert res["many"]["n_hyperparameters"] == 10000 + 8 + 8 + 8 + 2 * 32 * 8 + 2
    for s in ("none", "scalar", "many"):
        assert 100 < res[s]["val_ppl"] < 20000 and 100 < res[s]["test_ppl"] < 20000
    assert res["none"]["final_hparams"]["dropouti"] == pytest.approx(0.5)
    assert res["scalar"]["final_hparams"]["dropouti"] != pytest.approx(0.5, abs=1e-6)
    ov = res["overfit"]
    assert len(ov["val_loss"]) == 2 and all(math.isfinite(v) for v in ov["val_loss"] + ov["none_val_loss"])
    assert ov["n_hyperparameters"] == ov["n_weights"]
    assert (tmp_path / "lstm.png").exists()
    met = doc["metrics"]
    assert set(met) == set(res)
    for s in ("none", "scalar", "many"):
        assert {"val_ppl", "test_ppl", "seconds", "num_hyperparameters"} <= set(met[s])
        assert met[s]["val_ppl"] == res[s]["val_ppl"] and met[s]["num_hyperparameters"] == res[s]["n_hyperparameters"]
    assert met["overfit"]["final_val_loss"] == ov["val_loss"][-1]
    assert met["overfit"]["initial_val_loss"] == ov["initial_val_loss"]
    assert met["overfit"]["num_hyperparameters"] == ov["n_weights"] and met["overfit"]["seconds"] > 0


def test_lstm_overfit_signed_decays(tmp_path, data_dir):
    """--overfit-signed: the Fig. 8 decays live in natural space and may turn negative (log10 decays cannot)."""
    if not (data_dir / "ptb").is_dir():
        pytest.skip("PTB not available")
    docs = {}
    for signed in (False, True):
        out = tmp_path / str(signed)
        rc = main(
            [
                "run",
                "lstm",
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
                "--settings",
                "overfit",
                "--bptt",
                "5",
                "--overfit-steps",
                "3",
                "--overfit-interval",
                "1",
                "--overfit-record-every",
                "1",
                "--overfit-sequences",
                "3",
                "--overfit-size",
                "4",
                "--overfit-hyper-lr",
                "0.01",
                "--threads",
                "1",
                *(["--overfit-signed"] if signed else []),
            ]
        )
        assert rc == 0
        docs[signed] = json.loads((out / "results.json").read_text())["results"]["overfit"]
    log10, signed = docs[False]["weight_decay"], docs[True]["weight_decay"]
    assert log10["min"] > 0 and signed["min"] < 0 < signed["max"] and signed["count"] == log10["count"]
    assert all(math.isfinite(v) for v in docs[True]["val_loss"])
    assert docs[True]["none_val_loss"] == docs[False]["none_val_loss"]  # the baseline does not tune


def test_overfit_lowers_validation_loss():
    """A tiny Fig. 8: per-weight decays tuned online drive the validation loss far below both its start
    and the same training without hyperparameter steps (which over-fits the training sequences)."""
    from bilevel_studies.lorraine.lstm import run_overfit

    g = torch.Generator().manual_seed(0)
    V = 60
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)  # a skewed unigram distribution, as words are
    corpus = SimpleNamespace(
        ntokens=V,
        train=torch.multinomial(zipf, 400, True, generator=g),
        valid=torch.multinomial(zipf, 400, True, generator=g),
    )
    a = argparse.Namespace(
        dtype="float64",
        device="cpu",
        seed=0,
        layers=1,
        bptt=9,
        overfit_sequences=10,
        overfit_size=16,
        overfit_steps=120,
        overfit_lr=0.02,
        overfit_wd=1e-4,
        overfit_max_decay=10.0,
        overfit_hyper_lr=0.1,
        overfit_interval=1,
        overfit_terms=0,
        overfit_record_every=20,
        overfit_signed=False,
    )
    r = run_overfit(a, corpus)
    assert r["diverged_at"] is None and r["none_diverged_at"] is None
    assert r["n_hyperparameters"] == r["n_weights"]
    assert r["none_final_train_loss"] < 0.5 * r["initial_val_loss"]  # without HO it memorises training ...
    assert r["none_final_val_loss"] > r["initial_val_loss"]  # ... and validation gets worse
    assert r["final_val_loss"] < 0.85 * r["initial_val_loss"]
    assert r["final_val_loss"] < r["none_final_val_loss"] - 1.0
    assert r["weight_decay_mean"][-1] > 10 * a.overfit_wd
