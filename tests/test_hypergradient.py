"""IFT hypergradients against closed forms, dense algebra and finite differences."""

import pytest
import torch
from problems import D, logistic, ridge

import bilevel as B

SOLVERS_EXACT = [B.Exact(), B.ConjugateGradient(50), B.Neumann(400, alpha=0.4), B.Neumann(1500, alpha=0.1)]


@pytest.mark.parametrize("solver", SOLVERS_EXACT, ids=repr)
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_ridge_closed_form(solver, backend):
    P = ridge()
    lam = torch.linspace(-2, 1, P["d"], dtype=D)
    hg = B.hypergradient(
        P["outer"], {"w": P["solve"](lam)}, {"lam": lam}, inner=P["inner"], solver=solver, backend=backend
    )
    torch.testing.assert_close(hg["lam"], P["exact"](lam), rtol=1e-7, atol=1e-10)


def test_neumann_converges_monotonically_with_alpha_scaling():
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    p, h, ref = {"w": P["solve"](lam)}, {"lam": lam}, P["exact"](lam)
    errs = [
        float((B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(k, alpha=0.2))["lam"] - ref).norm())
        for k in (0, 2, 8, 32, 128)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-10 * float(ref.norm())
    # the leading alpha: the zeroth term is alpha * v, i.e. alpha times the identity approximation
    n0 = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(0, alpha=0.2))
    ident = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Identity())
    torch.testing.assert_close(n0["lam"], 0.2 * ident["lam"])


def test_identity_is_neumann_zero_steps():
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    p, h = {"w": P["solve"](lam)}, {"lam": lam}
    a = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Identity())
    b = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(0, alpha=1.0))
    torch.testing.assert_close(a["lam"], b["lam"])
    # and against the dense formula -v diag(exp(lam) w)
    w = p["w"]
    v = P["Xv"].T @ (P["Xv"] @ w - P["yv"]) / len(P["yv"])
    torch.testing.assert_close(a["lam"], -v * lam.exp() * w)


@pytest.mark.parametrize("eps", [0.05, 1.0])
@pytest.mark.parametrize("solver_cls", ["exact", "cg", "neumann", "identity"])
def test_damping_is_proximal_best_response(eps, solver_cls):
    P = ridge()
    lam = torch.full((P["d"],), -1.0, dtype=D)
    p, h = {"w": P["solve"](lam)}, {"lam": lam}
    solver = {
        "exact": B.Exact(damping=eps),
        "cg": B.ConjugateGradient(50, damping=eps),
        "neumann": B.Neumann(2000, alpha=0.2, damping=eps),
        "identity": B.Identity(damping=eps),
    }[solver_cls]
    hg = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=solver)["lam"]
    if solver_cls == "identity":
        w = p["w"]
        v = P["Xv"].T @ (P["Xv"] @ w - P["yv"]) / len(P["yv"])
        torch.testing.assert_close(hg, -v / (1 + eps) * lam.exp() * w)
    else:
        torch.testing.assert_close(hg, P["exact"](lam, damping=eps), rtol=1e-7, atol=1e-10)
        assert not torch.allclose(hg, P["exact"](lam), rtol=1e-3)


def test_logistic_against_finite_differences():
    P = logistic()
    lam = torch.tensor([-1.0, 0.0, -2.0, 0.5], dtype=D)
    hg = B.hypergradient(P["outer"], {"w": P["solve"](lam)}, {"lam": lam}, inner=P["inner"], solver=B.Exact())
    fd = torch.zeros_like(lam)
    for i in range(len(lam)):
        e = torch.zeros_like(lam)
        e[i] = 1e-5
        fd[i] = (P["val"](lam + e) - P["val"](lam - e)) / 2e-5
    torch.testing.assert_close(hg["lam"], fd, rtol=1e-5, atol=1e-9)
    cg = B.hypergradient(
        P["outer"], {"w": P["solve"](lam)}, {"lam": lam}, inner=P["inner"], solver=B.ConjugateGradient(20)
    )
    torch.testing.assert_close(cg["lam"], fd, rtol=1e-5, atol=1e-9)


def test_direct_term_included():
    """A validation loss that depends on lambda directly: d/dlam [L_V(w*(lam)) + lam^2]."""
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    outer = lambda p, h: P["outer"](p, h) + (h["lam"] ** 2).sum() + 3 * h["lam"].sum()  # noqa: E731
    hg = B.hypergradient(outer, {"w": P["solve"](lam)}, {"lam": lam}, inner=P["inner"], solver=B.Exact())
    torch.testing.assert_close(hg["lam"], P["exact"](lam) + 2 * lam + 3)


