"""Lorraine et al. (2020) Sec. 5.1, Fig. 3 and Fig. 4: how good are the inverse-Hessian approximations?

Part 1 (Fig. 3). A linear model on Boston housing with one weight decay per weight (loss-form
L2 ``1/2 sum lambda_i w_i^2``, ``log10 lambda`` the raw hyperparameter) is tuned by Algorithm 1
(``--interval`` SGD steps, then one hyperparameter step with the ``--solver`` hypergradient).
Every ``--compare-every`` hyperparameter steps, at the current weights, the hypergradient with the
exact inverse Hessian (dense solve) is compared with Neumann (Alg. 3, ``alpha = 1/lambda_max(H)``)
and conjugate gradient for ``0..--max-steps`` steps / iterations (Neumann with k steps sums k + 1 terms,
``alpha * sum_{j=0..k} (I - alpha H)^j``): cosine similarity and L2 distance.

``--fig3-model net`` runs part 1 on a 1-hidden-layer tanh network (``--fig3-hidden`` units, one decay per
weight), where the compared step counts are far below the number of weights, so CG is not exact by finite
termination. ``--approximations authors`` compares instead the two inversions of the authors' public
``inverse_comparison.py`` (ThrunGroup/implicit-hyper-opt): its Neumann series runs on the rank-one outer product
``g g^T`` of the training gradient (step ``--lr``, no leading alpha, stopped when a term stops shrinking) and its
CG solves ``v v^T x = v`` (``v`` the validation gradient) from ``x0 = v`` (:class:`AuthorsNeumann`,
:class:`AuthorsCG`). That file has no Boston data, no linear model and no exact reference: it fine-tunes a
CIFAR-10 ResNet-18 checkpoint (or a 100-image MNIST subset) and prints no comparison.

Part 2 (Fig. 4). A one-hidden-layer tanh network on the same data is trained to a minimum of the
training loss (plus a fixed L2, ``--net-decay``, so the Hessian is positive definite); its inverse Hessian
``H^-1``, the identity approximation and Neumann with 1, 5 and 20 steps (2, 6 and 21 terms; rows obtained
by applying the library's solvers to unit vectors) are drawn as heat maps of ``tanh`` of their entries.
A Hessian that is not positive definite (an unconverged ``--train-steps``, or the exact reference of
part 1) is reported: a warning on the console and ``metrics.hessian_positive_definite`` /
``metrics.hessian_min_eigenvalue`` (and ``reference_*`` for part 1) in results.json.

Computed in float64 whatever ``--dtype`` says: the study measures approximation error against an
exact solve.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bilevel import tree as T
from bilevel.hparams import HyperParameterSpace, per_weight_decay
from bilevel.hypergradient import hypergradient, largest_eigenvalue, linearise
from bilevel.loop import Every
from bilevel.regularizers import PerWeightL2, l2_penalty
from bilevel.rundir import atomic_savefig
from bilevel.solvers import ConjugateGradient, Exact, Identity, Neumann, dense_jacobian
from bilevel.strategies import IFT
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import TorchOptimizer

from .. import _common as C

NAME = "inverse-study"
HELP = "Lorraine et al. Fig. 3/4: Neumann and CG hypergradients vs the exact IFT; inverse-Hessian heat maps"


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_solver_arguments(p, "neumann", 20)
    p.add_argument("--dataset", default="boston", help="UCI regression set (default boston)")
    p.add_argument(
        "--hyper-steps", type=C.positive_int, default=40, help="hyperparameter steps of Algorithm 1 (default 40)"
    )
    p.add_argument(
        "--interval", type=C.positive_int, default=20, help="SGD steps between hyperparameter steps (default 20)"
    )
    p.add_argument("--lr", type=C.positive_float, default=0.05, help="SGD learning rate of the weights (default 0.05)")
    p.add_argument(
        "--hyper-lr", type=C.positive_float, default=0.05, help="Adam learning rate on log10 decays (default 0.05)"
    )
    p.add_argument("--init-decay", type=C.positive_float, default=1e-2, help="initial weight decay of every weight")
    p.add_argument("--compare-every", type=C.positive_int, default=5, help="compare approximations every N hyper steps")
    p.add_argument(
        "--fig3-model",
        choices=("linear", "net"),
        default="linear",
        help="model of part 1 (Fig. 3): 'linear' (default; 13 decayed weights + bias, so CG is exact after 13-14 "
        "iterations) or 'net', a 1-hidden-layer tanh network with --fig3-hidden units and one decay per weight "
        "(many more weights than compared steps)",
    )
    p.add_argument(
        "--fig3-hidden", type=C.positive_int, default=50, help="hidden units of the --fig3-model net (default 50)"
    )
    p.add_argument(
        "--approximations",
        choices=("hessian", "authors"),
        default="hessian",
        help="what part 1 compares with the exact hypergradient: 'hessian' (default; Neumann with alpha = "
        "1/lambda_max and CG on the training Hessian) or 'authors', the two inversions of the authors' "
        "inverse_comparison.py: a Neumann series on the outer product g g^T of the training gradient with "
        "alpha = --lr, stopped when a term stops shrinking, and CG (x0 = v) on v v^T, v the validation gradient",
    )
    p.add_argument(
        "--max-lookback", type=C.nonnegative_int, default=30, help="largest Neumann/CG step count compared (0..N)"
    )
    C.add_deprecated_alias(p, "--max-steps", "--max-lookback", type=C.nonnegative_int)
    p.add_argument("--hidden", type=C.positive_int, default=8, help="hidden units of the Fig. 4 network (default 8)")
    p.add_argument(
        "--net-decay",
        type=C.nonnegative_float,
        default=0.1,
        help="fixed L2 of the Fig. 4 network (default 0.1; keeps its Hessian positive definite)",
    )
    p.add_argument("--train-steps", type=C.nonnegative_int, default=3000, help="Adam steps to train the Fig. 4 network")
    p.add_argument(
        "--lookbacks",
        type=C.int_list(0),
        default=[1, 5, 20],
        help="comma-separated Neumann step counts k of the Fig. 4 heat maps (k steps = k + 1 terms of the series)",
    )
    C.add_deprecated_alias(p, "--neumann-terms", "--lookbacks", type=C.int_list(0))


def check_arguments(args) -> None:
    from bilevel.data import DATASETS, UCI_DATASETS, dataset_name

    C.check_solver_arguments(args)
    name = dataset_name(args.dataset)
    if name not in UCI_DATASETS or DATASETS[name].kind != "regression":
        raise ValueError(
            f"{NAME}: --dataset must be a UCI regression set ({', '.join(UCI_DATASETS)}), got {args.dataset!r}"
        )


def _cos_l2(a: dict, b: dict) -> tuple[float | None, float]:
    fa, fb = T.flatten(a), T.flatten(b)
    na, nb = float(fa.norm()), float(fb.norm())
    cos = float(fa @ fb) / (na * nb) if na > 0 and nb > 0 else None
    return cos, float((fa - fb).norm())


class AuthorsNeumann:
    """The Neumann series of the authors' ``inverse_comparison.py`` (``neumann_hyperstep_preconditioner``), as a
    solver: ``x = sum_j c_j`` with ``c_0 = v``, ``c_{j+1} = c_j - alpha (c_j . g) g``, i.e. a Neumann series on the
    rank-one outer product ``g g^T`` of the training gradient ``g`` (not the Hessian), without a leading ``alpha``,
    stopped before adding a term whose squared norm is more than 0.9999 times the previous one's."""

    def __init__(self, steps: int, alpha: float, g: torch.Tensor) -> None:
        self.steps, self.alpha, self.g = steps, alpha, g

    def __call__(self, op, v):
        flat = T.flatten(v)
        pre, counter, old = flat.clone(), flat, float(flat @ flat)
        for _ in range(self.steps):
            counter = counter - self.alpha * (counter @ self.g) * self.g
            size = float(counter @ counter)
            if old == 0 or size / old > 0.9999:
                break
            pre, old = pre + counter, size
        return T.unflatten(pre, v)


