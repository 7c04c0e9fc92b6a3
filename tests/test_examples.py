"""The examples/ scripts at a small size: each main() runs in seconds and its claim holds."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_cnn_digits():
    out = load("tune_cnn_digits").main(epochs=3)
    tuned, fixed = out["tuned"], out["fixed"]
    assert fixed["hparams"] == pytest.approx({"lr": 3e-3, "momentum": 0.5, "weight_decay": 1e-4}, rel=1e-5)
    assert tuned["hparams"]["lr"] > 3e-3 * 1.2  # an lr too small for 3 epochs is raised
    assert tuned["val_loss"] < fixed["val_loss"]  # what the hypergradient descends
    assert tuned["test_acc"] >= fixed["test_acc"] - 0.02  # and it carries over to the test digits
    assert tuned["test_acc"] > 0.5


def test_per_weight_decay_adam():
    out = load("per_weight_decay_adam").main(epochs=25)
    tuned, fixed = out["tuned"], out["fixed"]
    assert tuned["decays"] == fixed["decays"] == 64 * 128 + 128 + 128 * 10 + 10
    assert fixed["decay_range"] == pytest.approx((1e-3, 1e-3), rel=1e-5)
    lo, hi = tuned["decay_range"]
    assert lo < 0.5e-3 and hi > 2e-3  # one decay per weight, tuned apart
    assert tuned["val_loss"] < fixed["val_loss"]
    assert tuned["test_loss"] < fixed["test_loss"] + 0.02
    assert tuned["test_acc"] >= fixed["test_acc"] - 0.02


def test_reweight_noisy_labels():
    out = load("reweight_noisy_labels").main(hyper_steps=30)
    assert out["weight_flipped"] < 0.5 * out["weight_clean"]  # flipped examples are down-weighted
    assert out["flipped_in_lowest"] > 0.6  # most of the lowest-weighted are flipped (30 % by chance)
    assert out["val_acc"]["reweighted"] > out["val_acc"]["uniform"] + 0.05
    assert out["test_acc"]["reweighted"] > out["test_acc"]["uniform"] + 0.03
    assert all(math.isfinite(v) for v in out["test_acc"].values())
