"""Lorraine et al. (2020) Sec. 5.3, Fig. 6: dataset distillation with one learned image per class.

Every pixel of ``--per-class`` synthetic images per class is a hyperparameter
(:class:`bilevel.distill.DistilledData`: 7,840 for MNIST, 30,720 for CIFAR-10, 307,200 for CIFAR-100).
The inner model is
logistic regression trained on the synthetic images alone,

    L_T(w, x) = 1/C sum_c CE(W x_c + b, c) + l2/2 ||W||^2

(the small fixed ``--l2`` makes the inner problem strictly convex: ten separable points have no
unregularised minimiser); the outer loss is the cross-entropy on the labelled training set, which is
all validation data here (Lorraine et al. App. E.2), drawn in minibatches of ``--val-batch``.
Algorithm 1 with warm start: ``--interval`` Adam steps on the weights, then one IFT hypergradient
(``--solver``) step on the pixels (Adam, ``--hyper-lr``).

Evaluation: a fresh logistic regression trained from zero on the distilled images alone
(``--eval-steps`` full-batch Adam steps on the same inner loss) is scored on the test set, beside the
same training on one random real image per class (the baseline).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bilevel import tree as T
from bilevel.distill import DistilledData
from bilevel.errors import NonFiniteError
from bilevel.hypergradient import largest_eigenvalue
from bilevel.loop import Every
from bilevel.population import derived_seed
from bilevel.solvers import check_size
from bilevel.strategies import IFT
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import TorchOptimizer

from .. import _common as C

NAME = "distill"
HELP = "Lorraine et al. Fig. 6: dataset distillation (one learned image per class), logistic regression"

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_solver_arguments(p, "neumann", 20)
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="data set to distil (default mnist)")
    p.add_argument("--per-class", type=C.positive_int, default=1, help="learned images per class (default 1)")
    p.add_argument("--hyper-steps", type=C.positive_int, default=300, help="hyperparameter (pixel) steps (default 300)")
    p.add_argument("--interval", type=C.positive_int, default=20, help="weight steps between pixel steps (default 20)")
    p.add_argument("--lr", type=C.positive_float, default=0.01, help="Adam learning rate of the weights (default 0.01)")
    p.add_argument(
        "--hyper-lr", type=C.positive_float, default=0.01, help="Adam learning rate of the pixels (default 0.01)"
    )
    p.add_argument(
        "--l2",
        type=C.positive_float,
        default=1e-3,
        help="fixed L2 on the logistic-regression weights (> 0: keeps the inner problem strictly convex)",
    )
    p.add_argument(
        "--val-batch", type=C.positive_int, default=2000, help="labelled examples per hypergradient (default 2000)"
    )
    p.add_argument(
        "--val-size", type=C.positive_int, default=None, help="use only this many labelled examples (default all)"
    )
    p.add_argument("--eval-steps", type=C.positive_int, default=1000, help="Adam steps to train the evaluation model")
    p.add_argument("--init", default="zeros", choices=("zeros", "normal", "real"), help="pixel initialisation")


def check_arguments(args) -> None:
    C.check_solver_arguments(args)


def load_images(name: str, data_dir, device, dtype):
    """(X_val, y_val, X_test, y_test, image_shape): all official training images as validation data."""
    Xtr, ytr, Xte, yte = C.load_image_set(name, data_dir, NAME)
    shape = tuple(Xtr.shape[1:])

    def prep(X):
        return (X.to(dtype) / 255.0).reshape(len(X), -1).to(device)

    return prep(Xtr), ytr.to(device), prep(Xte), yte.to(device), shape


def _logreg_init(d: int, c: int, dtype, device) -> dict:
    return {"W": torch.zeros(c, d, dtype=dtype, device=device), "b": torch.zeros(c, dtype=dtype, device=device)}


def _forward(p, x):
    return x @ p["W"].T + p["b"]


def train_on(distilled: DistilledData, h: dict, steps: int, lr: float, l2: float, dim: int, dtype, device) -> dict:
    """A logistic regression trained from zero on the distilled set ``h`` alone (full-batch Adam)."""
    p = {k: v.requires_grad_() for k, v in _logreg_init(dim, distilled.num_classes, dtype, device).items()}
    hd = T.detach(h)
    opt = torch.optim.Adam(p.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        inner_loss(distilled, l2)(p, hd).backward()
        opt.step()
    return T.detach(p)


def inner_loss(distilled: DistilledData, l2: float):
    def inner(p, h):
        x = distilled.inputs(h).reshape(distilled.num_points, -1)
        return distilled.cross_entropy(_forward(p, x), h) + 0.5 * l2 * (p["W"] ** 2).sum()

    return inner


def main(args, progress_factory=None, console=None) -> dict:
    from bilevel.report.grids import save_image_grid

    t0 = time.perf_counter()
    out = Path(args.out)
    check_arguments(args)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    Xv, yv, Xte, yte, shape = load_images(args.dataset, args.data_dir, dev, dt)
    if args.val_size is not None:
        Xv, yv = Xv[: args.val_size], yv[: args.val_size]
    C_, dim = int(torch.cat([yv, yte]).max()) + 1, Xv.shape[1]
    gen = torch.Generator().manual_seed(derived_seed(args.seed, 0))
    distilled = DistilledData(shape, C_, per_class=args.per_class)
    real = (Xv.reshape(len(Xv), *shape), yv)
    h = distilled.init(gen, args.init, real if args.init == "real" else None, dtype=dt, device=dev)
    inner = inner_loss(distilled, args.l2)

    w = {k: v.requires_grad_() for k, v in _logreg_init(dim, C_, dt, dev).items()}
    check_size(C.solver_from_args(args, alpha=1.0), T.numel(w))  # an exact solve refused before any training

    # Algorithm 1 (bilevel.tuner.OnlineTuner on one model): torch.optim.Adam steps the weights, Adam the pixels
    def as_raw(nat):  # the distilled points' hyperparameter has the identity transform: natural = raw
        return {f"{distilled.name}/{k}": v for k, v in nat[distilled.name].items()}

    def train_loss(p, nat, batch):
        return inner(p, as_raw(nat))

    def val_loss(p, nat, batch):
        return F.cross_entropy(_forward(p, batch[0]), batch[1])

    val_curve, diverged_at = [], None
    adv = progress_factory(f"distill {args.dataset}", args.hyper_steps) if progress_factory else None
    last_val: list = []  # the validation batch of the hyperparameter step being taken

    def val_batches():
        idx = torch.randint(0, len(Xv), (min(args.val_batch, len(Xv)),), generator=gen).to(dev)
        last_val[:] = [(Xv[idx], yv[idx])]
        return last_val[0]

    def solver_at(tuner):  # Neumann's alpha = 1/lambda_max(H) at the current weights (Lorraine et al. Alg. 3)
        alpha = args.alpha
        if args.solver == "neumann" and alpha is None:
            wd, hd = T.detach(tuner.params), T.detach(tuner.raw)
            alpha = 1.0 / max(largest_eigenvalue(wd, hd, inner=inner, iters=20), 1e-12)
        return C.solver_from_args(args, alpha=alpha, divergence="warn")

    def after_hyper_step(tuner):  # the validation loss of the weights the step was taken at, on its batch
        val_curve.append(float(val_loss(T.detach(tuner.params), None, last_val[0])))
        if adv:
            adv(1)

    loop = OnlineTuner(
        T.detach(w),
        h,
        distilled.space,
        TorchOptimizer(torch.optim.Adam(w.values(), lr=args.lr), w),
        train_loss,
        val_loss,
        stacked=False,
        config=TunerConfig(tuned=distilled.space.names, hyper_lr=args.hyper_lr, on_divergence="raise"),
        callbacks=[SimpleNamespace(on_hyper_step=after_hyper_step)],
        strategy=IFT(implicit="loss", solver_at=solver_at),
        schedule=Every(args.interval),
    )
    try:
        loop.run(args.interval * args.hyper_steps, lambda: None, val_batches)
    except NonFiniteError as e:  # a non-finite hypergradient: record the run as diverged, keep the last pixels
        if e.step != loop.t:  # a weight step's (step = the one not taken): not a hyperparameter step's
            raise
        diverged_at = loop.hyper_steps  # the index of the hyperparameter step that failed
    h = T.detach(loop.raw)

    # evaluation: from scratch on the distilled images alone, and on random real images (baseline)
    def test_acc(hh):
        p = train_on(distilled, hh, args.eval_steps, 0.01, args.l2, dim, dt, dev)
        return C.accuracy(C.batched_logits(_forward, p, Xte), yte)

    acc = test_acc(h)
    base_h = distilled.init(
        torch.Generator().manual_seed(derived_seed(args.seed, 1)), "real", real, dtype=dt, device=dev
    )
    base = test_acc(base_h)
    images = distilled.inputs(T.detach(h))
    labels = [str(c) for c in distilled.labels.tolist()] if C_ <= 20 else None  # no captions for 100 classes
    save_image_grid(
        images,
        out / "distilled.png",
        nrow=C_ if args.per_class > 1 else min(C_, 10),
        labels=labels,
        title=f"distilled {args.dataset}: test accuracy {acc:.3f}",
    )
    save_image_grid(
        distilled.inputs(base_h),
        out / "baseline_real.png",
        nrow=min(C_, 10),
        labels=labels,
        title=f"random real images: test accuracy {base:.3f}",
    )
    doc = {
        "experiment": NAME,
        "dataset": args.dataset,
        "seconds": time.perf_counter() - t0,
        "config": C.config_of(args),
        "num_hyperparameters": images.numel(),
        "metrics": {
            "test_accuracy": acc,
            "baseline_test_accuracy": base,
            "final_val_loss": val_curve[-1] if val_curve else None,
            "diverged_at": diverged_at,
        },
        "curves": {"val_loss": val_curve},
    }
    C.write_results(out, doc)
    C.print_table(
        f"dataset distillation, {args.dataset}: logistic regression trained on {distilled.num_points} "
        f"images ({images.numel()} pixel hyperparameters)",
        ["training set", "test accuracy"],
        [["distilled (learned)", acc], ["random real, one per class", base]],
        console,
    )
    return doc
