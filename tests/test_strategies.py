"""Strategies (bilevel.strategies): each hypergradient against an independent reference (closed form, finite
differences, the formula of the paper's code), the mapping from TunerConfig, and the one default solver."""

import math

import pytest
import torch

from bilevel import hparams as H
from bilevel import strategies as S
from bilevel.config import TunerConfig
from bilevel.solvers import AutoNeumann, Exact, Neumann
from bilevel.tuner import OnlineTuner
from bilevel.updates import SGD

D = torch.float64
g0 = torch.Generator().manual_seed(3)
X, Xv = torch.randn(20, 3, generator=g0, dtype=D), torch.randn(15, 3, generator=g0, dtype=D)
w_true = torch.randn(3, 1, generator=g0, dtype=D)
Y, Yv = X @ w_true + 0.3 * torch.randn(20, 1, generator=g0, dtype=D), Xv @ w_true


def mse(p, x, y):
    return ((x @ p["w"] - y) ** 2).mean()


def test_ift_on_the_training_loss_equals_the_ridge_closed_form():
    """L_T = mse + (lam/2)|w|^2: w*(lam) = (2/n X^T X + lam I)^-1 2/n X^T y; dL_V(w*)/d lam by hand."""
    lam = 0.7
    n = X.shape[0]
    A = 2 / n * X.T @ X + lam * torch.eye(3, dtype=D)
    w_star = torch.linalg.solve(A, 2 / n * X.T @ Y)
    gv = 2 / Xv.shape[0] * Xv.T @ (Xv @ w_star - Yv)  # dL_V/dw
    expected = float(-(gv.T @ torch.linalg.solve(A, w_star)))  # dw*/dlam = -A^-1 w*
    t = OnlineTuner(
        {"w": w_star.clone()}, {"lam": torch.tensor(lam, dtype=D)}, None, SGD(lr=0.1),
        lambda p, h, b: mse(p, X, Y), lambda p, h, b: mse(p, Xv, Yv), stacked=False,
        penalty=lambda p, h: 0.5 * h["lam"] * (p["w"] ** 2).sum(),
        config=TunerConfig(tuned=("lam",)), strategy=S.IFT(Exact(), implicit="loss"),
    )  # fmt: skip
    t.t = 1
    hg = t.hypergradient(None, None)
    assert float(hg["lam"]) == pytest.approx(expected, rel=1e-10)


def _sgd_tuner(strategy, lr=0.05):
    space = H.HyperParameterSpace([H.learning_rate()])
    w0 = {"w": torch.zeros(3, 1, dtype=D)}
    return OnlineTuner(
        w0, space.from_natural(w0, {"lr": lr}), space, SGD(), lambda p, h, b: mse(p, *b),
        lambda p, h, b: mse(p, *b), update_form=("lr",), stacked=False,
        config=TunerConfig(tuned=("lr",)), strategy=strategy,
    )  # fmt: skip


