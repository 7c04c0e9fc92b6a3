"""One weight per training example, learned by ``bilevel.OnlineTuner`` (data reweighting).

Softmax regression on 300 digits, 30 % of whose labels are replaced by another class; hyperparameters:
a logit a_i per example (weight sigmoid(a_i)); inner: weighted training loss + 1/2 c ||W||^2; outer:
loss on 200 clean validation digits. Lorraine et al. (2020) Alg. 1, warm start, run by the tuner's loop:
20 weight steps (SGD with momentum 0.9, its buffer kept across hyperparameter steps), one IFT hypergradient
on the training loss (eq. 2-3, conjugate gradient), one Adam step. ``python examples/reweight_noisy_labels.py
[--small]``
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import bilevel


def main(hyper_steps=100, n_train=300, noise=0.3, c=1e-3, seed=0):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float64) / 16, torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    X, y = X[perm], y[perm]
    Xt, yt, Xv, yv = X[:n_train], y[:n_train].clone(), X[n_train : n_train + 200], y[n_train : n_train + 200]
    Xs, ys = X[n_train + 200 :], y[n_train + 200 :]  # test
    flipped = torch.rand(n_train, generator=g) < noise  # replace the label by one of the 9 others
    yt[flipped] = (yt[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=g)) % 10

    logits = lambda p, x: x @ p["W"] + p["b"]  # noqa: E731

    def inner(p, h):  # weighted mean training loss (+ a small L2 term: the Hessian is positive definite)
        w = torch.sigmoid(h["a"])
        return (w * F.cross_entropy(logits(p, Xt), yt, reduction="none")).sum() / w.sum() + 0.5 * c * (
            p["W"] ** 2
        ).sum()

    def outer(p, h):  # clean validation loss
        return F.cross_entropy(logits(p, Xv), yv)

    def train(p, a, steps):  # a fresh model on fixed example weights (the final comparison)
        p = {k: v.clone().requires_grad_() for k, v in p.items()}
        opt = torch.optim.SGD(p.values(), lr=0.5, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            inner(p, {"a": a}).backward()
            opt.step()
        return {k: v.detach() for k, v in p.items()}

    p0 = {"W": torch.zeros(64, 10, dtype=torch.float64), "b": torch.zeros(10, dtype=torch.float64)}
    # Algorithm 1 on one model: the raw tensor "a" is the (loss-form) hyperparameter, no space; full batches
    interval = 20
    tuner = bilevel.OnlineTuner(
        p0,
        {"a": torch.zeros(n_train, dtype=torch.float64)},
        None,
        bilevel.optim.SGD(lr=0.5, momentum=0.9),
        lambda p, h, batch: inner(p, h),
        lambda p, h, batch: outer(p, h),
        config=bilevel.TunerConfig(
            tuned=("a",),
            implicit="loss",
            solver=bilevel.ConjugateGradient(20),
            interval=interval,
            hyper_lr=0.1,
            on_divergence="raise",
        ),
        stacked=False,
    )
    tuner.run(hyper_steps * interval, lambda: None, lambda: None)
    a = tuner.raw["a"].detach()
    w = torch.sigmoid(a)
    acc = lambda p, x, y: (logits(p, x).argmax(1) == y).double().mean().item()  # noqa: E731
    uniform, reweighted = train(p0, torch.zeros(n_train, dtype=torch.float64), 1000), train(p0, a, 1000)
    return {
        "weight_flipped": w[flipped].mean().item(),
        "weight_clean": w[~flipped].mean().item(),
        "flipped_in_lowest": flipped[w.argsort()[: int(flipped.sum())]].double().mean().item(),
        "val_acc": {"uniform": acc(uniform, Xv, yv), "reweighted": acc(reweighted, Xv, yv)},
        "test_acc": {"uniform": acc(uniform, Xs, ys), "reweighted": acc(reweighted, Xs, ys)},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="30 hyperparameter steps (seconds)")
    parser.add_argument("--threads", default="auto", help="CPU threads for torch: N or auto (bilevel.threads)")
    args = parser.parse_args()
    bilevel.threads.set_threads(args.threads if args.threads == "auto" else int(args.threads))
    out = main(hyper_steps=30) if args.small else main()
    print(
        f"mean weight: flipped {out['weight_flipped']:.3f}, clean {out['weight_clean']:.3f}; "
        f"flipped among the lowest-weighted: {out['flipped_in_lowest']:.3f}"
    )
    for split in ("val_acc", "test_acc"):
        print(f"{split}: uniform {out[split]['uniform']:.4f}, reweighted {out[split]['reweighted']:.4f}")
