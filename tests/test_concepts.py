"""Vicol et al. (2021) Table 1 on least squares, where every answer has a closed form.

f(w, y) = 1/2 ||Phi w - y||^2 with 5 points and 8 features (overparameterised inner
problem): H = Phi^T Phi (rank 5), d2f/dw dy = -Phi^T, min-norm response Jacobian Phi^+.
"""

import pytest
import torch

from bilevel import concepts as C

D = torch.float64


@pytest.fixture
def ls():
    g = torch.Generator().manual_seed(3)
    Phi = torch.randn(5, 8, generator=g, dtype=D)
    y = torch.randn(5, generator=g, dtype=D)
    phi_v = torch.randn(8, generator=g, dtype=D)

    def inner(p, h):
        return 0.5 * ((Phi @ p["w"] - h["y"]) ** 2).sum()

    def outer(p, h):
        return 0.5 * (phi_v @ p["w"] - 2.0) ** 2

    H = Phi.T @ Phi
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    w0 = torch.randn(8, generator=g, dtype=D)
    return dict(Phi=Phi, y=y, phi_v=phi_v, inner=inner, outer=outer, H=H, lam_max=lam_max, w0=w0)


def neumann_sum(H, a, K):
    """a * sum_{k=0}^{K} (I - a H)^k, by explicit matrix powers."""
    n = H.shape[0]
    M, P = torch.zeros(n, n, dtype=D), torch.eye(n, dtype=D)
    for _ in range(K + 1):
        M, P = M + P, P @ (torch.eye(n, dtype=D) - a * H)
    return a * M


def test_proximal_response_jacobian_is_the_closed_form(ls):
    Phi, H, w0 = ls["Phi"], ls["H"], ls["w0"]
    eps = 0.3
    m = C.method("proximal", eps=eps)
    J = C.response_jacobian(m, ls["inner"], {"w": w0}, {"y": ls["y"]})
    closed = torch.linalg.solve(H + eps * torch.eye(8, dtype=D), Phi.T)  # (H + eps I)^-1 Phi^T, eq. 4
    torch.testing.assert_close(J, closed, rtol=1e-10, atol=1e-12)
    # independent reference: autograd of the exact proximal step y -> argmin f + eps/2 ||w - w0||^2
    prox = lambda y: torch.linalg.solve(H + eps * torch.eye(8, dtype=D), Phi.T @ y + eps * w0)  # noqa: E731
    torch.testing.assert_close(J, torch.func.jacrev(prox)(ls["y"]), rtol=1e-10, atol=1e-12)
    # the CG variant agrees
    J_cg = C.response_jacobian(C.method("proximal", eps=eps, cg_steps=50), ls["inner"], {"w": w0}, {"y": ls["y"]})
    torch.testing.assert_close(J_cg, closed, rtol=1e-8, atol=1e-10)


def test_proximal_tends_to_the_pseudoinverse_as_eps_shrinks(ls):
    pinv = torch.linalg.pinv(ls["Phi"])
    errs = [
        float(
            (
                C.response_jacobian(C.method("proximal", eps=e), ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]}) - pinv
            ).norm()
        )
        for e in (1e-1, 1e-3, 1e-6)
    ]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-5 * float(pinv.norm())


def test_proximal_with_zero_eps_is_exactly_the_pseudoinverse(ls):
    """eps = 0: the exact IFT with H singular (rank 5 of 8) is the min-norm response Phi^+ (App. E.2)."""
    J = C.response_jacobian(C.method("proximal", eps=0.0), ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]})
    torch.testing.assert_close(J, torch.linalg.pinv(ls["Phi"]), rtol=1e-9, atol=1e-10)


def test_neumann_response_jacobian_is_the_truncated_series_and_tends_to_the_pseudoinverse(ls):
    Phi, H = ls["Phi"], ls["H"]
    a = 1.0 / ls["lam_max"]
    for K in (0, 3, 10):
        J = C.response_jacobian(C.method("neumann", steps=K, lr=a), ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]})
        torch.testing.assert_close(J, neumann_sum(H, a, K) @ Phi.T, rtol=1e-9, atol=1e-12)
    # K -> infinity: the null-space part of the series never reaches Phi^T, so the limit is the min-norm Phi^+ (E.2).
    # A well-conditioned Phi (singular values 1..2) so that 200 terms converge.
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=D))
    Phi = U @ torch.diag(torch.linspace(1, 2, 5, dtype=D)) @ V.T
    inner = lambda p, h: 0.5 * ((Phi @ p["w"] - h["y"]) ** 2).sum()  # noqa: E731
    J = C.response_jacobian(C.method("neumann", steps=200, lr=0.25), inner, {"w": ls["w0"]}, {"y": ls["y"]})
    torch.testing.assert_close(J, torch.linalg.pinv(Phi), rtol=1e-9, atol=1e-11)


