"""All three product backends agree on the common losses (MSE, cross-entropy, Huber)."""

import pytest
import torch
import torch.nn.functional as F

import bilevel as B

D = torch.float64
g = torch.Generator().manual_seed(0)
X, Xv = torch.randn(32, 5, generator=g, dtype=D), torch.randn(16, 5, generator=g, dtype=D)
W1, W2 = torch.randn(6, 5, generator=g, dtype=D) / 2, torch.randn(3, 6, generator=g, dtype=D) / 2
Yr, Yvr = torch.randn(32, 3, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D)
Yc, Yvc = torch.randint(0, 3, (32,), generator=g), torch.randint(0, 3, (16,), generator=g)

LOSSES = {"mse": (F.mse_loss, Yr, Yvr), "cross_entropy": (F.cross_entropy, Yc, Yvc), "huber": (F.huber_loss, Yr, Yvr)}


def net(p, x):
    return torch.tanh(x @ p["W1"].T) @ p["W2"].T


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend", ["func", "compile"])
def test_backends_agree(loss_name, backend):
    loss, y, yv = LOSSES[loss_name]

    def inner(p, h):
        return loss(net(p, X), y) + 0.5 * sum((h["wd"].exp() * v**2).sum() for v in p.values())

    def outer(p, h):
        return loss(net(p, Xv), yv)

    p, h = {"W1": W1, "W2": W2}, {"wd": torch.tensor(-1.0, dtype=D)}
    ref = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5))
    got = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5), backend=backend)
    torch.testing.assert_close(got["wd"], ref["wd"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["func", "compile"])
def test_backends_agree_on_update_maps(backend):
    """update= (Clarke et al.): SGD with momentum state and per-weight learning rates, non-symmetric J."""
    from bilevel.updates import SGD

    loss, y, yv = LOSSES["mse"]
    rule = SGD(momentum=0.9)
    p = {"W1": W1, "W2": W2}
    state = rule.init_state(p)
    state["momentum_buffer"] = {k: 0.1 * torch.ones_like(v) for k, v in p.items()}
    state["step"] = state["step"] + 3

    def update(q, h):
        g = torch.func.grad(lambda r: loss(net(r, X), y))(q)
        lr = {k: 10 ** h["log_lr"] * torch.ones_like(v) for k, v in q.items()}
        return rule(q, g, {"lr": lr, "momentum": torch.sigmoid(h["m"]), "weight_decay": 10 ** h["log_wd"]}, state)[0]

    def outer(q, h):
        return loss(net(q, Xv), yv)

    h = {"log_lr": torch.tensor(-1.0, dtype=D), "m": torch.tensor(0.5, dtype=D), "log_wd": torch.tensor(-3.0, dtype=D)}
    ref = B.hypergradient(outer, p, h, update=update, solver=B.Neumann(5, alpha=1.0))
    got = B.hypergradient(outer, p, h, update=update, solver=B.Neumann(5, alpha=1.0), backend=backend)
    for k in h:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_compiled_programs_are_cached_per_function_and_bounded(monkeypatch):
    from bilevel.hypergradient import _Compiled

    monkeypatch.setattr(_Compiled, "cache_size", 2)
    monkeypatch.setattr(_Compiled, "_cache", type(_Compiled._cache)())

    def outer(p, h):
        return (p["w"] ** 2).sum()

    def inner(p, h):
        return ((p["w"] - h["c"]) ** 2).sum()

    p, h = {"w": torch.ones(3, dtype=D)}, {"c": torch.zeros(3, dtype=D)}
    solver = B.Neumann(2, alpha=0.25)
    for _ in range(3):  # the same functions and solver: compiled once
        B.hypergradient(outer, p, h, inner=inner, solver=solver, backend="compile")
    assert list(_Compiled._cache) == [(outer, inner, solver)]
    for i in range(4):  # fresh closures: the table stays bounded
        B.hypergradient(
            outer, p, h, inner=lambda p, h, i=i: inner(p, h) * (1 + i), solver=B.Identity(), backend="compile"
        )
    assert len(_Compiled._cache) == 2
    # Exact builds J with one product per weight: run eagerly, never traced
    B.hypergradient(outer, p, h, inner=inner, solver=B.Exact(), backend="compile")
    assert (outer, inner, B.Exact()) not in _Compiled._cache


@pytest.mark.parametrize(
    "solver",
    [B.ConjugateGradient(8, tol=0.0, damping=0.3), B.Neumann(6, alpha=0.5, damping=0.1)],
    ids=["cg", "neumann"],
)
def test_compiled_solver_loop_matches_eager(solver):
    """The traced (branch-free) CG and Neumann give eager's answer on the compiled call after the first."""
    loss, y, yv = LOSSES["cross_entropy"]

    def inner(p, h):
        return loss(net(p, X), y) + 0.5 * sum((h["wd"].exp() * v**2).sum() for v in p.values())

    def outer(p, h):
        return loss(net(p, Xv), yv)

    h = {"wd": torch.tensor(-1.0, dtype=D)}
    for scale in (1.0, 0.5):  # the first call is eager and compiles; the second runs the program on new weights
        p = {"W1": scale * W1, "W2": W2}
        ref = B.hypergradient(outer, p, h, inner=inner, solver=solver)
        got = B.hypergradient(outer, p, h, inner=inner, solver=solver, backend="compile")
        torch.testing.assert_close(got["wd"], ref["wd"], rtol=1e-9, atol=1e-12)


def test_compiled_cg_stops_moving_once_converged():
    """On a 4-dimensional quadratic CG is exact after 4 iterations; the traced loop's 8 leave it there, and the
    hypergradient is the closed form -A^{-1} b' . grad L_V (dense solve)."""
    A = torch.tensor([[4.0, 1, 0, 0], [1, 3, 1, 0], [0, 1, 2, 0.5], [0, 0, 0.5, 1]], dtype=D)
    c = torch.tensor([1.0, -2, 0.5, 3], dtype=D)

    def inner(p, h):  # minimiser w* = A^{-1} (h c): dw*/dh = A^{-1} c
        return 0.5 * p["w"] @ A @ p["w"] - h["s"] * (c @ p["w"])

    def outer(p, h):
        return ((p["w"] - 1.0) ** 2).sum()

    h, solver = {"s": torch.tensor(0.7, dtype=D)}, B.ConjugateGradient(8)
    for w in (torch.zeros(4, dtype=D), torch.ones(4, dtype=D)):
        got = B.hypergradient(outer, {"w": w}, h, inner=inner, solver=solver, backend="compile")
        want = 2 * (w - 1.0) @ torch.linalg.solve(A, c)  # dL_V/dw (dw*/ds)
        torch.testing.assert_close(got["s"], want, rtol=1e-12, atol=1e-12)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        B.hypergradient(
            lambda p, h: p["w"].sum(),
            {"w": torch.ones(2)},
            {"l": torch.ones(1)},
            inner=lambda p, h: (p["w"] ** 2).sum(),
            solver=B.Identity(),
            backend="jax",
        )
