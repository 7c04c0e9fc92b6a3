"""bilevel.solvers: the damping wrapper and AutoNeumann (alpha by power iteration, refreshed when the series grows)."""

import pytest
import torch
from problems import D

import bilevel as B
from bilevel import _tree as T
from bilevel.solvers import AutoNeumann, Damped, damped, dense_jacobian


class Matrix:
    """x^T A as a linear operator on {"w": vector}."""

    def __init__(self, A):
        self.A = A

    def rmatvec(self, x):
        return {"w": x["w"] @ self.A}

    def matvec(self, x):
        return {"w": self.A @ x["w"]}


def spd(n, top, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return Q @ torch.diag(torch.linspace(0.5, top, n, dtype=D)) @ Q.T


def test_damped_operator_is_j_plus_eps_identity():
    A = spd(5, 3.0)
    op = Matrix(A)
    torch.testing.assert_close(
        dense_jacobian(damped(op, 0.7), {"w": torch.zeros(5, dtype=D)}), A + 0.7 * torch.eye(5, dtype=D)
    )
    assert damped(op, 0.0) is op and isinstance(damped(op, 0.1), Damped)
    with pytest.raises(ValueError, match="damping"):
        damped(op, -1.0)
    v = {"w": torch.randn(5, dtype=D)}
    ref = torch.linalg.solve((A + 0.7 * torch.eye(5, dtype=D)).T, v["w"])
    for solver in (B.Exact(damping=0.7), B.ConjugateGradient(50, damping=0.7), B.Neumann(400, alpha=0.2, damping=0.7)):
        torch.testing.assert_close(solver(op, v)["w"], ref, rtol=1e-8, atol=1e-10)


def test_auto_neumann_picks_one_over_lambda_max_and_converges():
    A = spd(6, 40.0)  # alpha = 1 would diverge (eigenvalues up to 40)
    v = {"w": torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=D)}
    s = AutoNeumann(2500, max_alpha=None)
    x = s(Matrix(A), v)
    assert s.alpha == pytest.approx(1 / 40.0, rel=2e-2)  # power iteration, 20 products
    torch.testing.assert_close(x["w"], torch.linalg.solve(A.T, v["w"]), rtol=1e-6, atol=1e-8)
    capped = AutoNeumann(3, max_alpha=1.0)
    capped(Matrix(spd(6, 0.1)), v)
    assert capped.alpha == 1.0  # an update map with small eigenvalues keeps Clarke's alpha = 1


def test_auto_neumann_refreshes_alpha_when_curvature_grows():
    v = {"w": torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=D)}
    s = AutoNeumann(30, max_alpha=None)
    s(Matrix(spd(6, 1.0)), v)
    assert s.alpha == pytest.approx(1.0, rel=2e-2)
    A = spd(6, 25.0)  # training sharpened: alpha = 1 now makes the terms grow
    with pytest.raises(B.NeumannDivergenceError):
        B.Neumann(30, alpha=1.0)(Matrix(A), v)
    x = s(Matrix(A), v)
    assert s.refreshes == 1 and s.alpha <= 0.5 / 25.0 * 1.05
    assert bool(torch.isfinite(x["w"]).all())
    # the refreshed series approximates the inverse (30 steps at alpha = 0.5 / lambda_max on a spectrum 0.5..25)
    ref = torch.linalg.solve(A.T, v["w"])
    assert torch.nn.functional.cosine_similarity(x["w"], ref, dim=0) > 0.9
    state = s.state_dict()
    s2 = AutoNeumann(30, max_alpha=None)
    s2.load_state_dict(state)
    torch.testing.assert_close(s2(Matrix(A), v)["w"], s(Matrix(A), v)["w"], rtol=0, atol=0)


def test_auto_neumann_in_a_hypergradient_matches_exact_on_ridge():
    from problems import ridge

    prob = ridge()
    lam = torch.full((prob["d"],), -1.0, dtype=D)
    w = {"w": prob["solve"](lam)}
    got = B.hypergradient(prob["outer"], w, {"lam": lam}, inner=prob["inner"], solver=AutoNeumann(500, max_alpha=None))
    torch.testing.assert_close(got["lam"], prob["exact"](lam), rtol=1e-6, atol=1e-10)
    assert T.numel(got) == prob["d"]