def test_neumann_with_damping_is_table1_warm_column(ls):
    """(H + eps I)^-1 ~ sum_k ((1 - eps) I - H)^k: Neumann with alpha = 1 and damping eps."""
    Phi, H = ls["Phi"], ls["H"] / ls["lam_max"]  # scale so that alpha = 1 converges
    inner = lambda p, h: ls["inner"](p, h) / ls["lam_max"]  # noqa: E731
    eps, K = 0.2, 7
    J = C.response_jacobian(C.method("neumann", steps=K, lr=1.0, eps=eps), inner, {"w": ls["w0"]}, {"y": ls["y"]})
    S = sum(torch.linalg.matrix_power((1 - eps) * torch.eye(8, dtype=D) - H, k) for k in range(K + 1))
    torch.testing.assert_close(J, S @ Phi.T / ls["lam_max"], rtol=1e-9, atol=1e-12)


def test_unroll_K_equals_neumann_K_minus_1_and_the_closed_form(ls):
    Phi, H = ls["Phi"], ls["H"]
    a = 0.5 / ls["lam_max"]
    for K in (1, 4):
        Ju = C.response_jacobian(C.method("unroll", steps=K, lr=a), ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]})
        Jn = C.response_jacobian(C.method("neumann", steps=K - 1, lr=a), ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]})
        torch.testing.assert_close(Ju, Jn, rtol=1e-9, atol=1e-12)
        # w_K = (I - aH)^K w0 + a sum_{k<K} (I - aH)^k Phi^T y, so dw_K/dy = neumann_sum(K - 1) Phi^T
        torch.testing.assert_close(Ju, neumann_sum(H, a, K - 1) @ Phi.T, rtol=1e-9, atol=1e-12)


def test_hypergradient_is_dF_dw_times_response_jacobian(ls):
    p, h = {"w": ls["w0"]}, {"y": ls["y"]}
    for m in (
        C.method("proximal", eps=0.5),
        C.method("neumann", steps=4, lr=0.01),
        C.method("unroll", steps=3, lr=0.01),
    ):
        g = m(ls["outer"], p, h, inner=ls["inner"])["y"]
        J = C.response_jacobian(m, ls["inner"], p, h)
        if m.name == "unroll":  # dF/dw is taken at the unrolled weights w_K
            wK = C.inner_solve(ls["inner"], p, h, lr=0.01, steps=3)[0]["w"]
            dFdw = (ls["phi_v"] @ wK - 2.0) * ls["phi_v"]
        else:
            dFdw = (ls["phi_v"] @ ls["w0"] - 2.0) * ls["phi_v"]
        torch.testing.assert_close(g, dFdw @ J, rtol=1e-9, atol=1e-12)


def test_cold_start_solve_is_the_projection_of_y0_onto_the_solution_set(ls):
    Phi, y, w0 = ls["Phi"], ls["y"], ls["w0"]
    pinv = torch.linalg.pinv(Phi)
    cold = C.concept("cold", inner_lr=1.0 / ls["lam_max"], inner_steps=50000, tol=1e-12)
    # from the origin: the min-norm solution Phi^+ y
    w, n = cold.respond(ls["inner"], {"w": w0}, {"w": torch.zeros(8, dtype=D)}, {"y": y})
    torch.testing.assert_close(w["w"], pinv @ y, rtol=1e-9, atol=1e-10)
    assert n < 50000  # stopped by tol
    # from y0 = w0: w0 + Phi^+ (y - Phi w0), whatever the current weights are
    w, _ = cold.respond(ls["inner"], {"w": torch.ones(8, dtype=D)}, {"w": w0}, {"y": y})
    torch.testing.assert_close(w["w"], w0 + pinv @ (y - Phi @ w0), rtol=1e-9, atol=1e-10)


def test_warm_full_projects_the_current_weights_and_warm_partial_takes_K_steps(ls):
    Phi, y, w0, H = ls["Phi"], ls["y"], ls["w0"], ls["H"]
    pinv = torch.linalg.pinv(Phi)
    wt = torch.linspace(-1, 1, 8, dtype=D)
    full = C.concept("warm-full", inner_lr=1.0 / ls["lam_max"], inner_steps=50000, tol=1e-12)
    w, _ = full.respond(ls["inner"], {"w": wt}, {"w": w0}, {"y": y})
    torch.testing.assert_close(w["w"], wt + pinv @ (y - Phi @ wt), rtol=1e-9, atol=1e-10)
    a, K = 0.3 / ls["lam_max"], 6
    part = C.concept("warm-partial", inner_lr=a, inner_steps=K)
    w, n = part.respond(ls["inner"], {"w": wt}, {"w": w0}, {"y": y})
    A = torch.eye(8, dtype=D) - a * H
    expect = torch.linalg.matrix_power(A, K) @ wt + neumann_sum(H, a, K - 1) @ Phi.T @ y
    assert n == K
    torch.testing.assert_close(w["w"], expect, rtol=1e-10, atol=1e-12)


