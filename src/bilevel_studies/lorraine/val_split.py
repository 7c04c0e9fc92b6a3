"""Lorraine et al. (2020) Sec. 5.6, Fig. 9: how large should the validation split be for many hyperparameters?

Logistic regression on MNIST. A seeded pool of ``--pool`` official training images is split into
training and validation parts for every validation fraction in ``--fractions``. For each split the
weight decay is tuned by Algorithm 1 (:class:`bilevel.tuner.OnlineTuner`, minibatch SGD on the
weights, IFT hypergradients with ``--solver`` on ``log10`` decays) in two regimes: one global decay
(1 hyperparameter) and one decay per weight (7,850). Reported: the test accuracy of the jointly
optimised weights, and after re-training from scratch on training + validation data with the tuned
decays held fixed (Lorraine et al.: "fixing the final optimized hyperparameters and re-training").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bilevel import weight_decay as WD
from bilevel.rundir import atomic_savefig

from .. import _common as C
from .._parts import cached_part, say_resumed, settings_key
from .overfit_validation import solver_label

NAME = "val-split"
HELP = "Lorraine et al. Fig. 9: validation fraction vs test accuracy, global vs per-weight decay, with re-training"


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_solver_arguments(p, "neumann", 10, alpha=1.0)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"), help="data set (default mnist)")
    p.add_argument(
        "--pool", type=C.int_at_least(2), default=6000, help="training + validation images (default 6000; paper 60000)"
    )
    p.add_argument(
        "--fractions",
        type=C.float_list(0, 1, open_low=True, open_high=True),
        default=[0.1, 0.25, 0.5, 0.75, 0.9],
        help="comma-separated validation fractions, each in (0, 1)",
    )
    p.add_argument("--test-size", type=C.positive_int, default=10000, help="test images used (default all)")
    p.add_argument("--iterations", type=C.positive_int, default=1000, help="weight steps when tuning and re-training")
    p.add_argument("--interval", type=C.positive_int, default=10, help="weight steps between hyper steps (default 10)")
    p.add_argument("--batch-size", type=C.positive_int, default=256, help="minibatch size (default 256)")
    p.add_argument("--lr", type=C.positive_float, default=0.1, help="SGD learning rate of the weights (default 0.1)")
    p.add_argument("--hyper-lr", type=C.positive_float, default=0.03, help="RMSprop learning rate of log10 decays")
    p.add_argument("--init-decay", type=C.positive_float, default=1e-3, help="initial weight decay")


def check_arguments(args) -> None:
    C.check_solver_arguments(args)
    bad = [f for f in args.fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"{NAME}: validation fractions must lie in (0, 1), got {bad}")
    empty = [f for f in args.fractions if max(1, int(round(f * args.pool))) >= args.pool]
    if empty:
        raise ValueError(f"{NAME}: validation fractions {empty} of --pool {args.pool} leave no training images")


def main(args, progress_factory=None, console=None) -> dict:
    from bilevel.data import load_mnist

    t0 = time.perf_counter()
    out = Path(args.out)
    check_arguments(args)
    fractions = [float(f) for f in args.fractions]
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    Xtr, ytr, Xte, yte = load_mnist(args.data_dir, fashion=args.dataset == "fashion-mnist")
    if args.pool > len(Xtr):
        raise ValueError(f"{NAME}: --pool {args.pool} exceeds the {len(Xtr)} training images")
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(args.seed))[: args.pool]
    X = (Xtr[perm].to(dt) / 255.0).reshape(args.pool, -1).to(dev)
    y = ytr[perm].to(dev)
    Xt = (Xte[: args.test_size].to(dt) / 255.0).reshape(-1, X.shape[1]).to(dev)
    yt = yte[: args.test_size].to(dev)
    rows, results = [], {"global": [], "per-weight": []}
    metrics: dict = {"global": {}, "per-weight": {}}
    resumed: list[str] = []
    adv = progress_factory("val-split", 2 * len(fractions) * 2 * args.iterations) if progress_factory else None
    for regime in ("global", "per-weight"):
        for f in fractions:
            key = settings_key(args, drop=("fractions",), regime=regime, val_fraction=f)
            r, again = cached_part(
                out / "parts" / f"{regime}-{f!r}.json",
                key,
                lambda regime=regime, f=f: run_split(args, regime, f, X, y, Xt, yt, adv),
            )
            if again:
                resumed.append(f"{regime} {f:g}")
                if adv:
                    adv(2 * args.iterations)
            results[regime].append(r)
            metrics[regime][str(f)] = {k: r[k] for k in ("test_accuracy", "retrained_test_accuracy", "val_accuracy")}
            rows.append(
                [
                    regime,
                    f,
                    r["n_train"],
                    r["n_val"],
                    r["test_accuracy"],
                    r["retrained_test_accuracy"],
                    r["weight_decay"]["median"],
                ]
            )
    best = {
        reg: {
            kind: max((r for r in rs if r[kind] is not None), key=lambda r: r[kind], default={}).get("val_fraction")
            for kind in ("test_accuracy", "retrained_test_accuracy")
        }
        for reg, rs in results.items()
    }
    doc = {
        "experiment": NAME,
        "dataset": args.dataset,
        "seconds": time.perf_counter() - t0,
        "config": C.config_of(args),
        "metrics": {"best_val_fraction": best, **metrics},
        "results": results,
        "resumed": resumed,
    }
    C.write_results(out, doc)
    _plot(results, args.dataset, out / "val_split.png")
    say_resumed(NAME, "part(s)", resumed, out / "parts", console)
    C.print_table(
        f"test accuracy of logistic regression on {args.dataset} vs validation fraction "
        f"(pool {args.pool}, {args.iterations} steps, {solver_label(args)})",
        ["regime", "val fraction", "n train", "n val", "test acc (joint)", "test acc (re-trained)", "median decay"],
        rows,
        console,
    )
    return doc


def run_split(args, regime: str, f: float, X, y, Xt, yt, progress=None) -> dict:
    """One regime (``global`` / ``per-weight``) at one validation fraction: tune, then re-train (JSON-ready)."""
    from bilevel.nets.mlp import mlp_forward, mlp_init

    dev, dt = X.device, X.dtype
    n_val = max(1, int(round(f * args.pool)))
    train, val = (X[n_val:], y[n_val:]), (X[:n_val], y[:n_val])
    common = dict(
        per_weight=regime == "per-weight",
        solver=C.solver_from_args(args, alpha=1.0, divergence="ignore"),
        steps=args.iterations,
        interval=args.interval,
        lr=args.lr,
        hyper_lr=args.hyper_lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress,
    )
    init = mlp_init([X.shape[1], 10], torch.Generator().manual_seed(args.seed), dtype=dt)
    init = {k: v.to(dev) for k, v in init.items()}
    tuner = WD.tune_weight_decay(mlp_forward, init, train, val, init_decay=args.init_decay, **common)
    joint = tuner.history.diverged_at[0] is None
    acc_joint = C.accuracy(mlp_forward(_member(tuner), Xt), yt) if joint else None
    acc_val = C.accuracy(mlp_forward(_member(tuner), val[0]), val[1]) if joint else None
    retrainer = WD.tune_weight_decay(
        mlp_forward, init, (X, y), val, raw=WD.tuned_raw(tuner), **{**common, "tune": False}
    )
    ok = retrainer.history.diverged_at[0] is None
    acc_re = C.accuracy(mlp_forward(_member(retrainer), Xt), yt) if ok else None
    return {
        "val_fraction": f,
        "n_train": args.pool - n_val,
        "n_val": n_val,
        "test_accuracy": acc_joint,
        "retrained_test_accuracy": acc_re,
        "val_accuracy": acc_val,
        "weight_decay": WD.decay_summary(tuner),
    }


def _member(tuner) -> dict:
    from bilevel.population import member

    return member(tuner.params, 0)


def _plot(results: dict, dataset: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for regime, style in (("global", "-"), ("per-weight", ":")):
        rs = results[regime]
        fr = [r["val_fraction"] for r in rs]
        for kind, marker in (("test_accuracy", "o"), ("retrained_test_accuracy", "s")):
            ax.plot(
                fr,
                [float("nan") if r[kind] is None else r[kind] for r in rs],
                style,
                marker=marker,
                label=f"{regime}, {'re-trained' if kind.startswith('re') else 'joint'}",
            )
    ax.set(xlabel="validation fraction", ylabel="test accuracy", title=f"logistic regression, {dataset}")
    ax.legend(fontsize=8)
    atomic_savefig(fig, path, dpi=110)
