"""The same IFT hypergradient through torchopt (a peer library, in the ``test`` extra): an independent reference.

``benchmarks/peers.py`` times the two (and jaxopt) at benchmark size; here a small float64 problem checks that
they agree to round-off for CG and Neumann on a damped, per-weight-decayed MLP Hessian.
"""

import pytest
import torch
import torch.nn.functional as F

import bilevel as B

torchopt = pytest.importorskip("torchopt")

D = torch.float64
g = torch.Generator().manual_seed(3)
X, Xv = torch.randn(40, 6, generator=g, dtype=D), torch.randn(20, 6, generator=g, dtype=D)
y, yv = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (20,), generator=g)
PARAMS = {"W0": torch.randn(8, 6, generator=g, dtype=D) / 2, "W1": torch.randn(3, 8, generator=g, dtype=D) / 2}
LAM = {k: torch.full_like(v, -2.0) + 0.3 * torch.randn(v.shape, generator=g, dtype=D) for k, v in PARAMS.items()}
EPS = 0.5


def net(p, x):
    return torch.tanh(x @ p["W0"].T) @ p["W1"].T


def inner(p, h):
    return F.cross_entropy(net(p, X), y) + 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p)


def outer(p, h):
    return F.cross_entropy(net(p, Xv), yv)


def torchopt_hypergradient(solve) -> dict:
    keys = list(PARAMS)

    def optimality(w, h):
        hd = dict(zip(keys, h))
        gr = torch.func.grad(lambda wd: inner(wd, hd))(dict(zip(keys, w)))
        return tuple(gr[k] for k in keys)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solution(w, h):
        return tuple(t.detach().clone() for t in w)

    h = tuple(LAM[k].clone().requires_grad_(True) for k in keys)
    loss = outer(dict(zip(keys, solution(tuple(PARAMS[k] for k in keys), h))), None)
    return dict(zip(keys, torch.autograd.grad(loss, h)))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torchopt calls the deprecated functorch.vjp
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_cg_and_neumann_agree_with_torchopt(backend):
    cases = [
        (
            B.ConjugateGradient(15, tol=0.0, damping=EPS),
            torchopt.linear_solve.solve_cg(maxiter=15, ridge=EPS, rtol=0.0, atol=0.0),
        ),
        (
            B.Neumann(12, alpha=0.3, damping=EPS),
            torchopt.linear_solve.solve_inv(ns=True, maxiter=12, alpha=0.3, ridge=EPS),
        ),
    ]
    for ours_solver, their_solve in cases:
        ours = B.hypergradient(outer, PARAMS, LAM, inner=inner, solver=ours_solver, backend=backend)
        theirs = torchopt_hypergradient(their_solve)
        for k in PARAMS:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-9, atol=1e-12)
