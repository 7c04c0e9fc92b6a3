"""Small bilevel problems with independent references (closed forms, re-solved inner problems)."""

from __future__ import annotations

import torch

D = torch.float64


def ridge(n=40, nv=30, d=6, seed=0):
    """Per-feature L2 ridge: L_T = 0.5 mean((Xw - y)^2) + 0.5 sum(exp(lam) w^2)."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(nv, d, generator=g, dtype=D)
    w_true = torch.randn(d, generator=g, dtype=D)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D)
    yv = Xv @ w_true + 0.5 * torch.randn(nv, generator=g, dtype=D)

    def inner(p, h):
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    def outer(p, h):
        return 0.5 * ((Xv @ p["w"] - yv) ** 2).mean()

    def hessian(lam):
        return X.T @ X / n + torch.diag(lam.exp())

    def solve(lam):
        return torch.linalg.solve(hessian(lam), X.T @ y / n)

    def exact_hypergrad(lam, damping=0.0):
        """Closed form: -dL_V/dw (H + eps I)^-1 diag(exp(lam) w)."""
        w = solve(lam)
        v = Xv.T @ (Xv @ w - yv) / nv
        H = hessian(lam) + damping * torch.eye(d, dtype=D)
        return -(torch.linalg.solve(H, v)) * (lam.exp() * w)

    return dict(
        X=X, y=y, Xv=Xv, yv=yv, inner=inner, outer=outer, hessian=hessian, solve=solve, exact=exact_hypergrad, d=d
    )


def logistic(n=60, nv=40, d=4, seed=1):
    """Logistic regression with per-feature log weight decay; the inner problem solved by Newton."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(nv, d, generator=g, dtype=D)
    w_true = 2 * torch.randn(d, generator=g, dtype=D)
    y = (torch.rand(n, generator=g, dtype=D) < torch.sigmoid(X @ w_true)).to(D)
    yv = (torch.rand(nv, generator=g, dtype=D) < torch.sigmoid(Xv @ w_true)).to(D)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(p, h):
        return bce(X @ p["w"], y) + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    def outer(p, h):
        return bce(Xv @ p["w"], yv)

    def solve(lam):
        w = torch.zeros(d, dtype=D)
        for _ in range(50):
            gr = torch.func.grad(lambda w: inner({"w": w}, {"lam": lam}))(w)
            H = torch.func.hessian(lambda w: inner({"w": w}, {"lam": lam}))(w)
            w = w - torch.linalg.solve(H, gr)
        return w

    def val_at_optimum(lam):
        return outer({"w": solve(lam)}, {"lam": lam})

    return dict(inner=inner, outer=outer, solve=solve, val=val_at_optimum, d=d)


def linear_population(seed=1, shift=0.1):
    """A linear least-squares population (2 members, 3 weights) with lr and momentum tuned: the loop's tests.

    Returns ``(build, train, val)``: ``build(**kwargs)`` makes an :class:`bilevel.tuner.OnlineTuner` (keyword
    arguments of :class:`bilevel.tuner.TunerConfig` plus ``callbacks``, ``strategy``, ``schedule``).
    """
    from bilevel import hparams as H
    from bilevel import population as pop
    from bilevel import updates
    from bilevel.tuner import OnlineTuner, TunerConfig

    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(32, 3, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D)
    train, val = (X, X.sum(1, keepdim=True)), (Xv, Xv.sum(1, keepdim=True) + shift)
    loss = pop.vmap_loss(lambda p, x: x @ p["w"], lambda o, y: ((o - y) ** 2).mean())
    space = H.HyperParameterSpace([H.learning_rate(), H.momentum()])

    def build(callbacks=(), strategy=None, schedule=None, **cfg):
        params, raw = pop.init_population(
            lambda g: {"w": torch.randn(3, 1, generator=g, dtype=D)}, 2, 0, lambda p, g: space.init(p, g)
        )
        config = TunerConfig(tuned=space.names, **cfg)
        return OnlineTuner(
            params, raw, space, updates.SGD(), loss, loss, update_form=space.names, config=config,
            callbacks=callbacks, strategy=strategy, schedule=schedule,
        )  # fmt: skip

    return build, train, val
