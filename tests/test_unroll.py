"""bilevel.unroll: hypergradients through K optimiser steps, against closed forms and finite differences.

The quadratic inner problem L_T(w, lam) = 1/2 w^T A w - w^T B lam, unrolled with gradient descent of step eta,
is linear: w_{k+1} = M w_k + eta B lam with M = I - eta A, so dw_K/dlam = eta sum_{j<K} M^j B (only the last
L terms when the first K - L steps are not differentiated). The outer loss L_V = 1/2 ||w - c||^2 + gamma/2
||lam||^2 then has the hypergradient (dw_K/dlam)^T (w_K - c) + gamma lam.
"""

from __future__ import annotations

import pytest
import torch

from bilevel import Neumann, hypergradient
from bilevel.errors import NonFiniteError
from bilevel.unroll import replay_hypergradient, unrolled_hypergradient

N, P, ETA, GAMMA = 5, 3, 0.1, 0.3


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, N, generator=g, dtype=torch.float64)
    A = q @ q.T / N + torch.eye(N, dtype=torch.float64)  # SPD, eigenvalues well inside (0, 2 / ETA)
    B = torch.randn(N, P, generator=g, dtype=torch.float64)
    c = torch.randn(N, generator=g, dtype=torch.float64)
    w0 = torch.randn(N, generator=g, dtype=torch.float64)
    lam = torch.randn(P, generator=g, dtype=torch.float64)
    inner = lambda p, h: 0.5 * p["w"] @ A @ p["w"] - p["w"] @ B @ h["lam"]  # noqa: E731
    outer = lambda p, h: 0.5 * ((p["w"] - c) ** 2).sum() + 0.5 * GAMMA * (h["lam"] ** 2).sum()  # noqa: E731
    return A, B, c, w0, lam, inner, outer


def _closed_form(A, B, c, w0, lam, K: int, L: int | None = None) -> torch.Tensor:
    M = torch.eye(N, dtype=torch.float64) - ETA * A
    w = w0.clone()
    for _ in range(K):
        w = M @ w + ETA * B @ lam
    L = K if L is None else L
    jac = sum((torch.linalg.matrix_power(M, j) for j in range(L)), torch.zeros(N, N, dtype=torch.float64)) @ B * ETA
    return jac.T @ (w - c) + GAMMA * lam


