"""Lorraine et al. (2020) Sec. 5.2, Fig. 5 and App. E.1 Fig. 10: overfitting a small validation set.

50 training and 50 validation images (seeded draw from the official training set; the official test
set for testing), one weight-decay hyperparameter per weight (:func:`bilevel.hparams.per_weight_decay`,
``log10`` space), tuned by Algorithm 1 (:class:`bilevel.tuner.OnlineTuner`: ``--interval`` full-batch
SGD steps on the weights, then one IFT hypergradient step with ``--solver`` on the decays, RMSprop as
in App. E). Models: logistic regression (``linear``), a one-hidden-layer ReLU MLP as wide as the input
(``mlp``), ``lenet``, and the options ``alexnet`` and ``resnet44`` (slow on a CPU). The claim: 100%
training and validation accuracy, with much lower test accuracy.

``--preset authors`` is the set-up of the authors' ``mnist_test.py`` (:data:`AUTHORS_PRESET`; with ``--hyper-lr
0.0434``, their intended ``lrh = 0.1``, LeNet reaches 100% validation accuracy), ``--stop-at-perfect`` their
``break_perfect_val``; results.json has, per model, ``by_layer``: how far each parameter tensor's decays
moved and its last hypergradient. ``python -m bilevel_studies.lorraine.overfit_fd_check`` checks the hypergradient
of a conv net against finite differences (:mod:`bilevel_studies.lorraine.overfit_fd_check`).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bilevel import weight_decay as WD
from bilevel.rundir import atomic_savefig

from .. import _common as C
from .._parts import cached_part, say_resumed, settings_key

NAME = "overfit-validation"
HELP = "Lorraine et al. Fig. 5/10: per-weight decay overfits 50 validation images (train/val/test accuracy)"

MODELS = ("linear", "mlp", "lenet", "alexnet", "resnet44")


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_solver_arguments(p, "neumann", 20, alpha=1.0)
    p.add_argument(
        "--dataset",
        default="mnist",
        choices=("mnist", "fashion-mnist", "cifar10"),
        help="image data set (default mnist; cifar10 when its files are present)",
    )
    p.add_argument("--models", default="linear,mlp,lenet", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--n-train", type=C.positive_int, default=50, help="training images (default 50)")
    p.add_argument("--n-val", type=C.positive_int, default=50, help="validation images (default 50)")
    p.add_argument(
        "--test-size", type=C.positive_int, default=10000, help="test images used (default: the whole test set)"
    )
    p.add_argument("--iterations", type=C.positive_int, default=2000, help="weight steps (default 2000)")
    p.add_argument("--interval", type=C.positive_int, default=10, help="weight steps between hyper steps (default 10)")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=WD.OPTIMIZERS,
        help="weight optimiser (default sgd; 'adam' is App. E's choice, see docs/lorraine.md for how it fared)",
    )
    p.add_argument(
        "--lr",
        type=C.positive_float,
        default=0.1,
        help="learning rate of the weights (default 0.1; App. E uses Adam with 1e-4)",
    )
    p.add_argument(
        "--implicit",
        choices=("loss", "update"),
        default=None,
        help="IFT fixed point: 'loss' = Hessian of the training loss (Lorraine et al. Alg. 2-3; default "
        "with adam), 'update' = Jacobian of the optimiser step (Clarke et al.; default with sgd)",
    )
    p.add_argument(
        "--hyper-lr",
        type=C.positive_float,
        default=0.05,
        help="RMSprop learning rate of the log10 decays (default 0.05; App. E: 1e-2)",
    )
    p.add_argument(
        "--hyper-eps",
        type=C.positive_float,
        default=1e-8,
        help="RMSprop eps of the decay steps (default 1e-8, torch's); hypergradients of log10 decays are "
        "often far below it, so a smaller eps lets every decay move",
    )
    p.add_argument(
        "--init-decay",
        type=C.finite_float,
        default=1e-3,
        help="initial weight decay of every weight (> 0; any sign with --signed)",
    )
    p.add_argument(
        "--signed",
        action="store_true",
        help="tune the decays themselves, either sign (identity transform, clipped to [-1/lr, 1/lr] with "
        "SGD) instead of log10 decays, which can only shrink weights",
    )
    p.add_argument("--eval-every", type=C.positive_int, default=100, help="record accuracies every N weight steps")
    p.add_argument(
        "--stop-at-perfect",
        action="store_true",
        help="stop a model at the first evaluation with 100%% training and validation accuracy (as the authors' "
        "mnist_test.py, break_perfect_val); --iterations is then the most weight steps",
    )
    p.add_argument(
        "--width",
        type=C.positive_float,
        default=1.0,
        help="width multiplier of alexnet (channels and units; default 1.0) and of resnet44 (x16 channels)",
    )
    p.add_argument(
        "--preset",
        choices=("none", "authors"),
        default="none",
        help="'authors': the set-up of the authors' mnist_test.py (setup_overfit_validation): Adam 1e-4 on the "
        "weights, 5 weight steps per hyper step, identity inverse Hessian on the training loss, penalty "
        "exp(theta) w^2 with theta = -4 (our 1/2 lambda w^2 with lambda = 2 e^-4), RMSprop 0.01 on theta "
        "(0.01/ln 10 on log10 lambda); it sets those options that are left at their defaults. Their "
        "setup_overfit_images asks for lrh = 0.1 on MNIST but never passes it to RMSprop: add --hyper-lr 0.0434 "
        "(0.1/ln 10) for that, with which LeNet reaches 100%% validation accuracy (docs/lorraine.md)",
    )


#: ``--preset authors``: the options of ThrunGroup/implicit-hyper-opt ``mnist_test.py`` (``setup_overfit_validation``
#: and ``setup_overfit_images``) in this study's units. Their penalty ``sum exp(theta_i) w_i^2`` is our
#: ``1/2 sum lambda_i w_i^2`` with ``lambda_i = 2 exp(theta_i)``, ``theta = -4`` initially; their RMSprop (torch
#: defaults: lr 0.01, eps 1e-8) steps ``theta = ln(lambda / 2)``, i.e. ``log10 lambda`` by lr ``0.01 / ln 10``
#: with eps ``1e-8 * ln 10``; ``hessian='identity'``: the hypergradient ``-(dL_V/dw) d^2 L_T / dw dtheta``.
AUTHORS_PRESET = {
    "optimizer": "adam",
    "lr": 1e-4,
    "interval": 5,
    "solver": "identity",
    "implicit": "loss",
    "init_decay": 2 * math.exp(-4),
    "hyper_lr": 0.01 / math.log(10),
    "hyper_eps": 1e-8 * math.log(10),
}


def apply_preset(args, defaults: dict | None = None) -> None:
    """Set the :data:`AUTHORS_PRESET` options that are still at their parser defaults (``--preset authors``)."""
    if getattr(args, "preset", "none") != "authors":
        return
    if defaults is None:
        p = argparse.ArgumentParser()
        add_arguments(p)
        defaults = {a.dest: a.default for a in p._actions}
    for k, v in AUTHORS_PRESET.items():
        if getattr(args, k) == defaults.get(k):
            setattr(args, k, v)


def check_arguments(args) -> None:
    apply_preset(args)
    C.check_solver_arguments(args)
    C.check_names("--models", C.names(args.models), MODELS)
    if not args.signed and not args.init_decay > 0:
        raise ValueError(f"--init-decay must be > 0 (log10 decays; use --signed for any sign), got {args.init_decay}")


def load_small(name: str, n_train: int, n_val: int, test_size: int, seed: int, data_dir, device, dtype):
    """(train, val, test) pairs of (N, C, H, W) images in [0, 1]: seeded draws from the official train set."""
    Xtr, ytr, Xte, yte = C.load_image_set(name, data_dir, NAME)
    if n_train + n_val > len(Xtr):
        raise ValueError(f"{NAME}: {n_train} + {n_val} images requested but {name} has {len(Xtr)} training images")
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(seed))

    def prep(X, y):
        X = X.to(dtype) / 255.0
        return (X.unsqueeze(1) if X.dim() == 3 else X).to(device), y.to(device)

    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    return prep(Xtr[tr], ytr[tr]), prep(Xtr[va], ytr[va]), prep(Xte[:test_size], yte[:test_size])


def build_model(
    name: str, shape: tuple[int, ...], num_classes: int, gen: torch.Generator, dtype, device, width: float = 1.0
):
    """(forward(params, x), params) for one of :data:`MODELS`; ``x`` is (N, C, H, W). ``width`` scales alexnet
    (:class:`bilevel.nets.convnets.AlexNet`) and resnet44 (``16 * width`` stem channels)."""
    from bilevel.nets import convnets
    from bilevel.nets.mlp import mlp_forward, mlp_init
    from bilevel.population import module_forward

    c, hgt, _ = shape
    d = c * hgt * hgt
    if name in ("linear", "mlp"):
        sizes = [d, num_classes] if name == "linear" else [d, d, num_classes]
        params = {k: v.to(device) for k, v in mlp_init(sizes, gen, dtype=dtype).items()}
        return (lambda p, x: mlp_forward(p, x.reshape(x.shape[0], -1))), params
    if name == "lenet":
        module = convnets.LeNet(c, num_classes, hgt)
    elif name == "alexnet":
        module = convnets.AlexNet(c, num_classes, hgt, width=width)
    elif name == "resnet44":
        module = convnets.resnet44(c, num_classes, width=max(1, round(16 * width)))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    module = module.to(device=device, dtype=dtype)
    params = convnets.module_init(module, gen)
    return module_forward(module), params


def tune(args, forward, params, train, val, on_eval=None, progress=None):
    """Algorithm 1 with one decay per weight on full batches: what :func:`bilevel.weight_decay.tune_weight_decay`
    builds (the same :class:`~bilevel.tuner.OnlineTuner`, space, penalty, rule, RMSprop and seed, so the same
    numbers), driven here so that a run can stop at the first evaluation with 100% training and validation
    accuracy (``--stop-at-perfect``; ``on_eval(t, params)`` returns ``(train_acc, val_acc)``)."""
    from bilevel import population as pop
    from bilevel.solvers import check_size
    from bilevel.tuner import OnlineTuner, TunerConfig
    from bilevel.updates import SGD, Adam

    solver = C.solver_from_args(args, alpha=1.0, divergence="ignore")
    check_size(solver, sum(v.numel() for v in params.values()))
    implicit = args.implicit or ("update" if args.optimizer == "sgd" else "loss")
    max_decay = 1.0 / args.lr if args.optimizer == "sgd" else None
    space = WD.decay_space(True, max_decay=max_decay, signed=args.signed)
    raw = space.from_natural(params, {WD.DECAY: args.init_decay})
    cfg = TunerConfig(
        tuned=(WD.DECAY,),
        interval=args.interval,
        mode="ift",
        solver=solver,
        hyper_lr=args.hyper_lr,
        hyper_optimizer=functools.partial(torch.optim.RMSprop, eps=args.hyper_eps),
        record_every=10**9,
        implicit=implicit,
    )
    rule = SGD(lr=args.lr) if args.optimizer == "sgd" else Adam(lr=args.lr)
    loss = pop.vmap_loss(forward, F.cross_entropy)
    tuner = OnlineTuner(
        pop.stack([dict(params)]),
        pop.stack([{k: v.detach() for k, v in raw.items()}]),
        space,
        rule,
        loss,
        loss,
        penalty=WD.weight_decay_penalty,
        config=cfg,
    )
    done, chunk = 0, args.eval_every
    if on_eval is not None:
        on_eval(0, pop.member(tuner.params, 0))
    while done < args.iterations:
        n = min(chunk, args.iterations - done)
        tuner.run(n, lambda: train, lambda: val, progress=progress)
        done += n
        if on_eval is not None:
            tr, va = on_eval(done, pop.member(tuner.params, 0))
            if args.stop_at_perfect and tr >= 0.999 and va >= 0.999 and tuner.history.diverged_at[0] is None:
                break
    return tuner, done


def layer_summary(tuner, init_decay: float, train, val) -> dict:
    """Per parameter tensor: how far its decays moved (``log10`` distance from the initial decay: median, share
    moved by more than 0.1 decade, median decay, share at the clip bounds) and the size of its last
    hypergradient (RMS of ``dL_V/dlog10 lambda`` at the final weights, share of exact zeros)."""
    raw = {k: v.detach() for k, v in tuner.raw.items()}
    nat = tuner.natural(raw)[WD.DECAY]
    try:
        hg = tuner.hypergradient(train, val)
    except Exception as e:  # a diagnostic only: a diverged member has no finite hypergradient
        hg, err = {}, f"{type(e).__name__}: {e}"
    else:
        err = None
    out: dict = {}
    for name, lam in nat.items():
        lam = lam[0].detach().to(torch.float64).reshape(-1)
        pos = lam.abs().clamp_min(1e-300)
        moved = (pos.log10() - math.log10(abs(init_decay))).abs()
        row = {
            "count": lam.numel(),
            "median_decay": float(lam.median()),
            "median_log10_move": float(moved.median()),
            "share_moved_0.1_decade": float((moved > 0.1).to(torch.float64).mean()),
            "share_at_lower_clip": float((pos <= 1.0000001e-12).to(torch.float64).mean()),
        }
        g = hg.get(f"{WD.DECAY}/{name}")
        if g is not None:
            g = g[0].to(torch.float64).reshape(-1)
            row["hypergradient_rms"] = float(g.pow(2).mean().sqrt())
            row["hypergradient_share_zero"] = float((g == 0).to(torch.float64).mean())
        out[name] = row
    if err is not None:
        out["_error"] = err
    return out


def run_model(args, name: str, train, val, test, progress=None) -> dict:
    """Algorithm 1 on one model: its accuracies along the run, final accuracies and decay summary (JSON-ready)."""
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    num_classes = int(torch.cat([train[1], val[1], test[1]]).max()) + 1
    gen = torch.Generator().manual_seed(args.seed)
    forward, params = build_model(name, tuple(train[0].shape[1:]), num_classes, gen, dt, dev, args.width)
    curves: dict[str, list] = {"step": [], "train": [], "val": [], "test": []}

    def on_eval(t, p):
        curves["step"].append(t)
        for split, (X, y) in (("train", train), ("val", val), ("test", test)):
            curves[split].append(C.accuracy(C.batched_logits(forward, p, X, 1000), y))
        return curves["train"][-1], curves["val"][-1]

    tuner, steps = tune(args, forward, params, train, val, on_eval=on_eval, progress=progress)
    diverged = tuner.history.diverged_at[0]
    out = {
        "num_hyperparameters": sum(v.numel() for v in params.values()),
        "final": {s: (curves[s][-1] if diverged is None else None) for s in ("train", "val", "test")},
        "curves": curves,
        "diverged_at": diverged,
        "weight_decay": WD.decay_summary(tuner),
        "seconds": tuner.history.seconds,
    }
    if args.stop_at_perfect:
        out["steps"] = steps
    out["by_layer"] = layer_summary(tuner, args.init_decay, train, val)
    return out


def main(args, progress_factory=None, console=None) -> dict:
    """Every model is one part (``out/parts/<model>.json``, keyed by the options that produced it): re-running
    the same command skips the models already finished; changing an option recomputes them."""
    t0 = time.perf_counter()
    out = Path(args.out)
    check_arguments(args)
    models = C.names(args.models)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    train, val, test = load_small(
        args.dataset, args.n_train, args.n_val, args.test_size, args.seed, args.data_dir, dev, dt
    )
    results: dict = {}
    resumed: list[str] = []
    for name in models:
        key = settings_key(args, drop=("models",), model=name)
        results[name], again = cached_part(
            out / "parts" / f"{name}.json",
            key,
            lambda name=name: run_model(
                args, name, train, val, test, progress_factory(f"{name}", args.iterations) if progress_factory else None
            ),
        )
        if again:
            resumed.append(name)
    doc = {
        "experiment": NAME,
        "dataset": args.dataset,
        "seconds": time.perf_counter() - t0,
        "config": C.config_of(args),
        "metrics": {name: r["final"] for name, r in results.items()},
        "models": results,
        "resumed": resumed,
    }
    C.write_results(out, doc)
    _plot(results, args.dataset, out / "overfit_validation.png")
    say_resumed(NAME, "model(s)", resumed, out / "parts", console)
    C.print_table(
        f"overfitting {args.n_val} validation images of {args.dataset} with per-weight decay "
        f"({args.iterations} steps, {solver_label(args)})",
        ["model", "hyperparameters", "train acc", "val acc", "test acc", "median decay", "weight steps"],
        [
            [
                n,
                r["num_hyperparameters"],
                r["final"]["train"],
                r["final"]["val"],
                r["final"]["test"],
                r["weight_decay"]["median"],
                r.get("steps", args.iterations),
            ]
            for n, r in results.items()
        ],
        console,
    )
    rows = []
    for n, r in results.items():
        for layer, row in r.get("by_layer", {}).items():
            if layer.startswith("_"):
                continue
            rows.append(
                [
                    f"{n} {layer}",
                    row["count"],
                    row["median_decay"],
                    row["median_log10_move"],
                    row["share_moved_0.1_decade"],
                    row.get("hypergradient_rms", "n/a"),
                ]
            )
    C.print_table(
        "decays by layer at the end (log10 distance from the initial decay; last hypergradient of log10 decays)",
        ["layer", "decays", "median decay", "median |move|", "share moved >0.1", "hypergrad RMS"],
        rows,
        console,
    )
    return doc


def solver_label(args) -> str:
    """``--solver``/``--lookback`` in words: Neumann k *steps* sum k + 1 terms of the series."""
    if args.solver == "neumann":
        return f"neumann, {args.lookback} steps ({args.lookback + 1} terms)"
    if args.solver == "cg":
        return f"cg, {args.lookback} iterations"
    return args.solver


def _plot(results: dict, dataset: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(results), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, r) in zip(axes, results.items()):
        for split in ("train", "val", "test"):
            ax.plot(r["curves"]["step"], r["curves"][split], label=split)
        ax.set(title=f"{name} ({dataset})", xlabel="weight step", ylabel="accuracy", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=110)