def test_proximal_inner_update_is_the_closed_form(ls):
    """Table 1 warm update: argmin_w f(w, y) + eps/2 ||w - w_t||^2 = (H + eps I)^-1 (Phi^T y + eps w_t)."""
    Phi, y, H = ls["Phi"], ls["y"], ls["H"]
    wt, eps = ls["w0"], 0.7
    prox = C.concept("warm-full", inner_lr=1.0 / (ls["lam_max"] + eps), inner_steps=20000, tol=1e-12, prox_eps=eps)
    w, _ = prox.respond(ls["inner"], {"w": wt}, {"w": torch.zeros(8, dtype=D)}, {"y": y})
    torch.testing.assert_close(
        w["w"], torch.linalg.solve(H + eps * torch.eye(8, dtype=D), Phi.T @ y + eps * wt), rtol=1e-9, atol=1e-10
    )


def test_bilevel_optimizer_step_is_table1(ls):
    """One cold-start step: x1 = x0 - alpha g(x0, y0*), then y1* = Phi^+ x1 (re-trained from the origin)."""
    Phi = ls["Phi"]
    pinv = torch.linalg.pinv(Phi)
    m = C.method("proximal", eps=0.1)
    cold = C.concept("cold", inner_lr=1.0 / ls["lam_max"], inner_steps=50000, tol=1e-12)
    opt = C.BilevelOptimizer(
        ls["inner"], ls["outer"], {"w": torch.zeros(8, dtype=D)}, {"y": ls["y"]}, concept=cold, method=m, outer_lr=0.05
    )
    torch.testing.assert_close(opt.params["w"], pinv @ ls["y"], rtol=1e-9, atol=1e-10)  # solved for x0 first
    g = m(ls["outer"], {"w": pinv @ ls["y"]}, {"y": ls["y"]}, inner=ls["inner"])["y"]
    used = opt.step()["y"]
    torch.testing.assert_close(used, g)
    x1 = ls["y"] - 0.05 * g
    torch.testing.assert_close(opt.hparams["y"].detach(), x1)
    torch.testing.assert_close(opt.params["w"], pinv @ x1, rtol=1e-9, atol=1e-10)
    hist = opt.run(3)
    assert [r["t"] for r in hist] == [1, 2, 3, 4]
    assert hist[-1]["outer"] < hist[0]["outer"]


def test_warm_partial_alternating_is_algorithm_1(ls):
    """Alg. 1: x <- x - alpha dF(Unroll(y, x, 1))/dx; y <- y - eta df/dy(y, x), checked by hand."""
    eta, alpha = 0.5 / ls["lam_max"], 0.1
    Phi, phi_v = ls["Phi"], ls["phi_v"]
    opt = C.BilevelOptimizer(
        ls["inner"],
        ls["outer"],
        {"w": ls["w0"]},
        {"y": ls["y"]},
        concept=C.concept("warm-partial", inner_lr=eta, inner_steps=1),
        method=C.method("unroll", steps=1, lr=eta),
        outer_lr=alpha,
    )
    w, x = ls["w0"].clone(), ls["y"].clone()
    for _ in range(3):
        w1 = w - eta * Phi.T @ (Phi @ w - x)
        x = x - alpha * (phi_v @ w1 - 2.0) * eta * (Phi @ phi_v)  # dw1/dx = eta Phi^T
        w = w - eta * Phi.T @ (Phi @ w - x)
        opt.step()
    torch.testing.assert_close(opt.hparams["y"].detach(), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.params["w"], w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("cold", "cold"),
        ("cold-start", "cold"),
        ("Cold_Start", "cold"),
        ("cold start", "cold"),
        ("warm-full", "warm-full"),
        ("warm-start-full", "warm-full"),
        ("warm_start_full", "warm-full"),
        ("warm-partial", "warm-partial"),
        ("warm-start-partial", "warm-partial"),
        ("warm_partial", "warm-partial"),
        ("warm-start", "warm-partial"),
        ("warm_start", "warm-partial"),
        ("warm", "warm-partial"),
        ("online", "warm-partial"),
    ],
)
def test_concept_aliases_store_the_canonical_name(alias, canonical):
    assert C.canonical_concept(alias) == canonical
    c = C.concept(alias, inner_lr=0.1)
    assert c.name == canonical and c == C.concept(canonical, inner_lr=0.1)


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("unroll", "unroll"),
        ("unrolling", "unroll"),
        ("Unrolled", "unroll"),
        ("neumann", "neumann"),
        ("neumann_series", "neumann"),
        ("proximal", "proximal"),
        ("prox", "proximal"),
        ("implicit", "proximal"),
        ("IFT", "proximal"),
        ("exact", "proximal"),
        ("min_norm", "proximal"),
    ],
)
def test_method_aliases_store_the_canonical_name(alias, canonical):
    assert C.canonical_method(alias) == canonical
    assert C.method(alias).name == canonical