@pytest.mark.parametrize("K", [0, 1, 4, 12])
def test_unrolled_gradient_descent_matches_the_closed_form(K):
    A, B, c, w0, lam, inner, outer = _problem()
    got = unrolled_hypergradient(outer, {"w": w0}, {"lam": lam}, steps=K, inner=inner, lr=ETA)
    torch.testing.assert_close(got["lam"], _closed_form(A, B, c, w0, lam, K), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("L", [0, 1, 3])
def test_truncated_unrolling_differentiates_only_the_last_steps(L):
    A, B, c, w0, lam, inner, outer = _problem(1)
    got = unrolled_hypergradient(outer, {"w": w0}, {"lam": lam}, steps=6, inner=inner, lr=ETA, truncate=L)
    torch.testing.assert_close(got["lam"], _closed_form(A, B, c, w0, lam, 6, L), rtol=1e-10, atol=1e-12)


def test_a_stateful_update_is_differentiated_through_its_state():
    """Heavy-ball momentum with a tuned learning rate and momentum: the unrolled hypergradient equals central
    finite differences of the validation loss after the same K steps."""
    A, B, c, w0, lam, inner, outer = _problem(2)
    h0 = {"log_lr": torch.tensor(-2.0, dtype=torch.float64), "mom": torch.tensor(0.7, dtype=torch.float64)}

    def update(p, h, buf):
        g = A @ p["w"] - B @ lam
        new = h["mom"] * buf["m"] + g
        return {"w": torch.exp(h["log_lr"]) * new}, {"m": new}

    def val(p, h):
        return 0.5 * ((p["w"] - c) ** 2).sum()

    def final_loss(h) -> float:
        w, buf = w0.clone(), {"m": torch.zeros(N, dtype=torch.float64)}
        for _ in range(7):
            u, buf = update({"w": w}, h, buf)
            w = w - u["w"]
        return float(val({"w": w}, h))

    got = unrolled_hypergradient(
        val, {"w": w0}, h0, steps=7, update=update, state={"m": torch.zeros(N, dtype=torch.float64)}
    )
    for k in h0:
        d = 1e-6
        up, down = dict(h0), dict(h0)
        up[k], down[k] = h0[k] + d, h0[k] - d
        fd = (final_loss(up) - final_loss(down)) / (2 * d)
        assert float(got[k]) == pytest.approx(fd, rel=1e-6, abs=1e-9), k


def test_unrolling_from_the_fixed_point_equals_the_neumann_ift():
    """Lorraine et al.'s Theorem 2: K steps of gradient descent unrolled from w* = A^-1 B lam give the IFT
    hypergradient with Neumann(steps=K - 1, alpha=eta)."""
    A, B, c, w0, lam, inner, outer = _problem(3)
    w_star = torch.linalg.solve(A, B @ lam)
    for K in (1, 3, 8):
        unrolled = unrolled_hypergradient(outer, {"w": w_star}, {"lam": lam}, steps=K, inner=inner, lr=ETA)
        ift = hypergradient(outer, {"w": w_star}, {"lam": lam}, inner=inner, solver=Neumann(K - 1, alpha=ETA))
        torch.testing.assert_close(unrolled["lam"], ift["lam"], rtol=1e-10, atol=1e-12)


def test_replaying_a_recorded_window_equals_unrolling_the_same_steps():
    """A loop records (w_k, state_k, ctx_k) before each step; replaying the window with each step's own context
    gives the hypergradient of unrolling those steps (here: a batch weight per step)."""
    A, B, c, w0, lam, inner, outer = _problem(4)
    ctxs = [0.5, 1.0, 1.5, 0.8]

    def step_map(p, raw, ctx, state, create_graph):
        g = ctx * (A @ p["w"]) - B @ raw["lam"]
        m = 0.5 * state["m"] + g
        return {"w": ETA * m}, {"m": m}, None

    w, state, window = w0.clone(), {"m": torch.zeros(N, dtype=torch.float64)}, []
    for ctx in ctxs:
        window.append(({"w": w}, state, ctx))
        u, state, _ = step_map({"w": w}, {"lam": lam}, ctx, state, False)
        w = w - u["w"]
    got = replay_hypergradient(outer, step_map, window, {"lam": lam})

    def update(p, h, s):
        opt_state, k = s
        u, new, _ = step_map(p, h, ctxs[k], opt_state, True)
        return u, (new, k + 1)

    want = unrolled_hypergradient(
        outer, {"w": w0}, {"lam": lam}, steps=4, update=update, state=({"m": torch.zeros(N, dtype=torch.float64)}, 0)
    )
    torch.testing.assert_close(got["lam"], want["lam"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="at least one"):
        replay_hypergradient(outer, step_map, [], {"lam": lam})


def test_bad_arguments_and_non_finite_losses_are_refused():
    A, B, c, w0, lam, inner, outer = _problem()
    p, h = {"w": w0}, {"lam": lam}
    with pytest.raises(ValueError, match="exactly one"):
        unrolled_hypergradient(outer, p, h, steps=2)
    with pytest.raises(ValueError, match="needs lr"):
        unrolled_hypergradient(outer, p, h, steps=2, inner=inner)
    with pytest.raises(ValueError, match="truncate"):
        unrolled_hypergradient(outer, p, h, steps=2, inner=inner, lr=ETA, truncate=3)
    with pytest.raises(ValueError, match="floating-point"):
        unrolled_hypergradient(outer, {"w": torch.ones(N, dtype=torch.long)}, h, steps=1, inner=inner, lr=ETA)
    with pytest.raises(NonFiniteError):
        unrolled_hypergradient(outer, p, h, steps=200, inner=inner, lr=1e3)
