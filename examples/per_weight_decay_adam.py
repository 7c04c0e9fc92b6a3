"""One weight decay per weight (Lorraine et al. 2020, sec. 5.2) while torch.optim.Adam steps the weights.

An MLP on 100 of scikit-learn's digits (few examples, so regularisation matters), penalty
``1/2 sum_i lambda_i w_i^2`` with 9,610 decays tuned online by the IFT on the penalised training
loss's stationarity, against the same start with the decay left at its initial 1e-3 (``mode="none"``).
Run ``python examples/per_weight_decay_adam.py [--small]``.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel


def main(epochs=100, n_train=100, seed=0, progress=False):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    tr, va, te = slice(0, n_train), slice(n_train, n_train + 300), slice(n_train + 300, None)
    val = DataLoader(TensorDataset(X[va], y[va]), batch_size=300)
    results = {}
    for mode in ("ift", "none"):
        torch.manual_seed(seed)  # same initial weights and same shuffled batches for both
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        train = DataLoader(TensorDataset(X[tr], y[tr]), batch_size=25, shuffle=True)
        tuner = bilevel.Tuner(
            model,
            loss_fn=F.cross_entropy,
            optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
            penalty=bilevel.PerWeightDecay(model, init=1e-3),
            hyper_lr=0.1,
            strategy=mode,
            progress=progress,
        )
        tuner.fit(train, val, epochs=epochs)
        model.eval()
        with torch.no_grad():
            out = model(X[te])
        decays = torch.cat([v.flatten() for v in tuner.hparams["l2"].values()])
        results[mode] = {
            "test_acc": (out.argmax(1) == y[te]).float().mean().item(),
            "test_loss": F.cross_entropy(out, y[te]).item(),
            "val_loss": tuner.history[-1]["val_loss"],
            "decays": decays.numel(),
            "decay_median": decays.median().item(),
            "decay_range": (decays.min().item(), decays.max().item()),
        }
    return {"tuned": results["ift"], "fixed": results["none"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="25 epochs (a second or two)")
    parser.add_argument("--threads", default="auto", help="CPU threads for torch: N or auto (bilevel.threads)")
    args = parser.parse_args()
    bilevel.threads.set_threads(args.threads if args.threads == "auto" else int(args.threads))
    out = main(epochs=25) if args.small else main()
    for name, r in out.items():
        lo, hi = r["decay_range"]
        print(
            f"{name:5s}  test accuracy {r['test_acc']:.4f}  test loss {r['test_loss']:.4f}  val loss "
            f"{r['val_loss']:.4f}  ({r['decays']} decays, median {r['decay_median']:.3g}, range [{lo:.2g}, {hi:.2g}])"
        )
