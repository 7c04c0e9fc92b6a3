"""Finite-difference check of the per-weight-decay hypergradient of ``overfit-validation`` on a conv net.

Issue 16 item 1: LeNet stalls at 60% validation accuracy where the linear model and the MLP reach 100%;
is the hypergradient of a convolutional network wrong? This module builds the study's loop
(:func:`bilevel_studies.lorraine.overfit_validation.tune`, the same ``OnlineTuner``, penalty, space and
``vmap``-ed ``functional_call`` forward), puts it at a minimiser ``w*(lambda)`` of the penalised training loss
(solved to round-off by Newton-CG in float64), and compares the tuner's own hypergradient (CG or the exact
solve on its ``J``) with central finite differences of ``lambda -> L_V(w*(lambda))`` along random directions
of each layer's ``log10`` decays, re-solving the inner problem for every perturbed ``lambda``.

Run it on LeNet at a small size (MNIST downsampled to 14x14, a few images)::

    python -m bilevel_studies.lorraine.overfit_fd_check --model lenet --image-size 14 --n 10
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

from bilevel import population as pop
from bilevel import tree as T
from bilevel.solvers import ConjugateGradient, Exact


def _objective(forward, X, y):
    def f(flat: torch.Tensor, like: dict, raw: dict) -> torch.Tensor:
        p = T.unflatten(flat, like)
        pen = sum(0.5 * (10.0 ** raw[k] * p[k] ** 2).sum() for k in p)
        return F.cross_entropy(forward(p, X), y) + pen

    return f


def _loop_args(
    *,
    solver: str,
    steps: int,
    alpha: float | None,
    implicit: str,
    init_decay: float,
    seed: int,
    warmup: int,
    lr: float = 0.1,
) -> argparse.Namespace:
    """The options :func:`~bilevel_studies.lorraine.overfit_validation.tune` reads: ``warmup`` SGD steps and no
    hyperparameter step (interval 10**9; the hyper learning rate is unused)."""
    return argparse.Namespace(
        solver=solver,
        lookback=steps,
        alpha=alpha,
        damping=0.0,
        implicit=implicit,
        optimizer="sgd",
        lr=lr,
        hyper_lr=1e-3,
        hyper_eps=1e-8,
        init_decay=init_decay,
        signed=False,
        seed=seed,
        interval=10**9,
        iterations=warmup,
        eval_every=warmup,
        stop_at_perfect=False,
    )


def newton_solve(
    forward,
    params: dict,
    raw: dict,
    X,
    y,
    tol: float = 1e-11,
    iters: int = 60,
    lbfgs_iters: int = 3000,
    dense_below: int = 500,
) -> dict:
    """A minimiser of ``CE(forward(w, X), y) + 1/2 sum 10**raw * w**2`` from ``params`` (Newton-CG, float64):
    L-BFGS first, then steps ``-H^{-1} g`` by CG on Hessian-vector products, halved until the objective decreases, until
    ``||g|| <= tol`` (with a dense Hessian for nets of at most ``dense_below`` weights, where L-BFGS stops at
    ``||g||_inf <= 1e-6``). Raises ``RuntimeError`` if it does not get there."""
    f = _objective(forward, X, y)
    like = {k: v.detach() for k, v in params.items()}
    x = T.flatten(like).clone()

    def grad(z):
        z = z.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(z, like, raw), z)
        return g

    def hvp(z, v):
        z = z.detach().requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(z, like, raw), z, create_graph=True)
            (hv,) = torch.autograd.grad(g @ v, z)
        return hv

    # L-BFGS (strong Wolfe) to the neighbourhood of a minimum, then Newton-CG to round-off
    z = x.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [z],
        lr=1,
        max_iter=lbfgs_iters,
        tolerance_grad=1e-6 if x.numel() <= dense_below else 1e-10,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = f(z, like, raw)
            loss.backward()
        return loss

    opt.step(closure)
    x = z.detach()
    dense = x.numel() <= dense_below
    for _ in range(iters):
        g = grad(x)
        gn = float(g.norm())
        if gn <= tol:
            return T.unflatten(x, like)
        if dense:  # small nets: the Newton step by a dense solve (eigen-decomposition; a flipped
            # sign on negative curvature keeps it a descent direction)
            z = x.detach().requires_grad_()
            with torch.enable_grad():
                (gz,) = torch.autograd.grad(f(z, like, raw), z, create_graph=True)
                H = torch.stack([torch.autograd.grad(gz[i], z, retain_graph=True)[0] for i in range(z.numel())])
            ev, U = torch.linalg.eigh(0.5 * (H + H.T))
            d = -U @ ((U.T @ g) / ev.abs().clamp_min(1e-12))
            f0 = float(f(x, like, raw))
            step = 1.0
            while step > 1e-8 and float(f(x + step * d, like, raw)) > f0 + 1e-4 * step * float(g @ d):
                step *= 0.5
            x = x + step * d
            continue
        # CG on H d = -g (stop on non-positive curvature: take the iterate so far, or -g)
        d = torch.zeros_like(x)
        r = -g.clone()
        p = r.clone()
        rr = float(r @ r)
        for _k in range(500):
            Hp = hvp(x, p)
            pHp = float(p @ Hp)
            if pHp <= 0:
                if not bool(d.any()):
                    d = -g
                break
            a = rr / pHp
            d = d + a * p
            r = r - a * Hp
            rr_new = float(r @ r)
            if math.sqrt(rr_new) <= 1e-3 * min(1.0, gn) * gn:
                break
            p = r + (rr_new / rr) * p
            rr = rr_new
        f0 = float(f(x, like, raw))
        step = 1.0
        while step > 1e-8 and float(f(x + step * d, like, raw)) > f0 + 1e-4 * step * float(g @ d):
            step *= 0.5
        x = x + step * d
    raise RuntimeError(f"Newton-CG did not reach ||g|| <= {tol} (last {gn:.3g})")


def check(
    forward,
    params: dict,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    init_decay: float = 1e-2,
    h: float = 1e-3,
    implicit: str = "update",
    solver: str = "cg",
    seed: int = 0,
    warmup: int = 300,
    tol: float = 1e-11,
) -> dict[str, Any]:
    """Per layer: the study tuner's hypergradient along a random unit direction ``d`` of that layer's raw
    (``log10``) decays, ``hg . d``, against ``(L_V(w*(raw + h d)) - L_V(w*(raw - h d))) / 2h``.

    ``implicit``: the tuner's IFT fixed point (``"update"``, the study's default with SGD, ``J = lr H``; or
    ``"loss"``, ``J = H``). ``solver``: ``"cg"`` (5000 iterations, tolerance 1e-13) or ``"exact"`` (dense; small
    nets only). ``tol``: the gradient norm every inner solve must reach (LeNet's float64 round-off floor is
    about 2e-11). Returns ``{layer: {"ift": .., "fd": .., "rel_error": ..}}``."""
    from .overfit_validation import tune

    Xtr, ytr = train
    Xva, yva = val
    args = _loop_args(
        solver="identity", steps=0, alpha=None, implicit=implicit, init_decay=init_decay, seed=seed, warmup=warmup
    )
    tuner, _ = tune(args, forward, params, train, val)  # `warmup` SGD steps (no hyper step), then w* by Newton
    raw1 = {k.split("/", 1)[1]: v.detach()[0] for k, v in tuner.raw.items()}
    w0 = pop.member(tuner.params, 0)
    wstar = newton_solve(forward, w0, raw1, Xtr, ytr, tol=tol)
    tuner.params = pop.stack([wstar])
    tuner.solver = ConjugateGradient(5000, tol=1e-13) if solver == "cg" else Exact()
    hg = {k.split("/", 1)[1]: v[0] for k, v in tuner.hypergradient(train, val).items()}

    def val_loss(raw: dict, start: dict) -> tuple[float, dict]:
        w = newton_solve(forward, start, raw, Xtr, ytr, tol=tol)
        with torch.no_grad():
            return float(F.cross_entropy(forward(w, Xva), yva)), w

    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, Any] = {}
    for layer in wstar:
        d = {k: torch.zeros_like(v) for k, v in raw1.items()}
        d[layer] = torch.randn(raw1[layer].shape, generator=gen, dtype=raw1[layer].dtype)
        d[layer] /= d[layer].norm()
        plus, _ = val_loss({k: raw1[k] + h * d[k] for k in raw1}, wstar)
        minus, _ = val_loss({k: raw1[k] - h * d[k] for k in raw1}, wstar)
        fd = (plus - minus) / (2 * h)
        ift = float((hg[layer] * d[layer]).sum())
        out[layer] = {"ift": ift, "fd": fd, "rel_error": abs(ift - fd) / max(abs(fd), 1e-300)}
    return out


def formula_check(
    forward,
    params: dict,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    init_decay: float = 1e-3,
    lr: float = 0.1,
    steps: int = 20,
    warmup: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The study's hypergradient as it runs (``implicit="update"`` with SGD, ``Neumann(steps, alpha=1)`` on
    ``J = lr H``: the stacked, ``vmap``-ed loop) after ``warmup`` SGD steps, against the same formula computed
    here without the library: one model, plain autograd, ``x = sum_{j<=steps} (I - lr H)^j v`` by explicit
    Hessian-vector products and ``dL_V/dlog10 lambda = -lr ln(10) lambda w x``. Valid for ReLU / max-pool nets
    (no minimiser needed). Returns per layer the relative error ``|a - b| / |b|`` and both norms."""
    from .overfit_validation import tune

    args = _loop_args(
        solver="neumann",
        steps=steps,
        alpha=1.0,
        implicit="update",
        init_decay=init_decay,
        seed=seed,
        warmup=warmup,
        lr=lr,
    )
    tuner, _ = tune(args, forward, params, train, val)
    hg = {k.split("/", 1)[1]: v[0] for k, v in tuner.hypergradient(train, val).items()}
    w = {k: v[0].detach() for k, v in tuner.params.items()}
    lam = {k.split("/", 1)[1]: (10.0 ** v[0].detach()) for k, v in tuner.raw.items()}
    f = _objective(forward, *train)
    like = w
    x0 = T.flatten(w).detach().requires_grad_()
    raw = {k: torch.log10(v) for k, v in lam.items()}
    with torch.enable_grad():
        (gt,) = torch.autograd.grad(f(x0, like, raw), x0, create_graph=True)
        vl = F.cross_entropy(forward(T.unflatten(x0, like), val[0]), val[1])
        (v,) = torch.autograd.grad(vl, x0)
        term, acc = v.clone(), v.clone()
        for _ in range(steps):
            (hv,) = torch.autograd.grad(gt @ term, x0, retain_graph=True)
            term = term - lr * hv
            acc = acc + term
    ref = T.unflatten(-lr * math.log(10) * T.flatten(lam) * T.flatten(w) * acc, like)
    out: dict[str, Any] = {}
    for k in w:
        a, b = hg[k].reshape(-1), ref[k].reshape(-1)
        out[k] = {
            "tuner_norm": float(a.norm()),
            "reference_norm": float(b.norm()),
            "rel_error": float((a - b).norm() / max(float(b.norm()), 1e-300)),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    from bilevel.nets import convnets

    from .. import _common as C

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet", choices=("lenet", "alexnet"))
    p.add_argument("--image-size", type=C.positive_int, default=14, help="MNIST average-pooled to this side (28 / k)")
    p.add_argument("--n", type=C.positive_int, default=10, help="training and validation images (each)")
    p.add_argument("--init-decay", type=C.positive_float, default=1e-2)
    p.add_argument("--implicit", default="update", choices=("update", "loss"))
    p.add_argument("--h", type=C.positive_float, default=1e-3)
    p.add_argument("--tol", type=C.positive_float, default=1e-9, help="gradient norm of every Newton inner solve")
    p.add_argument("--seed", type=C.nonnegative_int, default=0)
    p.add_argument("--width", type=C.positive_float, default=0.25, help="alexnet width")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    Xtr, ytr, _, _ = C.load_image_set("mnist", a.data_dir, "overfit-fd-check")
    perm = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(a.seed))
    X = Xtr[perm[: 2 * a.n]].to(torch.float64).unsqueeze(1) / 255.0
    X = F.adaptive_avg_pool2d(X, a.image_size)
    y = ytr[perm[: 2 * a.n]]
    try:
        module = (
            convnets.LeNet(1, 10, a.image_size)
            if a.model == "lenet"
            else convnets.AlexNet(1, 10, a.image_size, width=a.width)
        ).to(torch.float64)
    except ValueError as e:
        p.error(str(e))
    params = convnets.module_init(module, torch.Generator().manual_seed(a.seed))
    forward = pop.module_forward(module)
    n_w = sum(v.numel() for v in params.values())
    res_formula = formula_check(forward, params, (X[: a.n], y[: a.n]), (X[a.n :], y[a.n :]))
    print(f"{a.model} (ReLU, max-pool) on {a.n}+{a.n} MNIST images at {a.image_size}x{a.image_size}, {n_w} weights:")
    print("study loop's hypergradient (vmap, Neumann 20 on lr H, after 200 SGD steps) vs plain-autograd formula")
    print(f"{'layer':28s} {'|tuner|':>12s} {'|reference|':>12s} {'rel error':>10s}")
    for k, r in res_formula.items():
        print(f"{k:28s} {r['tuner_norm']:12.4e} {r['reference_norm']:12.4e} {r['rel_error']:10.2e}")
    # finite differences need a smooth objective: the same network with tanh for ReLU and average pooling
    for _name, mod in list(module.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(mod, cname, torch.nn.Tanh())
            elif isinstance(child, torch.nn.MaxPool2d):
                setattr(mod, cname, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    forward = pop.module_forward(module)
    res = check(
        forward,
        params,
        (X[: a.n], y[: a.n]),
        (X[a.n :], y[a.n :]),
        init_decay=a.init_decay,
        h=a.h,
        implicit=a.implicit,
        tol=a.tol,
    )
    print(f"the same {a.model} with tanh and average pooling, at w*(lambda) (Newton), decays {a.init_decay}:")
    print("study loop's hypergradient (CG on J) . d vs central differences of L_V(w*(lambda)), d random per layer")
    print(f"{'layer':28s} {'IFT (tuner)':>14s} {'finite diff':>14s} {'rel error':>10s}")
    for k, r in res.items():
        print(f"{k:28s} {r['ift']:14.6e} {r['fd']:14.6e} {r['rel_error']:10.2e}")


if __name__ == "__main__":
    main()
