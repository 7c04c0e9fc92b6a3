"""Tune SGD's learning rate, momentum and weight decay inside a PyTorch Lightning Trainer (scikit-learn's digits).

A small MLP LightningModule whose ``configure_optimizers`` returns ``torch.optim.SGD(lr=3e-3, momentum=0.5,
weight_decay=1e-4)``, a learning rate too small for a few epochs, trained twice from the same weights on the
same batches: with the :class:`bilevel.integrations.lightning.HyperTuner` callback (every 10 optimiser steps one
IFT hypergradient step on log10 lr, logit momentum and log10 decay, Clarke et al. 2022) and without it.

Run ``python examples/lightning_digits.py`` (``--small``: a few seconds; ``--overhead``: time per step with and
without the callback, 3 alternating runs each). Needs ``pip install "bilevel[lightning]"``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bilevel.integrations.lightning import HyperTuner


class DigitsMLP(pl.LightningModule):
    """64 -> hidden -> 10 with cross-entropy; SGD with the given start values."""

    def __init__(self, lr: float = 3e-3, momentum: float = 0.5, weight_decay: float = 1e-4, hidden: int = 64) -> None:
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def digits(n_train: int = 1000, seed: int = 0):
    """(train, validation, test) TensorDatasets: n_train digits, the next 400, the last 397."""
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (
        TensorDataset(X[:n_train], y[:n_train]),
        TensorDataset(X[1000:1400], y[1000:1400]),
        TensorDataset(X[1400:], y[1400:]),
    )


def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model on a dataset."""
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(tuned: bool, epochs: int = 3, n_train: int = 1000, seed: int = 0, interval: int = 10, **tuner_kw):
    """One Lightning run; returns validation / test loss and accuracy, the hyperparameters and seconds per step."""
    train_set, val_set, test_set = digits(n_train, seed)
    torch.manual_seed(seed)  # the same initial weights and the same shuffled batches for both runs
    model = DigitsMLP()
    callbacks = []
    if tuned:
        tuner = HyperTuner(
            DataLoader(val_set, batch_size=200), tune=("lr", "momentum", "weight_decay"), interval=interval, **tuner_kw
        )
        callbacks.append(tuner)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train_set, batch_size=64, shuffle=True))
    seconds = time.perf_counter() - start
    val_loss, val_acc = evaluate(model, val_set)
    test_loss, test_acc = evaluate(model, test_set)
    group = trainer.optimizers[0].param_groups[0]
    return {
        "val_loss": val_loss,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "hparams": {k: float(group[k]) for k in ("lr", "momentum", "weight_decay")},
        "seconds_per_step": seconds / max(trainer.global_step, 1),
        "steps": trainer.global_step,
    }


def main(epochs: int = 20, n_train: int = 1000, seed: int = 0, interval: int = 10):
    """Tuned vs untuned from the same start; returns ``{"tuned": ..., "untuned": ...}``."""
    return {
        "tuned": train(True, epochs, n_train, seed, interval),
        "untuned": train(False, epochs, n_train, seed, interval),
    }


def overhead(runs: int = 3, epochs: int = 20, n_train: int = 1000) -> dict[str, float]:
    """Seconds per optimiser step with and without the callback, ``runs`` alternating runs each (the medians)."""
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(runs):
        times["with"].append(train(True, epochs, n_train)["seconds_per_step"])
        times["without"].append(train(False, epochs, n_train)["seconds_per_step"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"with": med["with"], "without": med["without"], "ratio": med["with"] / med["without"]}


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 epochs on 300 training digits")
    parser.add_argument("--overhead", action="store_true", help="time per step with / without the callback")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _quiet()
    if args.overhead:
        o = overhead()
        print(
            f"seconds per step: with HyperTuner {o['with'] * 1e3:.2f} ms, without {o['without'] * 1e3:.2f} ms, "
            f"ratio {o['ratio']:.2f} (median of 3 alternating runs each)"
        )
    else:
        out = main(epochs=2, n_train=300) if args.small else main()
        for name, r in out.items():
            hp = ", ".join(f"{k} {v:.3g}" for k, v in r["hparams"].items())
            print(
                f"{name:8s} val loss {r['val_loss']:.4f}  test loss {r['test_loss']:.4f}  "
                f"test accuracy {r['test_acc']:.4f}  ({hp}; {r['steps']} steps)"
            )