def _after_one_step(lr, batch=(X, Y)):
    w0 = torch.zeros(3, 1, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(mse({"w": w0}, *batch), w0)
    return w0.detach() - lr * g


def test_unrolled_one_step_equals_finite_differences_of_the_validation_loss():
    """Unrolled(1) after one weight step: d L_V(w_0 - lr g_0) / d log10 lr, by central differences."""
    t = _sgd_tuner(S.Unrolled(1))
    t.step((X, Y))
    hg = float(t.hypergradient((X, Y), (Xv, Yv))["lr"])
    eps, r = 1e-6, math.log10(0.05)
    fd = mse({"w": _after_one_step(10 ** (r + eps))}, Xv, Yv) - mse({"w": _after_one_step(10 ** (r - eps))}, Xv, Yv)
    assert hg == pytest.approx(float(fd) / (2 * eps), rel=1e-6)


def test_baydin_is_the_training_loss_derivative_through_the_step_and_the_authors_form_the_dot_product():
    """Baydin et al.: d L_T(w_1) / d log10 lr = -g_1 . g_0 * lr ln 10; Clarke et al.'s code: -g_1 . g_0."""
    lr = 0.05
    w1 = _after_one_step(lr)
    w0 = torch.zeros(3, 1, dtype=D, requires_grad=True)
    (g0_,) = torch.autograd.grad(mse({"w": w0}, X, Y), w0)
    w1r = w1.clone().requires_grad_()
    (g1,) = torch.autograd.grad(mse({"w": w1r}, X, Y), w1r)
    dot = float((g1 * g0_).sum())
    ours = _sgd_tuner(S.Baydin(), lr)
    ours.step((X, Y))
    assert float(ours.hypergradient((X, Y), None)["lr"]) == pytest.approx(-dot * lr * math.log(10), rel=1e-10)
    authors = _sgd_tuner(S.AuthorsBaydin(raw_clip=None), lr)
    authors.step((X, Y))
    assert float(authors.hypergradient((X, Y), (X, Y))["lr"]) == pytest.approx(-dot, rel=1e-10)
    raw0 = float(authors.raw["lr"].detach())
    authors.strategy.hyper_step(authors, (X, Y), lambda: None)  # Adam's first step: -hyper_lr * sign(h)
    assert float(authors.raw["lr"].detach()) == pytest.approx(raw0 + 0.05 * math.copysign(1, dot), rel=1e-9)


def test_authors_baydin_clamps_the_raw_values():
    t = _sgd_tuner(S.AuthorsBaydin(raw_clip=(-10.0, -1.2)), 0.05)  # log10 0.05 = -1.30
    for _ in range(5):
        t.step((X, Y))
        t.strategy.hyper_step(t, (X, Y), lambda: None)
    assert -10.0 <= float(t.raw["lr"].detach()) <= -1.2


def test_no_tuning_moves_nothing_and_config_names_each_strategy():
    t = _sgd_tuner(S.NoTuning())
    assert t.hyper_opt is None and not t.tunes
    for mode, kind in (("ift", S.IFT), ("unroll", S.Unrolled), ("baydin", S.Baydin), ("none", S.NoTuning)):
        assert type(S.from_config(TunerConfig(mode=mode))) is kind
    shared = S.from_config(TunerConfig(share_gradient=True))
    assert isinstance(shared, S.SharedGradient) and isinstance(shared.inner, S.IFT)
    with pytest.raises(ValueError, match="implicit"):
        S.IFT(implicit="hessian")
    with pytest.raises(ValueError, match="lookback"):
        S.Unrolled(0)


def test_one_default_solver_for_every_door():
    """One model: AutoNeumann (alpha by power iteration); a population: Neumann(alpha=1), members independent."""
    one = _sgd_tuner(S.IFT())
    assert isinstance(one.solver, AutoNeumann) and one.cfg.on_divergence == "raise"
    pop_solver = S.default_solver(4, "update", population=True)
    assert isinstance(pop_solver, Neumann) and pop_solver.alpha == 1.0 and pop_solver.steps == 4
    assert S.default_solver(4, "loss", population=False).max_alpha is None


def test_shared_gradient_gives_the_ift_hypergradient_and_keeps_nothing_in_its_checkpoint():
    a, b = _sgd_tuner(S.IFT(Neumann(3, alpha=1.0))), _sgd_tuner(S.SharedGradient(S.IFT(Neumann(3, alpha=1.0))))
    for t in (a, b):
        t.step((X, Y))
    ha, hb = a.hypergradient((X, Y), (Xv, Yv)), b.hypergradient((X, Y), (Xv, Yv))
    assert torch.equal(ha["lr"], hb["lr"])
    assert b.strategy.entry is not None  # the residual's gradient, kept for the next weight step
    b.strategy.load_state_dict(b.strategy.state_dict())
    assert b.strategy.entry is None