def test_implicit_alias_is_the_min_norm_ift(ls):
    """``implicit`` / ``ift``: proximal, eps = 0, dense solve -- the pseudoinverse Phi^+ on the singular H."""
    for name in ("implicit", "ift"):
        m = C.method(name)
        assert (m.name, m.eps, m.cg_steps) == ("proximal", 0.0, None) and m == C.method("proximal", eps=0.0)
        J = C.response_jacobian(m, ls["inner"], {"w": ls["w0"]}, {"y": ls["y"]})
        torch.testing.assert_close(J, torch.linalg.pinv(ls["Phi"]), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="exact min-norm IFT"):
        C.method("ift", eps=0.1)
    with pytest.raises(ValueError, match="exact min-norm IFT"):
        C.method("implicit", cg_steps=5)


def test_each_concepts_table1_response_method_is_the_closed_form(ls):
    """cold / warm-full: the min-norm IFT, Phi^+; warm-partial (K steps of lr): (H + eps I)^-1 Phi^T with
    eps = 1/(K lr); prox_eps > 0: that eps."""
    Phi, H = ls["Phi"], ls["H"]
    p, h = {"w": ls["w0"]}, {"y": ls["y"]}
    pinv = torch.linalg.pinv(Phi)
    eye = torch.eye(8, dtype=D)
    for name in ("cold", "warm-full", "cold-start", "warm-start-full"):
        m = C.concept(name, inner_lr=0.1).response_method()
        assert (m.name, m.eps, m.cg_steps) == ("proximal", 0.0, None), name
        torch.testing.assert_close(C.response_jacobian(m, ls["inner"], p, h), pinv, rtol=1e-9, atol=1e-10)
    a, K = 0.02 / ls["lam_max"], 3
    part = C.concept("warm-start", inner_lr=a, inner_steps=K)
    m = part.response_method()
    assert m.name == "proximal" and m.eps == pytest.approx(1 / (K * a), rel=1e-12)
    J = C.response_jacobian(m, ls["inner"], p, h)
    torch.testing.assert_close(J, torch.linalg.solve(H + m.eps * eye, Phi.T), rtol=1e-10, atol=1e-12)
    # it is the Jacobian of the K steps actually taken, to first order in K lr lambda_max (= 0.06 here),
    # and far from the converged (min-norm) answer
    J_steps = C.response_jacobian(C.method("unroll", steps=K, lr=a), ls["inner"], p, h)
    rel = float((J - J_steps).norm() / J_steps.norm())
    assert rel < K * a * ls["lam_max"], rel
    assert float((pinv - J_steps).norm()) > 10 * float((J - J_steps).norm())
    for factor in (0.5, 2.0):  # eps = 1/(K lr) is the right scale: off by 2 is >10x worse
        J_off = C.response_jacobian(C.method("proximal", eps=factor * m.eps), ls["inner"], p, h)
        assert float((J_off - J_steps).norm()) > 10 * float((J - J_steps).norm()), factor
    # the CG solve agrees; prox_eps overrides
    J_cg = C.response_jacobian(part.response_method(cg_steps=50), ls["inner"], p, h)
    torch.testing.assert_close(J_cg, J, rtol=1e-8, atol=1e-10)
    for name in ("warm-full", "warm-partial", "cold"):
        m = C.concept(name, inner_lr=a, inner_steps=K, prox_eps=0.7).response_method()
        assert m.eps == 0.7
        torch.testing.assert_close(
            C.response_jacobian(m, ls["inner"], p, h), torch.linalg.solve(H + 0.7 * eye, Phi.T), rtol=1e-10, atol=1e-12
        )
    with pytest.raises(ValueError, match="min-norm"):
        C.concept("cold", inner_lr=0.1).response_method(cg_steps=10)
    assert set(C.TABLE1_RESPONSE) == set(C.CONCEPTS)


def test_bad_names_and_settings_are_refused():
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        C.method("implicitly")
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        C.method("cold")
    with pytest.raises(ValueError, match="unknown solution concept"):
        C.concept("lukewarm", inner_lr=0.1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        C.method("proximal", eps=0.0, cg_steps=10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        C.method("unroll", steps=0)