def _sgd_update(P, lr):
    def update(p, h):
        g = torch.func.grad(lambda p: 0.5 * ((P["X"] @ p["w"] - P["y"]) ** 2).mean())(p)
        return {"w": h["lr"] * (g["w"] + h["wd"] * p["w"])}

    return update


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_update_form_matches_loss_form(backend):
    P = ridge()
    wd = torch.full((P["d"],), 0.3, dtype=D)
    lam = wd.log()
    w = P["solve"](lam)  # exact fixed point of u
    update = _sgd_update(P, 0.1)
    h = {"lr": torch.tensor(0.1, dtype=D), "wd": wd}
    hg = B.hypergradient(P["outer"], {"w": w}, h, update=update, solver=B.Exact(), backend=backend)
    # d/dwd = d/dlam * dlam/dwd = exact(lam) / wd
    torch.testing.assert_close(hg["wd"], P["exact"](lam) / wd, rtol=1e-8, atol=1e-12)
    assert abs(float(hg["lr"])) < 1e-12  # the fixed point does not depend on lr
    # Neumann with alpha=1 on the update converges to the same answer (u carries the step size)
    hn = B.hypergradient(P["outer"], {"w": w}, h, update=update, solver=B.Neumann(600, alpha=1.0))
    torch.testing.assert_close(hn["wd"], hg["wd"], rtol=1e-7, atol=1e-12)


