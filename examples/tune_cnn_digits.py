"""Online tuning of SGD's learning rate, momentum and weight decay for a small CNN on scikit-learn's digits.

The same model, start and batches trained twice: hyperparameters tuned online by IFT hypergradients
(Clarke et al. 2022; every 10 weight steps one Adam(0.05) step on log10 lr, logit momentum, log10 decay),
and left fixed (``mode="none"``). Run ``python examples/tune_cnn_digits.py [--small] [--bf16]``
(``--bf16``: the same runs with the forward passes under ``torch.autocast`` in bfloat16, beside float32).
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(epochs=10, n_train=1000, seed=0, progress=False, autocast=None):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    tr, va, te = slice(0, n_train), slice(1000, 1400), slice(1400, None)  # test: the last 397 digits
    val = DataLoader(TensorDataset(X[va], y[va]), batch_size=200)
    results = {}
    for mode in ("ift", "none"):
        torch.manual_seed(seed)  # same initial weights and same shuffled batches for both
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)
        )
        train = DataLoader(TensorDataset(X[tr], y[tr]), batch_size=64, shuffle=True)
        tuner = bilevel.Tuner(
            model,
            loss_fn=F.cross_entropy,
            optimizer=bilevel.optim.SGD(lr=3e-3, momentum=0.5, weight_decay=1e-4),
            tune=("lr", "momentum", "weight_decay"),
            strategy=mode,
            progress=progress,
            autocast=autocast,
        )
        start = time.perf_counter()
        tuner.fit(train, val, epochs=epochs)
        results[mode] = {
            "seconds": time.perf_counter() - start,
            "test_acc": accuracy(model, X[te], y[te]),
            "val_loss": tuner.history[-1]["val_loss"],
            "hparams": tuner.hparams,
        }
    return {"tuned": results["ift"], "fixed": results["none"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="2 epochs on 300 training digits (a few seconds)")
    parser.add_argument("--threads", default="auto", help="CPU threads for torch: N or auto (bilevel.threads)")
    parser.add_argument("--bf16", action="store_true", help="also run with bfloat16 autocast and compare")
    args = parser.parse_args()
    bilevel.threads.set_threads(args.threads if args.threads == "auto" else int(args.threads))
    size = dict(epochs=2, n_train=300) if args.small else {}
    for dtype in (None, torch.bfloat16) if args.bf16 else (None,):
        out = main(**size, autocast=dtype)
        for name, r in out.items():
            hp = ", ".join(f"{k} {v:.3g}" for k, v in r["hparams"].items())
            tag = f"{name:5s}" + (" bf16" if dtype is not None else "")
            acc, loss = r["test_acc"], r["val_loss"]
            print(f"{tag}  test accuracy {acc:.4f}  val loss {loss:.4f}  {r['seconds']:.1f} s  ({hp})")