class AuthorsCG:
    """``cg_batch`` of the authors' ``inverse_comparison.py`` as they call it: CG on ``A = v v^T`` (the outer
    product of the validation gradient ``v`` itself, not the Hessian) for ``A x = v``, from ``x0 = v``, at most
    ``steps`` iterations, relative tolerance 1e-4, denominators below 5e-11 replaced by 1e-10."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, op, v):
        b = T.flatten(v)
        A = lambda x: b * (b @ x)  # noqa: E731
        x = b.clone()
        r = b - A(x)
        stop = max(1e-4 * float(b.norm()), 0.0)
        eps = 1e-10
        p, rz_old = None, None
        for k in range(1, self.steps + 1):
            rz = float(r @ r)
            if k == 1:
                p = r.clone()
            else:
                beta = rz / (rz_old if rz_old >= eps / 2 else eps)
                p = r + beta * p
            pAp = float(p @ A(p))
            step = rz / (pAp if pAp >= eps / 2 else eps)
            x, r, rz_old = x + step * p, r - step * A(p), rz
            if float((A(x) - b).norm()) <= stop:
                break
        return T.unflatten(x, v)


def compare(
    outer, inner, params, raw, max_steps: int, alpha: float | None = None, authors_lr: float | None = None
) -> dict:
    """Cosine and L2 distance of Neumann (0..max_steps steps, k + 1 terms) and CG (0..max_steps iterations)
    hypergradients to the exact one at ``params``; ``min_eigenvalue`` is that of the Hessian the exact
    hypergradient inverts. With ``authors_lr`` the two are :class:`AuthorsNeumann` (``alpha = authors_lr``, on
    ``g g^T``) and :class:`AuthorsCG` (on ``v v^T``) instead of the library's solvers on the Hessian."""
    exact = hypergradient(outer, params, raw, inner=inner, solver=Exact())
    op, _, _ = linearise(params, raw, inner=inner)
    Hd = dense_jacobian(op, params)
    a = alpha if alpha is not None else 1.0 / largest_eigenvalue(params, raw, inner=inner, iters=100)
    g_train = None  # the training gradient of the authors' Neumann series (not to be reused below)
    if authors_lr is not None:
        w = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            g_train = T.flatten(dict(zip(w, torch.autograd.grad(inner(w, raw), list(w.values())))))
        a = authors_lr
    out: dict = {
        "neumann": {"cosine": [], "l2": []},
        "cg": {"cosine": [], "l2": []},
        "alpha": a,
        "exact_norm": float(T.norm(exact)),
        "min_eigenvalue": float(torch.linalg.eigvalsh(0.5 * (Hd + Hd.T)).min()),
    }
    for k in range(max_steps + 1):
        if g_train is not None:
            pair = (("neumann", AuthorsNeumann(k, a, g_train)), ("cg", AuthorsCG(k)))
        else:
            pair = (("neumann", Neumann(k, alpha=a, divergence="ignore")), ("cg", ConjugateGradient(k)))
        for name, solver in pair:
            approx = hypergradient(outer, params, raw, inner=inner, solver=solver)
            cos, l2 = _cos_l2(approx, exact)
            out[name]["cosine"].append(cos)
            out[name]["l2"].append(l2)
    return out