def test_per_weight_lr_not_symmetric_cg_refuses_or_solves_normal_equations():
    P = ridge()
    wd = torch.full((P["d"],), 0.3, dtype=D)
    w = P["solve"](wd.log())
    update = _sgd_update(P, None)
    h = {"lr": torch.linspace(0.05, 0.5, P["d"], dtype=D), "wd": wd}
    ref = B.hypergradient(P["outer"], {"w": w}, h, update=update, solver=B.Exact())
    with pytest.raises(B.NotSymmetricError, match="normal_equations=True"):
        B.hypergradient(P["outer"], {"w": w}, h, update=update, solver=B.ConjugateGradient(30))
    cg = B.hypergradient(P["outer"], {"w": w}, h, update=update, solver=B.ConjugateGradient(200, normal_equations=True))
    torch.testing.assert_close(cg["wd"], ref["wd"], rtol=1e-6, atol=1e-10)
    # the weight-decay hypergradient does not depend on the per-weight lr at the fixed point
    torch.testing.assert_close(ref["wd"], P["exact"](wd.log()) / wd, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("K", [1, 3, 10])
def test_lorraine_theorem2_unrolled_equals_neumann(K):
    P = ridge()
    lam = torch.linspace(-1, 0.5, P["d"], dtype=D)
    p, h = {"w": P["solve"](lam)}, {"lam": lam}
    alpha = 0.3
    unrolled = B.unrolled_hypergradient(P["outer"], p, h, inner=P["inner"], lr=alpha, steps=K)
    neumann = B.hypergradient(P["outer"], p, h, inner=P["inner"], solver=B.Neumann(K - 1, alpha=alpha))
    torch.testing.assert_close(unrolled["lam"], neumann["lam"], rtol=1e-9, atol=1e-13)


def test_truncated_unroll_from_fixed_point_equals_shorter_unroll():
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    p, h = {"w": P["solve"](lam)}, {"lam": lam}
    full3 = B.unrolled_hypergradient(P["outer"], p, h, inner=P["inner"], lr=0.3, steps=3)
    trunc = B.unrolled_hypergradient(P["outer"], p, h, inner=P["inner"], lr=0.3, steps=8, truncate=3)
    torch.testing.assert_close(trunc["lam"], full3["lam"], rtol=1e-9, atol=1e-13)


def test_unrolled_against_finite_differences_away_from_fixed_point():
    P = ridge()
    lam = torch.zeros(P["d"], dtype=D)
    w0 = torch.zeros(P["d"], dtype=D)

    def run(lam, K=6, lr=0.2):
        w = w0.clone()
        for _ in range(K):
            w = w - lr * torch.func.grad(lambda w: P["inner"]({"w": w}, {"lam": lam}))(w)
        return P["outer"]({"w": w}, {})

    hg = B.unrolled_hypergradient(P["outer"], {"w": w0}, {"lam": lam}, inner=P["inner"], lr=0.2, steps=6)
    fd = torch.stack([(run(lam + 1e-6 * e) - run(lam - 1e-6 * e)) / 2e-6 for e in torch.eye(P["d"], dtype=D)])
    torch.testing.assert_close(hg["lam"], fd, rtol=1e-6, atol=1e-10)


def test_unrolled_with_state_differentiates_through_momentum():
    P = ridge()
    w0 = torch.zeros(P["d"], dtype=D)
    grad_T = lambda w: P["X"].T @ (P["X"] @ w - P["y"]) / len(P["y"])  # noqa: E731

    def update(p, h, buf):
        b = h["mom"] * buf + grad_T(p["w"])
        return {"w": h["lr"] * b}, b

    def run(lr, mom, K=5):
        w, b = w0.clone(), torch.zeros_like(w0)
        for _ in range(K):
            b = mom * b + grad_T(w)
            w = w - lr * b
        return P["outer"]({"w": w}, {})

    h = {"lr": torch.tensor(0.1, dtype=D), "mom": torch.tensor(0.7, dtype=D)}
    hg = B.unrolled_hypergradient(P["outer"], {"w": w0}, h, update=update, state=torch.zeros_like(w0), steps=5)
    e = 1e-6
    torch.testing.assert_close(hg["lr"], (run(0.1 + e, 0.7) - run(0.1 - e, 0.7)) / (2 * e), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(hg["mom"], (run(0.1, 0.7 + e) - run(0.1, 0.7 - e)) / (2 * e), rtol=1e-6, atol=1e-10)


def test_exact_on_a_singular_hessian_is_the_min_norm_answer():
    """Least squares with more weights than points: H = Phi^T Phi is singular; Exact gives -v^T H^+ dr/dlambda."""
    g = torch.Generator().manual_seed(5)
    Phi = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    inner = lambda p, h: 0.5 * ((Phi @ p["w"] - h["y"]) ** 2).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (a @ p["w"] - 1.0) ** 2  # noqa: E731
    y = Phi @ w  # w is a solution (not the min-norm one)
    got = B.hypergradient(outer, {"w": w}, {"y": y}, inner=inner, solver=B.Exact())["y"]
    v = a * (a @ w - 1.0)
    ref = v @ torch.linalg.pinv(Phi)  # -v^T H^+ (-Phi^T) = v^T Phi^+
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    # a nonsingular problem still takes the plain solve and matches it
    torch.testing.assert_close(
        B.hypergradient(outer, {"w": w}, {"y": y}, inner=inner, solver=B.Exact(damping=0.5))["y"],
        v @ torch.linalg.solve(Phi.T @ Phi + 0.5 * torch.eye(6, dtype=torch.float64), Phi.T),
        rtol=1e-10,
        atol=1e-12,
    )


def test_module_params_equal_dict_params():
    """``hypergradient`` on an nn.Module (losses written as ``model(x)``) equals the dict-of-tensors call."""
    import torch.nn.functional as F
    from torch import nn

    import bilevel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, y, Xv, yv = (
        torch.randn(20, 3, dtype=torch.float64),
        torch.randn(20, 1, dtype=torch.float64),
        torch.randn(10, 3, dtype=torch.float64),
        torch.randn(10, 1, dtype=torch.float64),
    )
    h = {"log_wd": torch.full((), -2.0, dtype=torch.float64)}

    def inner_m(m, h):
        return F.mse_loss(m(X), y) + h["log_wd"].exp() * sum((p**2).sum() for p in m.parameters())

    def outer_m(m, h):
        return F.mse_loss(m(Xv), yv)

    p = {k: v.detach() for k, v in model.named_parameters()}

    def fwd(p, x):
        return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]

    def inner_d(p, h):
        return F.mse_loss(fwd(p, X), y) + h["log_wd"].exp() * sum((v**2).sum() for v in p.values())

    def outer_d(p, h):
        return F.mse_loss(fwd(p, Xv), yv)

    solver = bilevel.Exact()
    got = bilevel.hypergradient(outer_m, model, h, inner=inner_m, solver=solver)
    ref = bilevel.hypergradient(outer_d, p, h, inner=inner_d, solver=solver)
    torch.testing.assert_close(got["log_wd"], ref["log_wd"], rtol=1e-10, atol=1e-14)
    assert abs(float(ref["log_wd"])) > 1e-8
    assert bilevel.largest_eigenvalue(model, h, inner=inner_m) == pytest.approx(
        bilevel.largest_eigenvalue(p, h, inner=inner_d), rel=1e-8
    )