def solver_matrix(solver, op, like: dict) -> torch.Tensor:
    """The dense matrix M with rows ``solver(op, e_i)``: the solver's approximation of ``J^-1`` (J symmetric)."""
    n = T.numel(like)
    ref = T.flatten(like)
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    return torch.stack([T.flatten(solver(op, T.unflatten(eye[i], like))) for i in range(n)])


def approximation_label(name: str) -> str:
    """``neumann-<k>`` (the results key) in words: k Neumann steps are k + 1 terms of the series."""
    if name.startswith("neumann-"):
        k = int(name.split("-", 1)[1])
        return f"neumann, {k} step{'s' * (k != 1)} ({k + 1} terms)"
    return name


def _mean(vals):
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def main(args, progress_factory=None, console=None) -> dict:
    from bilevel.data import load_uci
    from bilevel.nets.mlp import mlp_init
    from bilevel.report.grids import save_heatmaps

    t0 = time.perf_counter()
    out = Path(args.out)
    check_arguments(args)
    dev, dt = torch.device(args.device), torch.float64
    data = load_uci(args.dataset, data_dir=args.data_dir, dtype=dt).to(dev)
    Xtr, ytr, Xva, yva = data.X_train, data.y_train[:, 0], data.X_val, data.y_val[:, 0]
    d = Xtr.shape[1]

    # ---------------------------------------------------------------- Part 1: Fig. 3
    if args.fig3_model == "linear":
        decayed = ("w",)
        params = {"w": torch.zeros(d, dtype=dt, device=dev), "b": torch.zeros((), dtype=dt, device=dev)}

        def predict(p, X):
            return X @ p["w"] + p["b"]

    else:  # a 1-hidden-layer tanh network, one decay per weight (not per bias)
        decayed = ("W0", "W1")
        g1 = torch.Generator().manual_seed(C.derived_seed(args.seed, 1))
        params = {k: v.to(dev) for k, v in mlp_init([d, args.fig3_hidden, 1], g1, dtype=dt).items()}

        def predict(p, X):
            return (torch.tanh(X @ p["W0"].T + p["b0"]) @ p["W1"].T + p["b1"])[:, 0]

    space = HyperParameterSpace([per_weight_decay(params=decayed)])
    reg = PerWeightL2.from_space(space)
    raw = space.from_natural(params, {"weight_decay": args.init_decay})

    def inner(p, h):
        return ((predict(p, Xtr) - ytr) ** 2).mean() + reg(p, h)

    def outer(p, h):
        return ((predict(p, Xva) - yva) ** 2).mean()

    # Algorithm 1 (bilevel.tuner.OnlineTuner on one model): torch.optim.SGD steps the weights, Adam the decays;
    # --hyper-steps blocks of --interval SGD steps, each followed by the comparisons (on_interval) and one
    # hyperparameter step, then one last block with the comparisons but no hyperparameter step
    w = {k: v.clone().requires_grad_() for k, v in params.items()}
    mse = lambda p, nat, batch: ((predict(p, Xtr) - ytr) ** 2).mean()  # noqa: E731
    val = lambda p, nat, batch: ((predict(p, Xva) - yva) ** 2).mean()  # noqa: E731
    checkpoints: list[dict] = []
    val_curve: list[float] = []
    adv = progress_factory("inverse-study: Algorithm 1 + comparisons", args.hyper_steps) if progress_factory else None

    def measure(tuner) -> None:  # at the end of each block, before its hyperparameter step (s of them taken)
        s = tuner.hyper_steps
        wd, hd = T.detach(tuner.params), T.detach(tuner.raw)
        val_curve.append(float(outer(wd, hd)))
        if s % args.compare_every == 0 or s == args.hyper_steps:
            lr = args.lr if args.approximations == "authors" else None
            c = compare(outer, inner, wd, hd, args.max_lookback, args.alpha, lr)
            c["hyper_step"] = s
            checkpoints.append(c)

    def solver_at(tuner):  # Neumann's alpha = 1/lambda_max(H) at the current weights (Lorraine et al. Alg. 3)
        if args.alpha is not None:
            return C.solver_from_args(args, alpha=args.alpha)
        wd, hd = T.detach(tuner.params), T.detach(tuner.raw)
        return C.solver_from_args(args, alpha=1.0 / largest_eigenvalue(wd, hd, inner=inner, iters=50))

    loop = OnlineTuner(
        params,
        raw,
        space,
        TorchOptimizer(torch.optim.SGD(w.values(), lr=args.lr), w),
        mse,
        val,
        penalty=lambda p, nat: l2_penalty(p, nat["weight_decay"]),
        config=TunerConfig(tuned=("weight_decay",), hyper_lr=args.hyper_lr, on_divergence="raise"),
        callbacks=[SimpleNamespace(on_interval=measure, on_hyper_step=lambda tuner: adv(1) if adv else None)],
        stacked=False,
        strategy=IFT(implicit="loss", solver_at=solver_at),
        schedule=Every(args.interval, limit=args.hyper_steps),
    )
    loop.run(args.interval * (args.hyper_steps + 1), lambda: None, lambda: None)
    measure(loop)  # the last block: no hyperparameter step follows it, so the schedule fires no on_interval
    n_weights = sum(v.numel() for v in params.values())
    fig3_label = (
        f"linear model ({n_weights} weights)"
        if args.fig3_model == "linear"
        else f"1-hidden-layer tanh net ({args.fig3_hidden} units, {n_weights} weights)"
    )
    ks = list(range(args.max_lookback + 1))
    cosine = {
        meth: {str(k): _mean([c[meth]["cosine"][k] for c in checkpoints]) for k in ks} for meth in ("neumann", "cg")
    }
    l2 = {meth: {str(k): _mean([c[meth]["l2"][k] for c in checkpoints]) for k in ks} for meth in ("neumann", "cg")}

    # ---------------------------------------------------------------- Part 2: Fig. 4
    gen = torch.Generator().manual_seed(args.seed)
    net = {k: v.to(dev) for k, v in mlp_init([d, args.hidden, 1], gen, dtype=dt).items()}
    fixed_wd = args.net_decay

    def tanh_forward(p, x):
        return torch.tanh(x @ p["W0"].T + p["b0"]) @ p["W1"].T + p["b1"]

    def net_inner(p, _h):
        return ((tanh_forward(p, Xtr)[:, 0] - ytr) ** 2).mean() + l2_penalty(p, fixed_wd)

    nw = {k: v.clone().requires_grad_() for k, v in net.items()}
    nopt = torch.optim.Adam(nw.values(), lr=0.01)
    for _ in range(args.train_steps):
        nopt.zero_grad()
        net_inner(nw, None).backward()
        nopt.step()
    nw = T.detach(nw)
    dummy = {"none": torch.zeros((), dtype=dt, device=dev)}
    op, _, _ = linearise(nw, dummy, inner=net_inner)
    H = dense_jacobian(op, nw)
    H = 0.5 * (H + H.T)
    eig = torch.linalg.eigvalsh(H)
    inv = torch.linalg.inv(H)
    a = 1.0 / float(eig.max())
    steps = list(args.lookbacks)
    mats = {"exact": inv, "identity": solver_matrix(Identity(), op, nw)}
    for k in steps:  # key "neumann-<k steps>" (k + 1 terms), as in earlier results files
        mats[f"neumann-{k}"] = solver_matrix(Neumann(k, alpha=a, divergence="ignore"), op, nw)
    rel = {name: float((m - inv).norm() / inv.norm()) for name, m in mats.items()}
    save_heatmaps(
        list(mats.values()),
        [approximation_label(n) for n in mats],
        out / "inverse_hessian.png",
        transform=np.tanh,
        title=f"tanh of inverse-Hessian approximations, 1-hidden-layer net ({H.shape[0]} weights)",
    )
    _plot_fig3(cosine, l2, checkpoints, out / "hypergradient_approximations.png")

    from rich.console import Console

    console = console or Console()
    pd = bool(eig.min() > 0)
    ref_min = min(c["min_eigenvalue"] for c in checkpoints)
    ref_pd = ref_min > 0
    if not pd:
        console.print(
            f"[yellow]warning: Hessian not positive definite[/] (Fig. 4 network, {H.shape[0]} weights: "
            f"smallest eigenvalue {float(eig.min()):.3g}, {int((eig <= 0).sum())} eigenvalue(s) <= 0). "
            f"The network is not at a minimum of its training loss (train it longer, --train-steps "
            f"{args.train_steps}, or raise --net-decay {args.net_decay}); the 'exact' heat map is the "
            f"inverse of an indefinite matrix and Neumann's alpha = 1/lambda_max does not converge to it."
        )
    if not ref_pd:
        console.print(
            f"[yellow]warning: Hessian not positive definite[/] ({fig3_label}, the exact IFT reference of "
            f"part 1: smallest eigenvalue {ref_min:.3g} over {len(checkpoints)} comparison points); the "
            f"'exact' hypergradient there inverts an indefinite (or singular) matrix."
        )

    doc = {
        "experiment": NAME,
        "dataset": args.dataset,
        "seconds": time.perf_counter() - t0,
        "config": C.config_of(args),
        "metrics": {
            "cosine": cosine,
            "l2": l2,
            "inverse_relative_error": rel,
            "final_val_loss": val_curve[-1],
            "initial_val_loss": val_curve[0],
            "hessian_min_eigenvalue": float(eig.min()),
            "hessian_positive_definite": pd,
            "reference_hessian_min_eigenvalue": ref_min,
            "reference_hessian_positive_definite": ref_pd,
        },
        "fig3_model": {"kind": args.fig3_model, "weights": n_weights, "approximations": args.approximations},
        "curves": {"val_loss": val_curve, "checkpoints": checkpoints},
        "hessian": {
            "size": H.shape[0],
            "eig_min": float(eig.min()),
            "eig_max": float(eig.max()),
            "alpha": a,
            "positive_definite": pd,
            "negative_eigenvalues": int((eig < 0).sum()),
        },
    }
    C.write_results(out, doc)
    show = sorted({0, 1, 2, 5, 10, 20, args.max_lookback} & set(ks))
    which = " (the inversions of the authors' inverse_comparison.py)" if args.approximations == "authors" else ""
    C.print_table(
        f"IFT hypergradient approximations vs exact{which}, "
        f"{fig3_label} on {args.dataset} (mean over {len(checkpoints)} points of Algorithm 1)",
        ["steps", "Neumann cosine", "CG cosine", "Neumann L2", "CG L2"],
        [
            [
                k,
                *(("n/a" if v is None else v) for v in (cosine["neumann"][str(k)], cosine["cg"][str(k)])),
                l2["neumann"][str(k)],
                l2["cg"][str(k)],
            ]
            for k in show
        ],
        console,
    )
    C.print_table(
        f"inverse Hessian of a 1-hidden-layer net ({H.shape[0]} weights, eigenvalues "
        f"{float(eig.min()):.3g}..{float(eig.max()):.3g}"
        f"{'' if pd else ', NOT positive definite'}): ||M - H^-1||_F / ||H^-1||_F",
        ["approximation", "relative error"],
        [[approximation_label(n), v] for n, v in rel.items()],
        console,
    )
    return doc


def _plot_fig3(cosine: dict, l2: dict, checkpoints: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for meth, style in (("neumann", "-"), ("cg", "--")):
        ks = [int(k) for k in cosine[meth]]
        axes[0].plot(ks, [float("nan") if v is None else v for v in cosine[meth].values()], style, label=meth)
        axes[1].plot(ks, list(l2[meth].values()), style, label=meth)
    axes[0].set(xlabel="Neumann steps / CG iterations", ylabel="cosine similarity to exact", title="direction")
    axes[1].set(xlabel="Neumann steps / CG iterations", ylabel="L2 distance to exact", yscale="log", title="magnitude")
    for meth, style in (("neumann", "-"), ("cg", "--")):
        for k in (1, 5, 20):
            if k < len(checkpoints[0][meth]["cosine"]):
                axes[2].plot(
                    [c["hyper_step"] for c in checkpoints],
                    [float("nan") if c[meth]["cosine"][k] is None else c[meth]["cosine"][k] for c in checkpoints],
                    style,
                    label=f"{meth} {k} {'steps' if meth == 'neumann' else 'iterations'}",
                )
    axes[2].set(xlabel="hyperparameter step of Algorithm 1", ylabel="cosine similarity", title="along the run")
    for ax in axes:
        ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=110)
